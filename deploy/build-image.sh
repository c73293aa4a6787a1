#!/usr/bin/env bash
# Build the twinserve image.
#
# On this repo's offline dev VM (podman, no container registry, local torch wheel):
#   sudo deploy/build-image.sh                    # -> localhost/twinserve:latest   (server only)
#   sudo TARGET=demo TAG=twinserve:demo deploy/build-image.sh   # + demo artifact baked in (~4 min more)
# It runs shared/tools/container-base (installs podman, makes the local stand-in for python:3.11-slim),
# then `podman build $(container-base --print-flags) ...`, which mounts the local wheel folder and CA
# bundle into the build and passes PIP_FIND_LINKS / PIP_CERT as build args.
#
# Anywhere else (Docker + a registry) the same Dockerfile builds with no extra flags:
#   docker build -t twinserve:latest .
#   docker build --target demo -t twinserve:demo .
#   docker build --build-arg BASE_IMAGE=... --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" -t twinserve:cuda .
#
# Env: TAG (default twinserve:latest), TARGET (runtime|demo, default runtime), ENGINE (podman|docker,
#      default podman), CONTAINER_BASE (path to container-base, default ../shared/tools/container-base),
#      EXTRA_BUILD_ARGS (appended to the build command).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${TAG:-twinserve:latest}"
TARGET="${TARGET:-runtime}"
ENGINE="${ENGINE:-podman}"
CONTAINER_BASE="${CONTAINER_BASE:-$ROOT/../shared/tools/container-base}"

cd "$ROOT"
flags=()
if [ "$ENGINE" = "podman" ] && [ -x "$CONTAINER_BASE" ]; then
    "$CONTAINER_BASE" >&2                       # idempotent: ~1 s once set up
    # shellcheck disable=SC2207
    flags=($("$CONTAINER_BASE" --print-flags))
elif [ "$ENGINE" = "podman" ]; then
    echo "build-image: $CONTAINER_BASE not found; building with plain podman (needs registry access)" >&2
    flags=(--format docker)                     # keeps HEALTHCHECK
fi

start=$(date +%s)
# shellcheck disable=SC2086
"$ENGINE" build "${flags[@]}" --target "$TARGET" -t "$TAG" ${EXTRA_BUILD_ARGS:-} .
end=$(date +%s)
"$ENGINE" image inspect "$TAG" > /dev/null || { echo "build-image: $TAG was not built" >&2; exit 1; }

echo "build-image: built $TAG (target $TARGET) in $((end - start)) s" >&2
"$ENGINE" image ls "$TAG" >&2
"$ENGINE" run --rm --pull=never --network host "$TAG" --help > /dev/null \
    && echo "build-image: smoke test ok (twinserve --help inside the image)" >&2
