#!/usr/bin/env bash
# Builds and tags the SeedOss Serve images from docker/ (docker or podman):
#   ${IMAGE}:${VERSION}-cpu   docker/Dockerfile.cpu   (the cpu-demo overlay's image; demo checkpoint baked in)
#   ${IMAGE}:${VERSION}-gpu   docker/Dockerfile.gpu   (the gpu-pipeline overlay's image; CUDA torch + vLLM)
# VERSION is pyproject.toml's; IMAGE defaults to seedoss/serve, the name the k8s overlays use (set IMAGE to your
# registry's name and point the overlays at it with kustomize `images:`, see k8s/README.md).
# Usage: scripts/build_images.sh [--push] [cpu|gpu ...]     scripts/build_images.sh --print-tags
# Extra `docker build` arguments: BUILD_ARGS, e.g. BUILD_ARGS="--build-arg TORCH_INDEX_URL=https://mirror/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-seedoss/serve}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
[ -n "$VERSION" ] || { echo "no version in pyproject.toml" >&2; exit 1; }

push=0
flavors=()
for arg in "$@"; do
  case "$arg" in
    --print-tags) echo "cpu ${IMAGE}:${VERSION}-cpu"; echo "gpu ${IMAGE}:${VERSION}-gpu"; exit 0 ;;
    --push) push=1 ;;
    cpu|gpu) flavors+=("$arg") ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[ ${#flavors[@]} -gt 0 ] || flavors=(cpu gpu)

if command -v docker >/dev/null; then engine=docker
elif command -v podman >/dev/null; then engine=podman
else echo "needs docker or podman" >&2; exit 1
fi

for flavor in "${flavors[@]}"; do
  tag="${IMAGE}:${VERSION}-${flavor}"
  # shellcheck disable=SC2086  # BUILD_ARGS is a list of arguments
  "$engine" build -f "docker/Dockerfile.${flavor}" -t "$tag" ${BUILD_ARGS:-} .
  if [ "$push" = 1 ]; then "$engine" push "$tag"; fi
done
