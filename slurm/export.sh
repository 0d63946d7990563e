#!/bin/bash
# Pare Megatron checkpoint -> HF directory (AutoModelForCausalLM / AutoTokenizer load it). CPU work
# (one process).
# Run from the repository root:  [CONTAINER=...] sbatch slurm/export.sh [extra pare arguments]
# Container, mounts, HF_HOME, ports, layout: see slurm/common.sh. Resources: the #SBATCH lines
# below; override them with sbatch flags.
#SBATCH --job-name=pare-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=01:00:00
set -euo pipefail

MEGATRON_PATH=${MEGATRON_PATH:-$PWD/checkpoints/olmo3-7b-instruct}
HF_PATH=${HF_PATH:-$PWD/exports/olmo3-7b-instruct-hf}

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
launch export megatron_path="$MEGATRON_PATH" hf_path="$HF_PATH" "$@"
