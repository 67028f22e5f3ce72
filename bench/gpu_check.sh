#!/usr/bin/env bash
# GPU check of the generation backends (issue 14), for the day a CUDA machine is at hand. It
#   1. fails loudly without an NVIDIA GPU (nvidia-smi) or without CUDA in torch: it never falls back to CPU;
#   2. builds ./.venv-gpu: torch==2.13.0 and vllm==0.32.0 from PyPI (Linux wheels: the CUDA builds; vllm 0.32.0 is
#      the newest whose torch pin matches ours, see docker/Dockerfile.gpu), then this package with serve + test;
#   3. runs bench/backends.py on CUDA in bfloat16: parity of our engine and vLLM's (greedy tokens up to the first
#      near-tie, logprobs within the bf16 tolerance) and served throughput of both at 1/8/32 streams, one backend
#      after the other; the JSON goes to bench/gpu_check.json.
# Usage: bench/gpu_check.sh [checkpoint dir]   (default: the 'small' demo preset, created on first use)
# Env: STAGES (default: 2 when >= 2 GPUs, else 1; vLLM takes one GPU per stage), MAX_TOKENS (64), VENV (.venv-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "gpu_check: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this needs an NVIDIA GPU machine (no CPU fallback)"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
[ "$gpus" -ge 1 ] || die "nvidia-smi lists no GPU (no CPU fallback)"
venv="${VENV:-.venv-gpu}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 vllm==0.32.0
"${pip[@]}" -c <(printf '%s\n' torch==2.13.0 vllm==0.32.0 "transformers<5.20" "fastapi<0.137") -e ".[serve,test]"
"$venv/bin/python" - <<'PY' || die "torch sees no CUDA device (driver too old for the CUDA build of torch 2.13?)"
import sys, torch, vllm
from vllm.platforms import current_platform
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}, "
      f"vLLM platform {current_platform.device_type}")
sys.exit(0 if torch.cuda.is_available() and current_platform.is_cuda() else 1)
PY
stages="${STAGES:-$([ "$gpus" -ge 2 ] && echo 2 || echo 1)}"
checkpoint=()
[ $# -ge 1 ] && checkpoint=(--checkpoint "$1")
"$venv/bin/python" -m bench.backends --device cuda --dtype bfloat16 --num-stages "$stages" \
    --concurrency 1 8 32 --max-tokens "${MAX_TOKENS:-64}" "${checkpoint[@]}" --json bench/gpu_check.json
