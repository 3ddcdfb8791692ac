# gpurec for CUDA 12 GPU nodes: DALI (nvJPEG) + CuPy, `gpurec` as the entrypoint.
#   docker build -t gpurec .
#   docker run --gpus all -v "$PWD:/data" gpurec pack images/ out/ds --resize 256
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# ---- build: a virtual environment with gpurec and its gpu extra
FROM ${CUDA_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gpurec
COPY pyproject.toml README.md /src/
COPY gpurec /src/gpurec
COPY configs /opt/gpurec/configs
COPY scripts /opt/gpurec/scripts
RUN /opt/gpurec/bin/pip install "/src[gpu]"

# ---- runtime: the CUDA runtime, Python, the venv; no compilers, no pip cache
FROM ${CUDA_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 gpurec
COPY --from=build /opt/gpurec /opt/gpurec
ENV PATH=/opt/gpurec/bin:$PATH PYTHONUNBUFFERED=1
USER gpurec
WORKDIR /data
VOLUME /data
ENTRYPOINT ["gpurec"]
CMD ["--help"]
