#!/bin/bash
# Distill a pruned Olmo 3 student from its teacher on 8xH100 nodes, preemption-safe.
# Run from the repository root:  [CONTAINER=...] [RECIPE=...] sbatch slurm/distill.sh [extra pare arguments]
# e.g.  RECIPE=olmo3_7b_distill_depth sbatch --nodes=4 slurm/distill.sh
# The recipe (recipes/olmo3.py, default olmo3_7b_distill_width) holds everything: the teacher
# (checkpoints/olmo3-7b-instruct), the student prune.sh wrote for it, the data blend, the losses,
# the schedule and the run directory (checkpoints/<recipe>); TEACHER_PATH, STUDENT_PATH, DATA,
# SAVE_PATH, TP, PP override them when set.
# Preemption and time limits: Slurm sends SIGUSR1 120 s before the limit (--signal) and SIGTERM on
# preemption; Pare finishes the step, saves a checkpoint and exits with 75; this script then
# requeues the job (scontrol requeue), which starts again with the same command and resumes from the
# latest complete checkpoint in SAVE_PATH (SLURM_RESTART_COUNT counts the restarts). A job killed
# without warning resumes from the last complete checkpoint the same way when requeued.
# Watch a run: the log line per LOG_INTERVAL steps in slurm-<job>.out, TensorBoard on
# $SAVE_PATH/tensorboard, metrics.jsonl and loss_curve.png in SAVE_PATH.
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

RECIPE=${RECIPE:-olmo3_7b_distill_width}   # or olmo3_7b_distill_depth, olmo3_7b_distill_combined

here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
# every task exits 75 after saving on a signal: let them all finish rather than kill the rest when
# the first one exits non-zero, so srun returns 75 and the job requeues
KILL_ON_BAD_EXIT=${KILL_ON_BAD_EXIT:-0}
echo "job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}" >&2
# on preemption the batch shell gets SIGTERM too: a handler (not the default, which would end this
# shell before it can requeue) lets it wait for srun and requeue below
trap 'echo "batch shell: SIGTERM, waiting for the tasks to save" >&2' TERM
set +e
stage_args recipe=RECIPE teacher_path=TEACHER_PATH student_path=STUDENT_PATH data=DATA \
  save_path=SAVE_PATH tp=TP pp=PP
launch distill "${ARGS[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 75 ]; then   # saved after SIGUSR1/SIGTERM: run again, resuming
  echo "checkpoint saved after a signal: requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
