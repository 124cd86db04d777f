#!/usr/bin/env bash
# The GPU check, in one go, inside 8 minutes and without network:
#   1. record the machine (nvidia-smi, versions) and make adapterfast importable (editable install,
#      no deps, no build isolation, no C++ build);
#   2. the GPU tests: `pytest tests -m gpu`, then the Triton kernel tests (they run on CUDA when
#      there is a GPU);
#   3. the op benchmarks in quick mode on CUDA (bf16, fp16, relu, gelu);
#   4. the end-to-end training step;
#   5. the markdown table and the PNG charts;
#   6. a torch.compile max-autotune spot check at one shape, with the time left.
# Everything goes to $OUT (else benchmarks/results/): logs, junit XML, ops.jsonl, e2e.jsonl, PNGs,
# summary.txt. Each step has its own timeout and the whole script a deadline, so a hung step costs
# its slot, not the run. Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
DEADLINE="${GPU_CHECK_SECONDS:-450}"   # 8 minutes minus a margin for start-up and copying results back
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PY OUT_DIR

export ADAPTERFAST_BUILD_CPU=0 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) python=$PY out=$OUT_DIR" | tee "$SUMMARY"

# step NAME CAP_SECONDS RESERVE_SECONDS CMD...: runs CMD with timeout min(CAP, time left - RESERVE),
# logs to $OUT_DIR/NAME.log, appends "NAME rc=.. seconds=.." to summary.txt; skips if too little time.
step() {
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left=$((DEADLINE - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        echo "$name skipped (out of time: ${SECONDS}s used of ${DEADLINE}s)" | tee -a "$SUMMARY"
        return 0
    fi
    local started=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    export STEP_LIMIT="$limit"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out)"
    echo "$name rc=$rc seconds=$((SECONDS - started))$note" | tee -a "$SUMMARY"
    return 0
}

# 1. the machine, and adapterfast importable without network
{
    nvidia-smi || echo "nvidia-smi failed"
    echo
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version --format=csv || true
} > "$OUT_DIR/nvidia-smi.txt" 2>&1
step install 120 0 "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index -q
if ! "$PY" -c "import adapterfast.kernels" > /dev/null 2>&1; then
    # No editable install (old pip/setuptools): map adapterfast.kernels onto kernels/ by hand.
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
    export PYTHONPATH="$ROOT:$SHIM:${PYTHONPATH:-}"
    echo "install fallback: PYTHONPATH=$PYTHONPATH" | tee -a "$SUMMARY"
fi
"$PY" - > "$OUT_DIR/versions.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "transformers", "peft", "adapters", "adapterfast"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as error:
        print(name, "not importable:", type(error).__name__, error)
try:
    import adapterfast
    print("backends", adapterfast.backends())
except Exception as error:
    print("adapterfast.backends() failed:", error)
EOF
cat "$OUT_DIR/versions.txt"

# 2. tests on the GPU (bf16 included: the gpu-marked tests and the kernel tests cover it)
step tests_gpu 150 260 "$PY" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT_DIR/tests_gpu.xml"
step tests_kernels 110 200 "$PY" -m pytest tests/test_triton_kernels.py -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT_DIR/tests_kernels.xml"

# 3. op benchmarks, quick mode (default torch.compile mode; max-autotune is step 6). No new shape
#    is started in the last 40 s of the step's limit, so what was measured is written.
step bench_quick 150 95 bash -c 'exec "$PY" -m benchmarks --device cuda --quick --out "$OUT_DIR" --no-progress \
    --time-budget $((STEP_LIMIT - 40))'

# 4. end-to-end training step
step e2e 60 55 "$PY" -m benchmarks.e2e --device cuda --quick --out "$OUT_DIR"

# 5. tables and charts for the README
step table 20 35 "$PY" -m benchmarks.table --results "$OUT_DIR" --device cuda
cp "$OUT_DIR/table.log" "$OUT_DIR/table.md" 2>/dev/null || true
step plot 25 15 "$PY" -m benchmarks.plot --results "$OUT_DIR" --device cuda

# 6. max-autotune at one shape, with what time is left (its own directory, its table in the log)
step bench_max_autotune 90 0 "$PY" -m benchmarks --device cuda --shapes 16384,4096,64 --dtype bf16 \
    --providers eager,compile,compile_max_autotune,adapterfast --rounds 2 --out "$OUT_DIR/max_autotune" --no-progress

echo "gpu_check done in ${SECONDS}s" | tee -a "$SUMMARY"
