#!/usr/bin/env bash
# Generates the Python stubs of proto/seedoss/v1/seedoss.proto (messages, gRPC service, type stubs).
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repository root; stubs land in OUT_DIR/proto/seedoss/v1)
# The folder proto/ installs as the package seedoss.proto (pyproject's package-dir), so protoc maps it to that
# virtual path (`-I seedoss/proto=proto`): seedoss_pb2_grpc.py then imports its messages as
# `from seedoss.proto.seedoss.v1 import seedoss_pb2`, the module's installed package path.
# The stubs are committed; tests/test_grpc.py regenerates them into a temp dir and fails if they differ.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$root"
"$python" -m grpc_tools.protoc -I seedoss/proto=proto \
    --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    seedoss/proto/seedoss/v1/seedoss.proto
# Guard: protoc must have written the package-qualified import (a bare `import seedoss_pb2` breaks when installed).
grep -q '^from seedoss.proto.seedoss.v1 import seedoss_pb2 as ' "$tmp/seedoss/proto/seedoss/v1/seedoss_pb2_grpc.py" || {
    echo "gen_proto.sh: unexpected import in seedoss_pb2_grpc.py" >&2; exit 1; }
mkdir -p "$out/proto/seedoss/v1"
cp "$tmp"/seedoss/proto/seedoss/v1/seedoss_pb2{.py,.pyi,_grpc.py} "$out/proto/seedoss/v1/"
