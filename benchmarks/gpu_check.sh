#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a CUDA machine, in one call that ends within ~9.5 minutes.
#
#   bash benchmarks/gpu_check.sh            # outputs under $OUT (default /tmp/out)
#
# Steps (each under `timeout`; a failing step does not stop the others):
#   1. nvidia-smi, python / torch / triton / nvcc versions
#   2. build the C++/CUDA extension in place (setup.py build_ext --inplace, else pip install -e .)
#   3. the whole test suite, GPU tests included: python3 -m pytest -q -rs tests (8 workers with
#      pytest-xdist; the sm_80/sm_90 compile-only test is CI's and is left out); beside it,
#      bench_blocks.py --prewarm fills the compile caches for step 5
#   4. compute-sanitizer memcheck and racecheck over tests/test_cuda_backend.py (if it exists)
#   5. benchmarks/bench_blocks.py --out $OUT/results, then benchmarks/bench_models.py if present
#   6. a short summary (build, tests, sanitizer errors, geometric-mean speedups) printed last
#
# $OUT holds at most 8 files, at most 2 folders deep (what the device tool brings back):
#   check.log  test.log  junit.xml  sanitizer.log  bench.log  results/blocks-<gpu>.{json,md,png}
# plus results/models-<gpu>.* from bench_models.py; beyond 8 files, the least useful (junit.xml,
# the pngs, models md) are packed into $OUT/extra.tar.gz.
#
# Afterwards, on the machine that fetched $OUT: copy results/blocks-<gpu>.{json,md,png} to
# benchmarks/results/ and run `python3 benchmarks/auto_table.py benchmarks/results/blocks-<gpu>.json`
# to write splat/auto_backend.json (backend="auto"'s measured per-op choices); commit both.
#
# Environment:
#   OUT                 output folder (default /tmp/out)
#   GPU_CHECK_SKIP      comma list of steps to skip: build,tests,prewarm,sanitizer,bench,models
#   GPU_CHECK_SECONDS   total wall budget in seconds (default 560)
#   BENCH_ARGS          extra arguments for bench_blocks.py (e.g. "--blocks splat --no-ops")
set -u

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
SKIP=",${GPU_CHECK_SKIP:-},"
TOTAL=${GPU_CHECK_SECONDS:-560}
START=$(date +%s)
CHECK_LOG=$OUT/check.log
: >"$CHECK_LOG"
SCRATCH=$(mktemp -d /tmp/gpu_check.XXXXXX)
MODELS=0
[ -f benchmarks/bench_models.py ] && [[ $SKIP != *,models,* ]] && MODELS=90  # seconds kept for it
BENCH_MIN=200  # seconds the block benchmark is guaranteed, whatever the earlier steps take

log() { echo "$@" | tee -a "$CHECK_LOG"; }
left() { echo $((TOTAL - ($(date +%s) - START))); }
# seconds for a step: min(cap, time left - what the later steps need), or 0
budget() {
    local t=$(($(left) - $2))
    ((t > $1)) && t=$1
    ((t < 0)) && t=0
    echo "$t"
}
skipped() { [[ $SKIP == *,$1,* ]]; }
section() { log ""; log "=== $1 ($(($(date +%s) - START)) s elapsed, $(left) s left)"; }

