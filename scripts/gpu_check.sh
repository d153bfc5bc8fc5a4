#!/usr/bin/env bash
# The first thing to run on a CUDA host (vLLM's CUDA build installed: pip install -e '.[gpu,dev]').
#
#   scripts/gpu_check.sh [--out DIR] [--tc-model DIR] [--ccam-model DIR] [--frames N] [--dry-run]
#
#   1. versions: GPU, torch, vLLM, Triton
#   2. the Triton path live: vLLM's TRITON_ATTN builder + unified_attention (compiled) with the
#      plugin's frame-block ranges vs masked attention from layers/temporal.py (bench/triton_frame_blocks.py)
#   3. parity through vLLM, TC-LLaVA and Video-CCAM: fp32 engine vs the plain-PyTorch reference,
#      bf16 engine vs fp32 engine (prompt logprobs of one video prompt)
#   4. the frame mask live in the engine: TC-LLaVA with frame_block_mask on vs off must differ
#   5. prefill timing with and without the frame mask (engine), and the attention kernel alone at
#      LLaVA-1.5 sizes (576 tokens/frame): causal / one range per video / frame blocks
#
# Without --tc-model/--ccam-model it writes the tiny demo checkpoints (random weights). Every step
# runs even if an earlier one failed; the exit status is the number of failed steps. Logs and JSON
# go to --out (default bench/results/gpu-check-<UTC time>); summary.txt lists each step's result.
# --dry-run prints the commands and checks only the CPU-side parts (imports, argument parsing).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
TC_MODEL=""
CCAM_MODEL=""
FRAMES=8
TIMING_FRAMES=32
DRY_RUN=0
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --tc-model) TC_MODEL=$2; shift 2 ;;
    --ccam-model) CCAM_MODEL=$2; shift 2 ;;
    --frames) FRAMES=$2; shift 2 ;;
    --timing-frames) TIMING_FRAMES=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

# step NAME CMD...: run (or print) one command, log its output, record ok/FAIL
step() {
  local name=$1; shift
  echo "== $name: $*"
  if ((DRY_RUN)); then
    echo "dry-run  $name" >>"$SUMMARY"
    return 0
  fi
  if "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "ok       $name" >>"$SUMMARY"
  else
    echo "FAIL     $name (see $OUT/$name.log)" >>"$SUMMARY"
    FAILED=$((FAILED + 1))
  fi
}

if ((DRY_RUN)); then
  # the CPU-side parts for real: the Python entry imports and every subcommand parses
  "$PY" -m bench.gpu_check selftest || exit 1
fi

# --- 1. versions -------------------------------------------------------------------------
step gpu nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step versions "$PY" -c 'import torch, triton, vllm
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
print("vllm", vllm.__version__, "triton", triton.__version__)'

# --- checkpoints -------------------------------------------------------------------------
if [ -z "$TC_MODEL" ]; then
  TC_MODEL="$OUT/ckpt/tc-llava"
  step demo-tc-llava "$PY" -m framewise.server.cli demo-model --arch tc-llava --out "$TC_MODEL"
fi
if [ -z "$CCAM_MODEL" ]; then
  CCAM_MODEL="$OUT/ckpt/video-ccam"
  step demo-video-ccam "$PY" -m framewise.server.cli demo-model --arch video-ccam --out "$CCAM_MODEL"
fi
TC_NOMASK="$OUT/ckpt/tc-llava-nomask"
step variant-nomask "$PY" -m bench.gpu_check variant --base "$TC_MODEL" --out "$TC_NOMASK" \
  --set frame_block_mask=false

# --- 2. the Triton path, compiled --------------------------------------------------------
# exact fp32 dots (TRITON_F32_DEFAULT=ieee) against the 1e-5 bound of the CPU interpreter test,
# then the production default (fp32 tl.dot inputs as TF32) against a TF32-sized bound
step triton-frame-blocks env TRITON_F32_DEFAULT=ieee "$PY" -m bench.triton_frame_blocks --model "$TC_MODEL" \
  --device cuda --check --tol 1e-5 --out "$OUT/triton_frame_blocks.pt"
step triton-frame-blocks-tf32 "$PY" -m bench.triton_frame_blocks --model "$TC_MODEL" --device cuda --check \
  --tol 5e-3

# --- 3. parity through vLLM -------------------------------------------------------------
for arch in tc-llava video-ccam; do
  model=$TC_MODEL
  [ "$arch" = video-ccam ] && model=$CCAM_MODEL
  step "reference-$arch" "$PY" -m bench.gpu_check reference --model "$model" --frames "$FRAMES" \
    --out "$OUT/$arch-reference.json"
  for dtype in float32 bfloat16; do
    step "engine-$arch-$dtype" "$PY" -m bench.gpu_check engine --model "$model" --dtype "$dtype" \
      --frames "$FRAMES" --out "$OUT/$arch-$dtype.json"
  done
  # fp32 on CUDA: Triton's tl.dot takes fp32 inputs as TF32, hence 1e-2 rather than the CPU 1e-4
  step "parity-$arch-fp32-vs-reference" "$PY" -m bench.gpu_check compare "$OUT/$arch-float32.json" \
    "$OUT/$arch-reference.json" --tol 1e-2 --label "$arch fp32 engine vs reference"
  step "parity-$arch-bf16-vs-fp32" "$PY" -m bench.gpu_check compare "$OUT/$arch-bfloat16.json" \
    "$OUT/$arch-float32.json" --tol 0.25 --label "$arch bf16 vs fp32 engine"
done

# --- 4. the frame mask live in the engine -------------------------------------------------
step engine-tc-llava-nomask-float32 "$PY" -m bench.gpu_check engine --model "$TC_NOMASK" --dtype float32 \
  --frames "$FRAMES" --out "$OUT/tc-llava-nomask-float32.json"
step mask-live "$PY" -m bench.gpu_check compare "$OUT/tc-llava-float32.json" \
  "$OUT/tc-llava-nomask-float32.json" --tol 1e-3 --expect-differ --label "frame mask on vs off"

# --- 5. timing ---------------------------------------------------------------------------
step timing-mask-on "$PY" -m bench.gpu_check engine --model "$TC_MODEL" --dtype bfloat16 \
  --frames "$TIMING_FRAMES" --out "$OUT/timing-mask-on.json"
step timing-mask-off "$PY" -m bench.gpu_check engine --model "$TC_NOMASK" --dtype bfloat16 \
  --frames "$TIMING_FRAMES" --out "$OUT/timing-mask-off.json"
step kernel-timing "$PY" -m bench.gpu_check kernel-timing --frames 8 16 32

echo
cat "$SUMMARY"
exit "$FAILED"
