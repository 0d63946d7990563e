#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the GPU tests (tests/gpu) and the GPU benchmarks
# (benchmarks/bench_gpu.py, bench_sparse24.py, bench_latency.py). See benchmarks/GPU.md.
#
#   benchmarks/gpu_suite.sh                     # in an environment with Pare's dependencies
#   WHEELS=.whl benchmarks/gpu_suite.sh         # first installs the wheels in .whl (no network
#                                               # needed) into $SITE, put first on PYTHONPATH
#   benchmarks/gpu_suite.sh --seq 8192          # arguments go to bench_gpu.py
#
# PYTHON: the interpreter (default: .venv/bin/python if it exists, else python3).
# SITE: where WHEELS are installed (default /tmp/pare-site).
# Without a CUDA GPU it prints "no GPU: skipped" and exits 0. Otherwise it exits non-zero if the
# tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_suite: $PYTHON cannot import torch; set PYTHON to an interpreter with torch" >&2
    exit 1
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU: skipped (torch.cuda.is_available() is False for $PYTHON)"
    exit 0
fi

if [ -n "${WHEELS:-}" ]; then
    SITE=${SITE:-/tmp/pare-site}
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_suite: WHEELS=$WHEELS holds no .whl files" >&2
        exit 1
    fi
    echo "installing ${#wheels[@]} wheel(s) from $WHEELS into $SITE"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" || exit 1
    else  # no pip (a uv venv): a wheel is a zip of the files site-packages gets
        mkdir -p "$SITE" && for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$SITE" || exit 1; done
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

missing=$("$PYTHON" - <<'EOF'
import importlib
need = {"megatron.core": "megatron-core", "transformers": "transformers",
        "safetensors": "safetensors", "tokenizers": "tokenizers", "pytest": "pytest"}
out = []
for mod, dist in need.items():
    try:
        importlib.import_module(mod)
    except Exception:
        out.append(dist)
try:
    from transformers import Olmo3Config  # noqa: F401
except Exception:
    out.append("transformers with Olmo 3 (>= 5.0)")
print(" ".join(out))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_suite: missing: $missing. Install them, or put their wheels in a folder and pass" \
         "WHEELS=<folder> (benchmarks/GPU.md says which)" >&2
    exit 1
fi

"$PYTHON" -W ignore - <<'EOF'
import torch, transformers, megatron.core
from pare_nemo.olmo3.model import have_te
print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers "
      f"{transformers.__version__}, megatron-core {megatron.core.__version__}, "
      f"Transformer Engine: {'yes' if have_te() else 'no'}")
EOF

echo "=== tests/gpu"
"$PYTHON" -m pytest tests/gpu -q -s -rs -p no:cacheprovider
tests_rc=$?

echo "=== benchmarks/bench_gpu.py $*"
"$PYTHON" benchmarks/bench_gpu.py "$@"
bench_rc=$?

echo "=== benchmarks/bench_sparse24.py"
"$PYTHON" benchmarks/bench_sparse24.py || bench_rc=$?

echo "=== benchmarks/bench_latency.py"
"$PYTHON" benchmarks/bench_latency.py || bench_rc=$?

echo "=== gpu_suite: tests/gpu $([ $tests_rc -eq 0 ] && echo passed || echo "FAILED (exit $tests_rc)"),"\
     "benchmarks $([ $bench_rc -eq 0 ] && echo ran || echo "FAILED (exit $bench_rc)")"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