# ---------------------------------------------------------------------------------------------
section "environment"
{
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    echo
    python3 --version 2>&1
    python3 - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton not importable:", e)
for name in ("pytest_benchmark", "matplotlib", "timm", "hypothesis"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError:
        print(name, "not installed")
EOF
    for TOOL in nvcc compute-sanitizer ninja; do
        command -v "$TOOL" >/dev/null && "$TOOL" --version 2>&1 | tail -n 2 || echo "$TOOL not found"
    done
} >>"$CHECK_LOG" 2>&1
tail -n 25 "$CHECK_LOG"

# ---------------------------------------------------------------------------------------------
BUILD=skipped
section "build the CUDA extension"
if skipped build; then
    log "skipped (GPU_CHECK_SKIP)"
else
    T=$(budget 180 $((BENCH_MIN + MODELS + 90 + 10)))
    ARCH=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # torch takes CUDA_HOME to be nvcc's grandparent folder; where nvcc is a wrapper script (as
    # /usr/local/bin/nvcc on this workplace's machines) that folder has no libcudart and the link
    # fails, so ask nvcc for its toolkit's root. Exported: the tests' JIT builds need it too.
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        echo >"$SCRATCH/empty.cu"
        TOP=$(nvcc --dryrun -c "$SCRATCH/empty.cu" -o "$SCRATCH/empty.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        [ -n "$TOP" ] && [ -d "$TOP" ] && export CUDA_HOME=$(realpath "$TOP")
    fi
    log "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS, timeout ${T}s"
    if ((T < 10)); then
        BUILD="no time"
    elif timeout -k 10 "$T" python3 setup.py build_ext --inplace >>"$CHECK_LOG" 2>&1; then
        BUILD="ok (setup.py build_ext --inplace)"
    else
        log "setup.py build_ext --inplace failed (rc $?); trying pip install --no-build-isolation --no-deps -e ."
        T=$(budget 120 $((BENCH_MIN + MODELS + 90 + 10)))
        if ((T >= 10)) && timeout -k 10 "$T" python3 -m pip install --no-build-isolation --no-deps -e . >>"$CHECK_LOG" 2>&1; then
            BUILD="ok (pip install -e .)"
        else
            BUILD="FAILED (see check.log)"
        fi
    fi
fi
log "build: $BUILD"
BACKENDS=$(python3 -c "import splat; print(splat.backends())" 2>&1 | tail -1)
log "splat.backends(): $BACKENDS"

# ---------------------------------------------------------------------------------------------
TESTS="skipped"
section "test suite"
if skipped tests; then
    log "skipped (GPU_CHECK_SKIP)"
else
    T=$(budget 170 $((BENCH_MIN + MODELS + 10)))
    ARGS=(-q -rs -p no:cacheprovider --durations=15 --junitxml="$OUT/junit.xml")
    python3 -c "import pytest_benchmark" 2>/dev/null && ARGS+=(--benchmark-max-time=0.3 --benchmark-columns=min,median,max,rounds)
    python3 -c "import pytest_timeout" 2>/dev/null && ARGS+=(--timeout=120)
    # Most of a first GPU run is Triton compiling each kernel variant, one process at a time:
    # 8 workers compile 8 at once (pytest-benchmark then runs its cases once, untimed); tests of
    # several-GB tensors share a worker (xdist_group), so they never hold the GPU's memory together.
    python3 -c "import xdist" 2>/dev/null && ARGS+=(-n 8 --dist loadgroup)
    # Compiling for sm_80/sm_90 through a driver stub is CI's check; here every kernel compiles
    # for the device and runs.
    ARGS+=(--ignore=tests/test_triton_compile.py)
    log "python3 -m pytest ${ARGS[*]} tests  (timeout ${T}s)"
    if ((T >= 20)); then
        # Beside the tests, one process per family compiles what the block benchmark will (Triton
        # kernels at its shapes, torch.compile of the references) into Triton's and Inductor's
        # on-disk caches, so that the timed run spends its budget timing.
        PREWARM=()
        if ! skipped bench && ! skipped prewarm; then
            for FAM in splat res2net sk; do
                # shellcheck disable=SC2086
                TORCHINDUCTOR_COMPILE_THREADS=2 timeout -s INT -k 10 "$T" python3 benchmarks/bench_blocks.py \
                    ${BENCH_ARGS:-} --prewarm --blocks "$FAM" --time-budget $((T - 15)) >"$SCRATCH/prewarm-$FAM.log" 2>&1 &
                PREWARM+=($!)
            done
        fi
        TORCHINDUCTOR_COMPILE_THREADS=2 timeout -s INT -k 20 "$T" python3 -m pytest "${ARGS[@]}" tests \
            >"$OUT/test.log" 2>&1
        RC=$?
        for PID in "${PREWARM[@]}"; do
            wait "$PID"
        done
        for FAM in splat res2net sk; do
            [ -f "$SCRATCH/prewarm-$FAM.log" ] && log "prewarm $FAM: $(grep -c '^  prewarm ' "$SCRATCH/prewarm-$FAM.log") jobs; $(tail -n 1 "$SCRATCH/prewarm-$FAM.log")"
        done
        TESTS="rc $RC: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|(passed|failed).* in [0-9.]+s' "$OUT/test.log" | tail -1)"
        ((RC == 124)) && TESTS="$TESTS (TIMED OUT)"
    else
        TESTS="no time"
    fi
fi
log "tests: $TESTS"
JUNIT=""
[ -f "$OUT/junit.xml" ] && JUNIT=$(python3 - "$OUT/junit.xml" 2>&1 <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"              junit: {n['tests']} tests, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
for s in suites:
    for case in s.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            print(f"              FAILED {case.get('classname')}::{case.get('name')}")
EOF
)

# ---------------------------------------------------------------------------------------------
SANITIZER="skipped"
section "compute-sanitizer"
if skipped sanitizer; then
    log "skipped (GPU_CHECK_SKIP)"
elif [ ! -f tests/test_cuda_backend.py ]; then
    SANITIZER="skipped: tests/test_cuda_backend.py does not exist"
    log "$SANITIZER"
elif ! command -v compute-sanitizer >/dev/null; then
    SANITIZER="skipped: compute-sanitizer not found"
    log "$SANITIZER"
else
    : >"$OUT/sanitizer.log"
    SANITIZER=""
    for TOOL in memcheck racecheck; do
        T=$(budget 90 $((BENCH_MIN + MODELS + 10)))
        if ((T < 15)); then
            SANITIZER="$SANITIZER $TOOL: no time;"
            continue
        fi
        echo "=== compute-sanitizer --tool $TOOL (timeout ${T}s)" >>"$OUT/sanitizer.log"
        # No caching allocator under memcheck, so an out-of-bounds access cannot land in a pooled block.
        ENVS=()
        [ "$TOOL" = memcheck ] && ENVS=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
        env "${ENVS[@]}" timeout -s INT -k 15 "$T" compute-sanitizer --tool "$TOOL" \
            python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_backend.py >"$SCRATCH/$TOOL.log" 2>&1
        RC=$?
        # Keep the file small: the errors' first lines and the end of the run.
        { grep -m 200 -E '^========= ' "$SCRATCH/$TOOL.log"; echo "..."; tail -n 40 "$SCRATCH/$TOOL.log"; } >>"$OUT/sanitizer.log"
        SUMMARY=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$SCRATCH/$TOOL.log" | tail -1)
        ((RC == 124)) && SUMMARY="${SUMMARY:-no summary} (TIMED OUT)"
        SANITIZER="$SANITIZER $TOOL rc $RC: ${SUMMARY:-no summary};"
    done
    log "sanitizer:$SANITIZER"
fi

# ---------------------------------------------------------------------------------------------
BENCH="skipped"
section "benchmarks/bench_blocks.py"
: >"$OUT/bench.log"
if skipped bench; then
    log "skipped (GPU_CHECK_SKIP)"
else
    T=$(budget 420 $((MODELS + 10)))
    BT=$((T - 30))  # the script's own budget, leaving time to write its files
    log "python3 benchmarks/bench_blocks.py --out $OUT/results --time-budget $BT ${BENCH_ARGS:-}  (timeout ${T}s)"
    if ((BT >= 30)); then
        # shellcheck disable=SC2086
        timeout -s INT -k 30 "$T" python3 benchmarks/bench_blocks.py --out "$OUT/results" --time-budget "$BT" \
            ${BENCH_ARGS:-} >>"$OUT/bench.log" 2>&1
        RC=$?
        BENCH="rc $RC"
        ((RC == 124)) && BENCH="$BENCH (TIMED OUT)"
    else
        BENCH="no time"
    fi
fi
log "bench_blocks: $BENCH"

if [ "$MODELS" -gt 0 ]; then
    section "benchmarks/bench_models.py"
    T=$(budget 300 10)
    MARGS=()
    HELP=$(python3 benchmarks/bench_models.py --help 2>/dev/null)
    grep -q -- "--out" <<<"$HELP" && MARGS+=(--out "$OUT/results")
    grep -q -- "--time-budget" <<<"$HELP" && MARGS+=(--time-budget $((T - 20)))
    if ((T >= 30)); then
        echo "=== bench_models.py ${MARGS[*]}" >>"$OUT/bench.log"
        timeout -s INT -k 15 "$T" python3 benchmarks/bench_models.py "${MARGS[@]}" >>"$OUT/bench.log" 2>&1
        log "bench_models: rc $?"
    else
        log "bench_models: no time"
    fi
fi

# ---------------------------------------------------------------------------------------------
# At most 8 files under $OUT, 2 folders deep: the most useful stay, the rest go into extra.tar.gz.
python3 - "$OUT" <<'EOF'
import fnmatch, sys, tarfile
from pathlib import Path
out = Path(sys.argv[1])
files = sorted(p for p in out.rglob("*") if p.is_file())
order = ["check.log", "test.log", "bench.log", "blocks-*.json", "models-*.json", "blocks-*.md",
         "sanitizer.log", "blocks-*.png", "models-*.md", "models-*.png", "junit.xml"]
rank = lambda p: next((i for i, k in enumerate(order) if fnmatch.fnmatch(p.name, k)), len(order))
files.sort(key=lambda p: (rank(p), str(p)))
if len(files) > 8:
    keep, extra = files[:7], files[7:]
    with tarfile.open(out / "extra.tar.gz", "w:gz") as tar:
        for p in extra:
            tar.add(p, arcname=str(p.relative_to(out)))
            p.unlink()
    print(f"packed {len(extra)} files into {out / 'extra.tar.gz'}: {[str(p.relative_to(out)) for p in extra]}")
for d in sorted(out.rglob("*"), reverse=True):
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
EOF
rm -rf "$SCRATCH"

# ---------------------------------------------------------------------------------------------
section "summary"
{
    echo "build:        $BUILD"
    echo "backends:     $BACKENDS"
    echo "tests:        $TESTS"
    [ -n "$JUNIT" ] && echo "$JUNIT"
    echo "sanitizer:    $SANITIZER"
    echo "bench_blocks: $BENCH"
    grep -E "NOT TIMED" "$OUT/bench.log" 2>/dev/null | head -20
    for J in "$OUT"/results/blocks-*.json; do
        [ -f "$J" ] || continue
        python3 - "$J" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
import bench_blocks as b
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: {d['device']}, torch {d['torch']}, triton {d['triton']}, copy {d.get('copy_gbs')} GB/s, "
      f"{len(d['records'])} records, {len(d['skipped'])} skipped")
h, r = b.geomean_table(d["records"])
print("geometric-mean speedup over eager:")
print(b.fmt_table(h, r) if r else "  (nothing timed)")
EOF
    done
    echo "files under $OUT:"
    (cd "$OUT" && find . -type f | sort)
    echo "elapsed: $(($(date +%s) - START)) s"
} 2>&1 | tee -a "$CHECK_LOG"
