#!/bin/bash
# HF Olmo 3 -> Pare Megatron checkpoint. CPU work (one process); the checkpoint loads at any TP/PP.
# Olmo 3 7B: ~15 GB bf16 read, ~15 GB written, ~16 GB of host memory.
#SBATCH --job-name=pare-import
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=01:00:00
set -euo pipefail

HF_PATH=${HF_PATH:-allenai/Olmo-3-7B-Instruct}        # local directory or Hub id
MEGATRON_PATH=${MEGATRON_PATH:-$PWD/checkpoints/olmo3-7b-instruct}
CONTAINER=${CONTAINER:-pare:latest}                    # image built from the Dockerfile
MOUNTS=${MOUNTS:-$PWD:$PWD}

srun --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$PWD" \
  pare import hf_path="$HF_PATH" megatron_path="$MEGATRON_PATH" "$@"
