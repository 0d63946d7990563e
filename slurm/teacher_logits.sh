#!/bin/bash
# The teacher's top-k log-probs over the rows a distillation reads, stored for offline distillation
# (pare distill ... teacher_path=none teacher_logits=OUTPUT), on one 8xH100 node: forward only,
# TP=1, PP=1, DP=8 (each GPU runs a whole 7B in bf16 over its own shards).
# Run from the repository root:  [CONTAINER=...] [RECIPE=...] sbatch slurm/teacher_logits.sh [extra pare arguments]
# The recipe (recipes/olmo3.py, default olmo3_7b_teacher_logits) takes the rows from its
# distillation recipe (data, split, seed, steps x global batch, validation rows) and holds k and
# the output; TEACHER_PATH, DATA, OUTPUT, TP, PP override them when set.
# Resumable: a job that stops (preemption, time limit, node failure) and runs again with the same
# arguments (--requeue, or sbatch again) redoes only the shards that were not finished.
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-teacher-logits
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

RECIPE=${RECIPE-olmo3_7b_teacher_logits}   # empty: none (then give every argument)

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
stage_args recipe=RECIPE teacher_path=TEACHER_PATH data=DATA output=OUTPUT tp=TP pp=PP
launch teacher-logits "${ARGS[@]}" "$@"
