# Pare in an NGC container: the PyTorch container brings CUDA, NCCL, Transformer Engine and apex,
# which Pare uses when they import. Build:  docker build -t pare .
# Run on Slurm with pyxis:  srun --container-image=pare ... (see slurm/)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/pare
COPY pyproject.toml README.md ./
COPY pare_nemo ./pare_nemo
COPY conversion ./conversion
COPY recipes ./recipes
COPY slurm ./slurm
# Keep the container's own torch / transformer_engine: pip installs only what is missing.
RUN pip install --no-cache-dir -e . && python -c "import pare_nemo.model, conversion.convert"
ENV PYTHONUNBUFFERED=1
