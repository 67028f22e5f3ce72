#!/usr/bin/env bash
# Installs SeedOss Serve into ./.venv. torch 2.13.0 (the local CPU build) goes in first so that nothing
# later pulls a multi-GB CUDA build. Usage: scripts/install.sh [extras]   (default extras: serve)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[${extras}]"
