#!/bin/bash
# HF Olmo 3 -> Pare Megatron checkpoint. CPU work (one process); the checkpoint loads at any TP/PP.
# Olmo 3 7B: ~15 GB bf16 read, ~15 GB written, ~16 GB of host memory.
# Run from the repository root:  [CONTAINER=...] sbatch slurm/import.sh [extra pare arguments]
# Container, mounts, HF_HOME, ports, layout: see slurm/common.sh. Resources: the #SBATCH lines
# below; override them with sbatch flags (sbatch --mem=32G slurm/import.sh).
#SBATCH --job-name=pare-import
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=01:00:00
set -euo pipefail

HF_PATH=${HF_PATH:-allenai/Olmo-3-7B-Instruct}        # local directory or Hub id
MEGATRON_PATH=${MEGATRON_PATH:-$PWD/checkpoints/olmo3-7b-instruct}

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
launch import hf_path="$HF_PATH" megatron_path="$MEGATRON_PATH" "$@"
