#!/usr/bin/env bash
# The GPU check: the most information from one command of at most 10 minutes, on a bare GPU machine
# without network (written for an H200 with torch 2.11 / triton 3.6). Usage:
#   bash benchmarks/gpu_check.sh                       results in $OUT (else benchmarks/results/gpu_check)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   the same steps on CPU: interpreter, tiny shapes
# Steps (each its own process under `timeout -s INT`, writing results.jsonl as it goes, so a killed
# step keeps what it measured; a failing step never stops the run):
#   env      versions (a missing optional package is recorded, not fatal), GPU, both TF32 APIs,
#            copy bandwidth, bf16 GEMM TFLOP/s                     (benchmarks/gpu_check.py)
#   warm     every timed kernel variant compiled in parallel processes   (gpu_check_speed.py)
#   correct  accuracy at N=16384 d=4096 r=16/64/256 in bf16/fp16/fp32 vs float64, dropout mask vs
#            Philox, bitwise backward, N*d > 2^31, strided inputs, the grouped op's kernels
#                                                                    (gpu_check_correct.py)
#   kernels  per-kernel timings and fractions of the copy-bandwidth floor  (gpu_check_speed.py)
#   ops      eager, addmm, torch.compile default/max-autotune, adapterfast; CUDA-graph replay;
#            the grouped op vs the loop over adapters and vs one adapter
#   host     device time (profiler) and host time per call, eager vs adapterfast, adapterfast's
#            layers one by one, a cProfile of its training step       (gpu_check_host.py)
#   ncu      DRAM bytes per kernel when ncu works, else a note
#   tests    the Triton kernel tests (pytest-xdist when present), then the `-m gpu` tests of the
#            files that have them
#   pack     summary.json, summary.md; logs/ into logs.tar.gz
# GPU_CHECK_SKIP="correct ncu" skips the steps named (a rerun that needs only some of them);
# GPU_CHECK_SECONDS (default 540) is the steps' deadline, counted from after the install.
# Files out (<= 8): results.jsonl summary.json summary.md logs.tar.gz.
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT_DIR="${OUT:-$ROOT/benchmarks/results/gpu_check}"
LOGS="$OUT_DIR/logs"
mkdir -p "$LOGS"
rm -f "$OUT_DIR/results.jsonl"
DEADLINE="${GPU_CHECK_SECONDS:-540}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export OUT_DIR GPU_CHECK_DRY_RUN="$DRY" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ADAPTERFAST_BUILD_CPU=0 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT_DIR/.triton-cache}"
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

note() { echo "$*" | tee -a "$LOGS/steps.log"; }

skipped() { case " ${GPU_CHECK_SKIP:-} " in *" $1 "*) return 0;; esac; return 1; }

# reserve NAME: the caps of the steps after NAME that will run, so a slow step cannot eat them.
reserve() {
    local total=0 seen=0 name
    for name in "${ORDER[@]}"; do
        [ "$seen" = 1 ] && ! skipped "$name" && total=$((total + CAPS[$name]))
        [ "$name" = "$1" ] && seen=1
    done
    echo "$total"
}

# step NAME CMD...: runs CMD under timeout min(its cap, time left - reserve NAME) with SIGINT
# (then KILL 15 s later); output to logs/NAME.log; a line per step in logs/steps.log.
step() {
    local name="$1"
    shift
    if skipped "$name"; then
        note "$name skipped: GPU_CHECK_SKIP"
        return 0
    fi
    local cap="${CAPS[$name]}"
    local left=$((DEADLINE - SECONDS - $(reserve "$name")))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        note "$name skipped: out of time (${SECONDS}s of ${DEADLINE}s used)"
        return 0
    fi
    local started=$SECONDS
    export STEP_LIMIT="$limit"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local why=""
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; } && why=" (timed out)"
    case "$name" in tests*) [ "$rc" -eq 5 ] && why=" (no tests selected)";; esac
    note "$name rc=$rc seconds=$((SECONDS - started))$why"
}

pack() {
    "$PY" -m benchmarks.gpu_check pack >> "$LOGS/steps.log" 2>&1 || note "pack failed"
    tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" logs 2>/dev/null && rm -rf "$LOGS"
    rm -rf "$OUT_DIR/.triton-cache" "$OUT_DIR/.shim"
}
trap pack EXIT

note "gpu_check start $(date -u +%Y-%m-%dT%H:%M:%SZ) dry_run=$DRY python=$PY out=$OUT_DIR"
if [ "$DRY" != 1 ]; then
    nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
fi

# adapterfast importable without network or an install: a sitecustomize shim that maps
# adapterfast.kernels onto kernels/ (as setup.py's package_dir does). An editable install is not
# tried: on the GPU machine's pip (2026-12-04) it failed after ~25 s, wanting setuptools from an index.
if ! "$PY" -c "import adapterfast.kernels" > /dev/null 2>&1; then
    SHIM="$OUT_DIR/.shim"
    mkdir -p "$SHIM"
    cat > "$SHIM/sitecustomize.py" <<EOF
