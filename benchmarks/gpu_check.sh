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
#   ncu      DRAM bytes per kernel when ncu works, else a note
#   tests    the Triton kernel tests, then the `-m gpu` tests (collection errors do not stop them)
#   pack     summary.json, summary.md; logs/ into logs.tar.gz
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

# step NAME CAP RESERVE CMD...: runs CMD under timeout min(CAP, time left - RESERVE) with SIGINT
# (then KILL 15 s later); output to logs/NAME.log; a line per step in logs/steps.log.
step() {
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left=$((DEADLINE - SECONDS - reserve))
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

# adapterfast importable without network: an editable install (no deps, no C++ build), else a
# sitecustomize shim that maps adapterfast.kernels onto kernels/ (as setup.py's package_dir does)
if ! "$PY" -c "import adapterfast.kernels" > /dev/null 2>&1; then
    "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index -q > "$LOGS/install.log" 2>&1 \
        || note "editable install failed (see logs/install.log)"
fi
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

if [ "$DRY" = 1 ]; then CAP=120; DEADLINE="${GPU_CHECK_SECONDS:-3000}"; else CAP=0; fi
# caps (s): env 45, warm 90, correct 75, kernels 75, ops 185, ncu 25, tests 45 = the 540 s deadline;
# each step's reserve is the caps after it, so a slow step cannot eat the later ones (dry run: 120 each)
step env      $((CAP ? CAP : 45))  495 "$PY" -m benchmarks.gpu_check env
step warm     $((CAP ? CAP : 90))  405 "$PY" -m benchmarks.gpu_check_speed warm
step correct  $((CAP ? CAP : 75))  330 "$PY" -m benchmarks.gpu_check_correct
step kernels  $((CAP ? CAP : 75))  255 "$PY" -m benchmarks.gpu_check_speed kernels
step ops      $((CAP ? CAP : 185)) 70  "$PY" -m benchmarks.gpu_check_speed ops

if [ "$DRY" != 1 ] && command -v ncu > /dev/null 2>&1; then
    step ncu 25 45 ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
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
    "$PY" -c "from benchmarks.gpu_check import record; record('ncu', note='ncu not run: not found or dry run')"
fi

PYTEST_ARGS=(-q -rfEs -p no:cacheprovider --continue-on-collection-errors)
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_ARGS+=(--timeout=60)
if [ "$DRY" = 1 ]; then KERNEL_TESTS=(-k "philox or empty_batch"); else KERNEL_TESTS=(); fi
step tests_kernels $((CAP ? CAP : 30)) 15 "$PY" -m pytest tests/test_triton_kernels.py "${KERNEL_TESTS[@]}" \
    "${PYTEST_ARGS[@]}" --junitxml="$LOGS/tests_kernels.xml"
if [ "$DRY" = 1 ]; then GPU_TESTS=(tests/test_triton_kernels.py tests/test_compile_check.py); else GPU_TESTS=(tests); fi
step tests_gpu $((CAP ? CAP : 15)) 0 "$PY" -m pytest "${GPU_TESTS[@]}" -m gpu "${PYTEST_ARGS[@]}" \
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
