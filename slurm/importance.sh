#!/bin/bash
# Importance analysis of Olmo 3 7B on one 8xH100 node: TP=1, PP=1, DP=8 (the 7B fits one H100 in
# bf16 with room for 4096-token activations); 1024 samples x 4096 tokens, 64 held out for layer_loss.
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
CONTAINER=${CONTAINER:-pare:latest}
MOUNTS=${MOUNTS:-$PWD:$PWD}

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
# one task per GPU; Pare reads RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID
srun --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$PWD" \
  pare importance megatron_path="$MEGATRON_PATH" data="$DATA" scores_path="$SCORES_PATH" \
  num_samples="$NUM_SAMPLES" seq_length="$SEQ_LENGTH" tp="$TP" pp="$PP" "$@"
