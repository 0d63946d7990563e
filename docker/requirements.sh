#!/bin/bash
# Regenerate docker/requirements.txt from uv.lock: every package Pare needs at run time at its
# locked version, less torch and what only torch needs (triton, nvidia-*, cuda-*, sympy,
# setuptools): the NGC PyTorch container brings those, built for its CUDA. Run it after changing
# uv.lock (tests/test_container.py fails until you do). UV="python3 -m uv" if uv is not on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
read -ra uv <<< "${UV:-uv}"
"${uv[@]}" export --frozen --no-dev --no-hashes --no-emit-project --prune torch > docker/requirements.txt
