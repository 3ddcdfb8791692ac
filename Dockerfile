# gpurec for GPU nodes: DALI (nvJPEG) + CuPy, `gpurec` as the entrypoint.
#   docker build -t gpurec .                                      # CUDA 12
#   docker build --build-arg CUDA_MAJOR=13 -t gpurec:cuda13 .     # CUDA 13 (driver >= 580)
#   docker run --gpus all -v "$PWD:/data" gpurec pack images/ out/ds --resize 256
# CUDA_MAJOR picks the base image and the extra of pyproject.toml: 12 -> gpu, 13 -> gpu-cu13.
ARG CUDA_MAJOR=12
ARG CUDA12_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
ARG CUDA13_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu22.04

# ---- one base per CUDA major version (only the chosen one is built)
FROM ${CUDA12_IMAGE} AS cuda12
ENV GPUREC_EXTRA=gpu
FROM ${CUDA13_IMAGE} AS cuda13
ENV GPUREC_EXTRA=gpu-cu13

# ---- build: a virtual environment with gpurec and its GPU extra
FROM cuda${CUDA_MAJOR} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/gpurec
COPY pyproject.toml README.md /src/
COPY gpurec /src/gpurec
COPY configs /opt/gpurec/configs
COPY scripts /opt/gpurec/scripts
RUN /opt/gpurec/bin/pip install "/src[${GPUREC_EXTRA}]"

# ---- runtime: the CUDA runtime, Python, the venv; no compilers, no pip cache
FROM cuda${CUDA_MAJOR}
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
