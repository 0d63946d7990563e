#!/bin/bash
# Prune Olmo 3 7B with its importance scores on one node. Pruning gathers one layer at a time, so
# TP=1/PP=1 on a single GPU (or CPU) is enough for 7B; larger models: raise TP/PP and the task count.
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

MEGATRON_PATH=${MEGATRON_PATH:-$PWD/checkpoints/olmo3-7b-instruct}
SCORES_PATH=${SCORES_PATH:-$PWD/scores/olmo3-7b-instruct.pt}
RECIPE=${RECIPE-olmo3_7b_width_4p5b}   # or olmo3_7b_depth_4p5b, olmo3_7b_combined_4p5b; empty: targets as arguments
SAVE_PATH=${SAVE_PATH:-$PWD/checkpoints/${RECIPE:-pruned}}
TP=${TP:-1}
PP=${PP:-1}

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
launch prune ${RECIPE:+recipe="$RECIPE"} megatron_path="$MEGATRON_PATH" scores_path="$SCORES_PATH" \
  save_path="$SAVE_PATH" tp="$TP" pp="$PP" "$@"
