#!/bin/bash
# Pare Megatron checkpoint -> HF directory (AutoModelForCausalLM / AutoTokenizer load it).
#SBATCH --job-name=pare-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=01:00:00
set -euo pipefail

MEGATRON_PATH=${MEGATRON_PATH:-$PWD/checkpoints/olmo3-7b-instruct}
HF_PATH=${HF_PATH:-$PWD/exports/olmo3-7b-instruct-hf}
CONTAINER=${CONTAINER:-pare:latest}
MOUNTS=${MOUNTS:-$PWD:$PWD}

srun --container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$PWD" \
  pare export megatron_path="$MEGATRON_PATH" hf_path="$HF_PATH" "$@"
