# One image for every Baton service: the container runs `baton <subcommand>`
#   docker run --gpus all -p 8000:8000 baton                    the whole local cluster (`baton serve`)
#   docker run baton router | gateway | prefill | decode ...    one service (see compose.yaml, k8s/)
# Settings come from BATON_* variables (`docker run baton settings` lists them).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# -- build: a virtual environment with torch (CUDA), Baton and its dependencies --------------------
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/baton/venv
ENV PATH=/opt/baton/venv/bin:$PATH
# torch alone first: the largest layer, rebuilt only when its version changes
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY proto ./proto
COPY shared ./shared
COPY kernels ./kernels
COPY services ./services
COPY baton ./baton
RUN pip install . \
    && find /opt/baton/venv -name "__pycache__" -prune -exec rm -rf {} +

# -- runtime: the environment, redis-server (for `baton serve`), a non-root user, the demo model ---
# (gcc and the Python headers: Triton compiles its small launcher module on first use)
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 baton \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /opt/baton --shell /usr/sbin/nologin baton
COPY --from=build /opt/baton/venv /opt/baton/venv
# Triton's kernel cache goes to /tmp, so that the root filesystem may be read-only (k8s/)
ENV PATH=/opt/baton/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRITON_CACHE_DIR=/tmp/triton \
    BATON_CACHE_DIR=/opt/baton/cache \
    BATON_HOST=0.0.0.0
# the generated demo model, baked in so that every container of a deployment serves the same one
RUN baton generate --max-tokens 1 --device cpu "warm up" >/dev/null \
    && chown -R 10001:10001 /opt/baton/cache
USER 10001:10001
WORKDIR /opt/baton
EXPOSE 8000 50051
ENTRYPOINT ["baton"]
CMD ["serve"]
