#!/bin/bash
# Prune Olmo 3 7B with its importance scores on one node. Pruning gathers one layer at a time, so
# TP=1/PP=1 on a single GPU (or CPU) is enough for 7B; larger models: raise TP/PP and the task count.
# The recipe (recipes/olmo3.py, default olmo3_7b_width_4p5b) holds the targets and the paths
# (checkpoints/olmo3-7b-instruct, scores/olmo3-7b-instruct.pt -> checkpoints/<recipe>);
# MEGATRON_PATH, SCORES_PATH, SAVE_PATH, TP, PP override them when set. RECIPE= (empty): no recipe,
# the targets as arguments.
# Run from the repository root:  [CONTAINER=...] [RECIPE=...] sbatch slurm/prune.sh [extra pare arguments]
# Other layouts: sbatch flags override the #SBATCH lines below, e.g.
#   TP=2 sbatch --ntasks-per-node=2 --gpus-per-node=2 slurm/prune.sh
#   sbatch --gpus-per-node=0 slurm/prune.sh                     # CPU only
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-prune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=01:00:00
set -euo pipefail

RECIPE=${RECIPE-olmo3_7b_width_4p5b}   # or olmo3_7b_depth_4p5b, olmo3_7b_combined_4p5b; empty: targets as arguments

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
stage_args recipe=RECIPE megatron_path=MEGATRON_PATH scores_path=SCORES_PATH save_path=SAVE_PATH \
  tp=TP pp=PP
launch prune "${ARGS[@]}" "$@"
