#!/usr/bin/env bash
# Generates the Python stubs of proto/seedoss/v1/seedoss.proto (messages, gRPC service, type stubs).
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repository root, i.e. next to the .proto file)
# protoc runs from the repository root with `-I .`, so the .proto is known as proto/seedoss/v1/seedoss.proto and
# seedoss_pb2_grpc.py imports its messages as `from proto.seedoss.v1 import seedoss_pb2`, the module's package path.
# The stubs are committed; tests/test_grpc.py regenerates them into a temp dir and fails if they differ.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$root"
"$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/seedoss/v1/seedoss.proto
# Guard: protoc must have written the package-qualified import (a bare `import seedoss_pb2` breaks when installed).
grep -q '^from proto.seedoss.v1 import seedoss_pb2 as ' "$out/proto/seedoss/v1/seedoss_pb2_grpc.py" || {
    echo "gen_proto.sh: unexpected import in seedoss_pb2_grpc.py" >&2; exit 1; }
