#!/bin/sh
# Container entrypoint for twinserve.
#   (no args) | serve [ARGS...]  -> exec twinserve serve "$TWINSERVE_ARTIFACT" --host "$TWINSERVE_HOST" --port "$TWINSERVE_PORT" [ARGS...]
#   serve /path/to/artifact ...  -> exec twinserve serve /path/to/artifact ... (explicit artifact wins)
#   anything else                -> exec twinserve "$@"  (e.g. `demo --zoo /artifacts/zoo -o /artifacts/demo`, `--help`)
# Every other setting is read by the server from TWINSERVE_* environment variables.
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve
fi

if [ "$1" = "serve" ]; then
    shift
    case "${1:-}" in
        ""|-*)
            artifact="${TWINSERVE_ARTIFACT:-/artifacts/demo}"
            if [ ! -f "$artifact/manifest.json" ]; then
                echo "twinserve-entrypoint: no artifact at $artifact (manifest.json missing)." >&2
                echo "  mount one (-v /path/to/artifacts:/artifacts:ro), use the demo image (--target demo)," >&2
                echo "  or build the demo into a writable volume: docker run -v twinserve-artifacts:/artifacts IMAGE demo --zoo /artifacts/zoo -o /artifacts/demo" >&2
                exit 2
            fi
            unreadable="$(find "$artifact" ! -readable -print 2>/dev/null | head -n 3)"
            if [ -n "$unreadable" ]; then
                echo "twinserve-entrypoint: uid $(id -u) cannot read:" >&2
                echo "$unreadable" | sed 's/^/  /' >&2
                echo "  (safetensors writes files 0600; run 'chmod -R a+rX' on the artifact dir, or chown it to uid 10001)" >&2
                exit 2
            fi
            exec twinserve serve "$artifact" --host "${TWINSERVE_HOST:-0.0.0.0}" --port "${TWINSERVE_PORT:-8000}" "$@"
            ;;
        *)
            exec twinserve serve "$@"
            ;;
    esac
fi

exec twinserve "$@"
