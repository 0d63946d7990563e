# Pare in an NGC PyTorch container:  docker build -t pare .
#
# Target: nvcr.io/nvidia/pytorch:25.12-py3 (Python 3.12, PyTorch 2.10.0a0, CUDA 13.1, per NVIDIA's
# 25.12 release notes). Other NGC PyTorch tags with Python 3.12 (25.01 and later; megatron-core
# >= 0.17 needs 3.12) should work too:  docker build --build-arg BASE_IMAGE=... -t pare .
#
# The container's torch, Transformer Engine, apex, triton and CUDA libraries are kept as they are.
# Everything else Pare needs is installed at uv.lock's versions from docker/requirements.txt
# (docker/requirements.sh writes it from uv.lock; tests/test_container.py checks the two agree).
# --no-deps: pip resolves nothing, so it can neither replace torch nor pick other versions.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/pare
COPY docker ./docker
# The image pins its packages in /etc/pip/constraint.txt: swap in uv.lock's pins for the packages
# installed here (torchx needs urllib3<1.27; leptonai 0.27.3 pins httpx, anyio, cloudpickle) and
# keep the rest; the build log lists every pin that changed.
RUN python docker/constrain.py docker/requirements.txt /etc/pip/constraint.txt \
 && pip install --no-cache-dir --no-deps -r docker/requirements.txt

COPY pyproject.toml README.md ./
COPY pare_nemo ./pare_nemo
COPY conversion ./conversion
COPY recipes ./recipes
COPY slurm ./slurm
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, megatron.core, transformers, nemo_run, pare_nemo.model, conversion.convert; print('torch', torch.__version__)" \
 && pare --help > /dev/null
ENV PYTHONUNBUFFERED=1
