#!/bin/bash
# Architecture search on one node (8 GPUs), preemption-safe: candidates within the budget
# (parameters, decode latency, memory) scored by zero-shot loss, then the best few pruned and
# distilled briefly (`pare prune` + `pare distill` + `pare eval`'s functions, one candidate after
# another) and ranked again.
# Run from the repository root:  [CONTAINER=...] [RECIPE=...] sbatch slurm/search.sh [extra pare arguments]
#   sbatch slurm/search.sh retrain_top=0                         # zero-shot ranking only
#   sbatch slurm/search.sh budget_latency=0.01 latency=measured  # 10 ms a decode step, timed here
# The recipe (recipes/olmo3.py, default olmo3_7b_search) holds the budget, grid and retraining;
# MEGATRON_PATH, SCORES_PATH, OUT_PATH, TP, PP override them when set.
# Preemption: as slurm/distill.sh (a candidate's distillation saves and exits 75 on SIGUSR1 /
# SIGTERM; this script requeues the job); the search run again skips the zero-shot pass and the
# candidates already scored, and resumes the one it was distilling.
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-search
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

RECIPE=${RECIPE-olmo3_7b_search}   # empty: everything as arguments

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
KILL_ON_BAD_EXIT=${KILL_ON_BAD_EXIT:-0}   # every task exits 75 after saving: srun returns 75
trap 'echo "batch shell: SIGTERM, waiting for the tasks to save" >&2' TERM
set +e
stage_args recipe=RECIPE megatron_path=MEGATRON_PATH scores_path=SCORES_PATH out_path=OUT_PATH \
  tp=TP pp=PP
launch search "${ARGS[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 75 ]; then   # a candidate saved after SIGUSR1/SIGTERM: run again, resuming
  echo "checkpoint saved after a signal: requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
