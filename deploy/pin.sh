#!/bin/sh
# Refresh the image's reproducibility pins, then review and commit the diff:
#   1. deploy/docker/constraints.txt: exact Python package versions (pip's resolver, for the
#      image's Python; needs the package index only);
#   2. the base image digest in deploy/docker/Dockerfile (needs docker buildx and the registry).
# The build itself then fetches nothing unpinned: no `# syntax=` frontend, a base by digest,
# packages by version.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" deploy/docker/gen_constraints.py > deploy/docker/constraints.txt.new
mv deploy/docker/constraints.txt.new deploy/docker/constraints.txt
echo "wrote deploy/docker/constraints.txt"

IMAGE=python:3.12-slim-bookworm
if command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
    # The index digest (all platforms), not one platform's manifest.
    digest=$(docker buildx imagetools inspect "$IMAGE" --format '{{json .Manifest.Digest}}' | tr -d '"')
    case "$digest" in
        sha256:????????????????????????????????????????????????????????????????) ;;
        *) echo "unexpected digest '$digest' for $IMAGE" >&2; exit 1 ;;
    esac
    sed -i "s|^ARG BASE_IMAGE=.*|ARG BASE_IMAGE=$IMAGE@$digest|" deploy/docker/Dockerfile
    echo "pinned $IMAGE@$digest in deploy/docker/Dockerfile"
else
    echo "docker buildx not found: the base image digest was not refreshed" >&2
fi
