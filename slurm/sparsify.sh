#!/bin/bash
# Sparsify a checkpoint (Wanda / SparseGPT / magnitude, unstructured or 2:4) on one node: one
# forward pass over the calibration rows, then each layer's masks on its full weights.
# The recipe (recipes/olmo3.py, default olmo3_7b_sparsify: 2:4 Wanda of the distilled width
# student) holds the method and the paths; MEGATRON_PATH, SAVE_PATH, TP, PP override them when set.
# Then masked distillation: RECIPE=olmo3_7b_distill_sparse sbatch slurm/distill.sh
# Run from the repository root:  [CONTAINER=...] [RECIPE=...] sbatch slurm/sparsify.sh [extra pare arguments]
#   sbatch slurm/sparsify.sh method=sparsegpt                   # SparseGPT instead of Wanda
#   sbatch --gpus-per-node=0 slurm/sparsify.sh                   # CPU only
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-sparsify
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=02:00:00
set -euo pipefail

RECIPE=${RECIPE-olmo3_7b_sparsify}   # empty: everything as arguments

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
stage_args recipe=RECIPE megatron_path=MEGATRON_PATH save_path=SAVE_PATH tp=TP pp=PP
launch sparsify "${ARGS[@]}" "$@"
