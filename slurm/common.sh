# shellcheck shell=bash
# Sourced by slurm/*.sh: how a Pare stage is launched under Slurm, in a container or not.
# Every setting below comes from the environment (sbatch passes it on), for example
#   CONTAINER=$PWD/pare+latest.sqsh sbatch slurm/import.sh
#
#   CONTAINER      image for pyxis (srun --container-image): a squashfs file made with
#                  `enroot import dockerd://pare:latest` (-> pare+latest.sqsh) or a registry image
#                  (registry#image:tag). Empty (default): run in the current environment.
#   MOUNTS         pyxis --container-mounts (default: $PWD, plus HF_HOME when it lies outside $PWD).
#   HF_HOME        Hugging Face cache for Hub downloads (default: $PWD/.cache/huggingface), exported
#                  to every task and mounted into the container.
#   MASTER_PORT    torch.distributed rendezvous port (default: 20000 + job id % 10000: jobs that
#                  share a node differ, and it stays below Linux's ephemeral ports). MASTER_ADDR:
#                  the job's first node.
#   NODES, TASKS_PER_NODE  the srun step's layout (default: the allocation's, from the #SBATCH
#                  lines or the sbatch flags that override them, e.g. sbatch --nodes=2).
#   GPUS_PER_NODE  unset: the allocation's GPUs; 0: run on CPU (gloo) even where GPUs are
#                  allocated (CUDA_VISIBLE_DEVICES is emptied); N: srun --gpus-per-node=N.
#   KILL_ON_BAD_EXIT  1 (default): a task that fails ends the step (srun --kill-on-bad-exit=1).
#                  0: the other tasks may finish (srun --wait=300 then ends them); distill.sh sets it,
#                  so every task can exit with 75 after a signal and the script sees 75, not a kill.
#   PARE           the command run (default: `pare`; outside a container ./.venv/bin/pare when
#                  `pare` is not on PATH, as after `uv sync`).
set -euo pipefail
: "${SLURM_JOB_ID:?submit with sbatch (or run inside an salloc allocation)}"

CONTAINER=${CONTAINER:-}
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface}
mkdir -p "$HF_HOME"
case "$HF_HOME/" in
  "$PWD"/*) MOUNTS=${MOUNTS:-$PWD:$PWD} ;;
  *) MOUNTS=${MOUNTS:-$PWD:$PWD,$HF_HOME:$HF_HOME} ;;
esac
# the job's first node (sed, not head: head would close the pipe early and pipefail stop the job)
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
if [ -z "${PARE:-}" ]; then
  if [ -n "$CONTAINER" ] || command -v pare > /dev/null; then PARE=pare; else PARE=$PWD/.venv/bin/pare; fi
fi

# stage_args key=VAR ...: ARGS holds key=<value of VAR> for every VAR that is set and not empty.
# The scripts pass the recipe and the paths this way; whatever is not set comes from the recipe
# (recipes/olmo3.py), where every default lives.
stage_args() {
  ARGS=()
  local pair var
  for pair in "$@"; do
    var=${pair#*=}
    if [ -n "${!var:-}" ]; then ARGS+=("${pair%%=*}=${!var}"); fi
  done
}

# launch ARGS...: run `$PARE ARGS...` as one srun step (one process per task; Pare reads its rank
# from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), in the container when CONTAINER is set.
launch() {
  local step=(--kill-on-bad-exit="${KILL_ON_BAD_EXIT:-1}")
  if [ "${KILL_ON_BAD_EXIT:-1}" = 0 ]; then step+=(--wait=300); fi
  if [ -n "${NODES:-}" ]; then step+=(--nodes="$NODES"); fi
  if [ -n "${TASKS_PER_NODE:-}" ]; then step+=(--ntasks-per-node="$TASKS_PER_NODE"); fi
  case "${GPUS_PER_NODE:-}" in
    "") ;;
    0) export CUDA_VISIBLE_DEVICES= ;;
    *) step+=(--gpus-per-node="$GPUS_PER_NODE") ;;
  esac
  if [ -n "$CONTAINER" ]; then
    step+=(--container-image="$CONTAINER" --container-mounts="$MOUNTS" --container-workdir="$PWD")
  fi
  echo "+ srun ${step[*]} $PARE $*  (MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT HF_HOME=$HF_HOME)" >&2
  srun "${step[@]}" "$PARE" "$@"
}
