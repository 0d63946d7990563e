#!/bin/bash
# Importance analysis of Olmo 3 7B on one 8xH100 node: TP=1, PP=1, DP=8 (the 7B fits one H100 in
# bf16 with room for 4096-token activations). The recipe (recipes/olmo3.py, default
# olmo3_7b_importance) holds the data and the shapes: 1024 samples x 4096 tokens, 64 held out for
# layer_loss; MEGATRON_PATH, DATA, SCORES_PATH, TP, PP override its values when set.
# Run from the repository root:  [CONTAINER=...] [RECIPE=...] sbatch slurm/importance.sh [extra pare arguments]
# One task per GPU. Other layouts: sbatch flags override the #SBATCH lines below, e.g.
#   sbatch --nodes=2 slurm/importance.sh                        # 16 GPUs, DP=16
#   TP=2 sbatch slurm/importance.sh                             # TP=2 x DP=4
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 --mem=64G slurm/importance.sh
#                                                               # CPU only (gloo)
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-importance
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
set -euo pipefail

RECIPE=${RECIPE-olmo3_7b_importance}   # empty: none (then give every argument)

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
stage_args recipe=RECIPE megatron_path=MEGATRON_PATH data=DATA scores_path=SCORES_PATH tp=TP pp=PP
launch importance "${ARGS[@]}" "$@"