import importlib.abc, importlib.util, sys
class _Kernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "adapterfast.kernels":
            return importlib.util.spec_from_file_location(
                name, "$ROOT/kernels/__init__.py", submodule_search_locations=["$ROOT/kernels"])
        return None
sys.meta_path.insert(0, _Kernels())
EOF
    export PYTHONPATH="$SHIM:$PYTHONPATH"
    note "adapterfast.kernels mapped by a sitecustomize shim"
fi
"$PY" -c "import adapterfast.kernels" > /dev/null 2>> "$LOGS/install.log" || note "adapterfast.kernels NOT importable"

# Each step's cap in seconds: they sum to the 540 s deadline (GPU runs of 2026-12-04: env 16, warm
# 11-15, correct 45, kernels 12-15, ops 55-94, host 13, ncu 8-9; tests_kernels 31 on 8 workers;
# tests_gpu passed 58 in 35 s and was cut, so it now runs on the workers too).
# The clock starts here, after the install.
ORDER=(env warm correct kernels ops host ncu tests_kernels tests_gpu)
declare -A CAPS=([env]=45 [warm]=45 [correct]=75 [kernels]=45 [ops]=115 [host]=60 [ncu]=25 [tests_kernels]=80
                 [tests_gpu]=50)
if [ "$DRY" = 1 ]; then
    for name in "${ORDER[@]}"; do CAPS[$name]=120; done
    DEADLINE="${GPU_CHECK_SECONDS:-3000}"
fi
SECONDS=0
step env      "$PY" -m benchmarks.gpu_check env
step warm     "$PY" -m benchmarks.gpu_check_speed warm
step correct  "$PY" -m benchmarks.gpu_check_correct
step kernels  "$PY" -m benchmarks.gpu_check_speed kernels
step ops      "$PY" -m benchmarks.gpu_check_speed ops
step host     "$PY" -m benchmarks.gpu_check_host host

if [ "$DRY" != 1 ] && command -v ncu > /dev/null 2>&1 && ! skipped ncu; then
    step ncu ncu --clock-control none --kernel-name regex:adapter_ --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        --csv --log-file "$LOGS/ncu.csv" "$PY" -m benchmarks.gpu_check_speed ncu_target
    "$PY" - <<'EOF' >> "$LOGS/steps.log" 2>&1
import csv, os
from benchmarks.gpu_check import record
path = os.path.join(os.environ["OUT_DIR"], "logs", "ncu.csv")
rows = [r for r in csv.DictReader(line for line in open(path) if line.startswith('"'))] if os.path.exists(path) else []
for r in rows:
    record("ncu", kernel=r.get("Kernel Name", "")[:60], metric=r.get("Metric Name"), unit=r.get("Metric Unit"),
           value=r.get("Metric Value"))
if not rows:
    record("ncu", note="ncu produced no rows (see logs/ncu.log)")
EOF
else
    "$PY" -c "from benchmarks.gpu_check import record; record('ncu', note='ncu not run: skipped, not found, or dry run')"
fi

PYTEST_ARGS=(-q -rfEs -p no:cacheprovider --continue-on-collection-errors)
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_ARGS+=(--timeout=60)
if [ "$DRY" = 1 ]; then KERNEL_TESTS=(-k "philox or empty_batch"); else KERNEL_TESTS=(); fi
# Each kernel test compiles its own variant: spread the tests over the machine's cores when xdist is there.
WORKERS=()
if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2> /dev/null; then WORKERS=(-n 8); fi
step tests_kernels "$PY" -m pytest tests/test_triton_kernels.py "${KERNEL_TESTS[@]}" "${WORKERS[@]}" \
    "${PYTEST_ARGS[@]}" --junitxml="$LOGS/tests_kernels.xml"
# Only the files that have `gpu` tests: collecting all of tests/ takes longer than the step's cap.
if [ "$DRY" = 1 ]; then GPU_TESTS=(tests/test_triton_kernels.py tests/test_compile_check.py)
else mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py); fi
step tests_gpu "$PY" -m pytest "${GPU_TESTS[@]}" -m gpu "${WORKERS[@]}" "${PYTEST_ARGS[@]}" \
    --junitxml="$LOGS/tests_gpu.xml"
"$PY" - <<'EOF' >> "$LOGS/steps.log" 2>&1
import os, xml.etree.ElementTree as ET
from benchmarks.gpu_check import record
for name in ("tests_kernels", "tests_gpu"):
    path = os.path.join(os.environ["OUT_DIR"], "logs", name + ".xml")
    if os.path.exists(path):
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")}
        record("tests", name=name, seconds=suite.get("time"), **counts)
    else:
        record("tests", name=name, note="no junit file: the step did not run or was killed")
EOF
note "gpu_check done in ${SECONDS}s"
