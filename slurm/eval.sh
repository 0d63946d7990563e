#!/bin/bash
# The compression report of the teacher, the pruned and the distilled student on one 8xH100 node:
# held-out loss and perplexity at TP=1, PP=1, DP=8 (each GPU holds a whole 7B in bf16 and
# evaluates 1/8 of the rows), then, in rank 0 on one GPU, each model's export: lm-eval tasks
# (the recipe's, from the Hub: HF_HOME must be reachable), generation speed, samples, report.
# Run from the repository root:
#   [CONTAINER=...] [RECIPE=...] sbatch slurm/eval.sh [extra pare arguments]
# e.g.  RECIPE=olmo3_7b_eval_depth sbatch slurm/eval.sh
#       RECIPE= sbatch slurm/eval.sh checkpoints=teacher:$PWD/checkpoints/a,mine:$PWD/b data=...
#       TP=2 sbatch slurm/eval.sh                                  # TP=2 x DP=4
# The recipe names the checkpoints (the paths slurm/prune.sh and slurm/distill.sh write by default)
# and the data (the distillation blend: its validation split is held out); the results go to
# OUTPUT/eval.json and OUTPUT/report/ (report.md, report.png; OUTPUT: the recipe's, eval/<axis>),
# the table to slurm-<job>.out. OUTPUT, TP, PP override the recipe's when set.
# Container, mounts, HF_HOME, ports, GPU choice: see slurm/common.sh.
#SBATCH --job-name=pare-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=01:00:00
set -euo pipefail

RECIPE=${RECIPE-olmo3_7b_eval_width}   # or olmo3_7b_eval_depth, olmo3_7b_eval_combined; empty: none

# sbatch runs a copy of this script: common.sh is beside it, or in the submit directory's slurm/
here=$(dirname "${BASH_SOURCE[0]}"); [ -f "$here/common.sh" ] || here=${SLURM_SUBMIT_DIR:-$PWD}/slurm
# shellcheck source=slurm/common.sh
source "$here/common.sh"
stage_args output=OUTPUT tp=TP pp=PP
launch eval ${RECIPE:+recipe="$RECIPE"} "${ARGS[@]}" "$@"
