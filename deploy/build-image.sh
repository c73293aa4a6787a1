#!/usr/bin/env bash
# Build the twinserve image from any checkout, with docker or podman.
#
#   deploy/build-image.sh                                  # -> twinserve:latest (server only)
#   TARGET=demo TAG=twinserve:demo deploy/build-image.sh   # + the demo artifact baked in (minutes more)
#   ENGINE=docker deploy/build-image.sh
#
# Env: TAG (default twinserve:latest), TARGET (runtime|demo, default runtime), ENGINE (podman|docker, default:
#      podman when installed, else docker), EXTRA_BUILD_ARGS (appended to the build command),
#      CONTAINER_BASE (optional): an executable for build hosts without registry access. The script runs it
#      once with no arguments (to prepare the engine and a local base image), then takes its
#      `--print-flags` output as extra build flags (for example a local wheel folder and CA bundle passed as
#      --build-arg PIP_FIND_LINKS=... --build-arg PIP_CERT=...). When CONTAINER_BASE is set but is not an
#      executable file, the script stops with exit code 2; it never falls back to another kind of build.
#      Unset: a plain `$ENGINE build` that pulls python:3.11-slim and PyPI packages (needs network access).
#
# The same Dockerfile builds with no script at all:
#   docker build -t twinserve:latest .
#   docker build --target demo -t twinserve:demo .
#   docker build --build-arg BASE_IMAGE=... --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" -t twinserve:cuda .
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${TAG:-twinserve:latest}"
TARGET="${TARGET:-runtime}"
if [ -z "${ENGINE:-}" ]; then
    if command -v podman > /dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi
if ! command -v "$ENGINE" > /dev/null 2>&1; then
    echo "build-image: $ENGINE not found; install docker or podman, or set ENGINE" >&2
    exit 2
fi

cd "$ROOT"
flags=()
if [ -n "${CONTAINER_BASE:-}" ]; then
    if [ ! -f "$CONTAINER_BASE" ] || [ ! -x "$CONTAINER_BASE" ]; then
        echo "build-image: CONTAINER_BASE=$CONTAINER_BASE is not an executable file; fix the path, or unset" \
             "CONTAINER_BASE for a plain $ENGINE build (needs registry access)" >&2
        exit 2
    fi
    "$CONTAINER_BASE" >&2
    # shellcheck disable=SC2207
    flags=($("$CONTAINER_BASE" --print-flags))
    echo "build-image: $ENGINE build with the flags of $CONTAINER_BASE: ${flags[*]}" >&2
else
    [ "$ENGINE" = "podman" ] && flags=(--format docker)   # podman's default OCI format drops HEALTHCHECK
    echo "build-image: plain $ENGINE build (CONTAINER_BASE unset: pulls python:3.11-slim and PyPI packages)" >&2
fi

start=$(date +%s)
# shellcheck disable=SC2086
"$ENGINE" build "${flags[@]}" --target "$TARGET" -t "$TAG" ${EXTRA_BUILD_ARGS:-} .
end=$(date +%s)
"$ENGINE" image inspect "$TAG" > /dev/null || { echo "build-image: $TAG was not built" >&2; exit 1; }

echo "build-image: built $TAG (target $TARGET) in $((end - start)) s" >&2
"$ENGINE" image ls "$TAG" >&2
"$ENGINE" run --rm --pull=never "$TAG" --help > /dev/null \
    && echo "build-image: smoke test ok (twinserve --help inside the image)" >&2
