#!/bin/bash
# Importance analysis of Olmo 3 7B on one 8xH100 node: TP=1, PP=1, DP=8 (the 7B fits one H100 in
# bf16 with room for 4096-token activations); 1024 samples x 4096 tokens, 64 held out for layer_loss.
# Run from the repository root:  [CONTAINER=...] sbatch slurm/importance.sh [extra pare arguments]
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

MEGATRON_PATH=${MEGATRON_PATH:-$PWD/checkpoints/olmo3-7b-instruct}
DATA=${DATA:-allenai/Dolci-Instruct-SFT-7B}          # HF dataset id or local jsonl/parquet/txt
SCORES_PATH=${SCORES_PATH:-$PWD/scores/olmo3-7b-instruct.pt}
NUM_SAMPLES=${NUM_SAMPLES:-1024}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
TP=${TP:-1}
PP=${PP:-1}

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
launch importance megatron_path="$MEGATRON_PATH" data="$DATA" scores_path="$SCORES_PATH" \
  num_samples="$NUM_SAMPLES" seq_length="$SEQ_LENGTH" tp="$TP" pp="$PP" "$@"
