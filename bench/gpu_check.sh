#!/usr/bin/env bash
# The GPU check, run from the repo root on a machine with CUDA:
#   OUT=/some/dir bash bench/gpu_check.sh
# 1. installs the wheels carried in .whl/ (packages the machine's python lacks, and transformers/peft at the
#    versions the CPU results were made with) into /tmp/site;
# 2. prints the GPU, python/torch/transformers versions;
# 3. runs the CUDA tests (pytest -m gpu tests/gpu) -> $OUT/gpu_tests.log;
# 4. runs `twinserve bench --synthetic --device cuda` in bf16, then fp32 -> $OUT/bench_cuda_{bf16,fp32}.{json,log}.
# Every step runs even when an earlier one failed; the exit status is non-zero when any failed.
# Dry run without a GPU: DEVICE=cpu QUICK=1 OUT=/tmp/gc bash bench/gpu_check.sh  (TESTS=0 skips step 3, BENCH=0 step 4)
set +e
set -o pipefail
OUT=${OUT:?set OUT to the folder for logs and JSON}
DEVICE=${DEVICE:-cuda}
# the project's .venv when there is one (make install), else the machine's python3 (a GPU image with torch)
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-345}   # seconds for the whole script: the device call that runs it allows 420
failed=()
step() {  # step NAME SECONDS LOG COMMAND... : time-limited, output also to LOG (or /dev/null), failures recorded
    local name=$1 secs=$2 log=$3; shift 3
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"; failed+=("$name(no time)"); return 0
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    echo "=== $name (limit ${secs}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
    return 0
}

if [ "$PY" != .venv/bin/python ] && ls .whl/*.whl >/dev/null 2>&1; then   # a .venv has the packages already
    step wheels 120 /dev/null $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

if [ "$DEVICE" = cuda ]; then nvidia-smi -L; else echo "DEVICE=$DEVICE (dry run)"; fi
$PY - <<'PYEOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "| transformers", transformers.__version__)
for name in ("peft", "fastapi", "pydantic", "pydantic_settings", "starlette", "uvicorn"):
    try:
        m = __import__(name)
        print(f"  {name} {getattr(m, '__version__', '?')} {m.__file__}")
    except Exception as e:   # reported, the steps below will fail on it
        print(f"  {name}: IMPORT FAILED {type(e).__name__}: {e}")
PYEOF

if [ "${TESTS:-1}" = 1 ]; then
    step gpu_tests 150 "$OUT/gpu_tests.log" env TWINSERVE_GPU_TEST_DEVICE="$DEVICE" \
        $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="-ra" --durations=5
fi

if [ "${QUICK:-0}" = 1 ]; then
    size=(--quick --batch-sizes 1,4)
else
    size=(--batch-sizes 1,16)
fi
# the GPU does the model's work; torch's own CPU thread count keeps the host side (artifact build) fast
[ "$DEVICE" = cuda ] && size+=(--threads 0)
modes=backbone,lowrank,lowrank_top2,materialize,hf_generate,peft_mixed
synth=/tmp/twinserve-gpu-check-synthetic    # built by the first bench, reused (checksums verified) by the second
for dtype in $([ "${BENCH:-1}" = 1 ] && echo bfloat16 float32); do   # BENCH=0: tests only
    tag=$([ $dtype = bfloat16 ] && echo bf16 || echo fp32)
    step "bench_$tag" 150 "$OUT/bench_${DEVICE}_$tag.log" $PY -m cli bench --synthetic --device "$DEVICE" \
        --dtype $dtype "${size[@]}" --modes $modes --synthetic-dir $synth --out "$OUT/bench_${DEVICE}_$tag.json"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all steps passed"
