#!/usr/bin/env bash
# One short, prepared run on a machine with an NVIDIA GPU: the Triton
# kernels' tests on CUDA (compiled, no interpreter), SASA's and SAN's, the layer benchmark
# beside cuDNN's convolution at the ResNet-50/FPN/head shapes of a 640x640
# batch of 8 with both width specialisations (W % 16 == 0 and not: W=80 and
# W=84, ...), the static cost model's predictions beside the measured
# times (calibration.md), and SAN's Triton operators timed beside their
# PyTorch path. Everything goes to one folder; the steps share a
# budget of 570 s (under 10 minutes on an H100), later optional steps are
# skipped when it runs out.
#
#   bash tools/gpu_check.sh [OUT_DIR]       # default: $OUT, else work_dirs/gpu_check
#   bash tools/gpu_check.sh --dry-run [OUT_DIR]  # print the steps, run nothing (any machine)
#   bash tools/gpu_check.sh --fetch-wheels  # on a machine with PyPI: fill build/gpu_wheels/
#   bash tools/gpu_check.sh --help
#
# Needs Python with torch (a CUDA build) and triton (tested against the lent
# machines' Python 3.12, torch 2.11+cu130, triton 3.6). mmengine, pytest and
# their pure-Python dependencies are taken from build/gpu_wheels/ when they
# are not installed (a GPU node without a package registry: fetch the wheels
# elsewhere, copy the folder along). mmdet and mmcv are optional (step 11):
# the layer and its kernels use neither. PYTHON picks the interpreter (default: python3).
#
# Steps (budget in seconds, each also bounded by what is left):
#   1. environment (GPU, versions)                                  -> env.txt
#   2. tests/test_layers/test_triton_kernels.py on CUDA (150)       -> triton_tests.log/.xml
#   3. benchmark, bf16, Triton and the per-offset PyTorch path, at
#      the 640 shapes (presets resnet50-640, fpn-head-640) (200)    -> benchmark/
#   4. benchmark, bf16, Triton, the same shapes with W's
#      divisibility by 16 flipped (*-wflip presets) (100)           -> benchmark-wflip/
#   5. the cost model's predictions (docs/benchmarks/gpu_cost_model.json,
#      sm_90) beside every measured shape                           -> calibration.md/.json
#   6. the GPU targets, met or not                                -> targets.md
#   7. SAN's Triton ops and layers against the reference on CUDA
#      (tests/test_layers/test_san_ops.py, test_san_attention.py, -k triton) (50)
#                                                                   -> san_tests.log/.xml
#   8. SAN's ops, Triton beside PyTorch, forward and forward+backward,
#      batch 8, 256 channels, 80x80, window 7, bf16 (40)             -> san_ops.md/.json
#   9. optional, if at least 60 s are left: channels-last inputs, Triton
#      (vector loads) beside cuDNN's NHWC convolution, bf16          -> benchmark-channels-last/
#  10. optional, if at least 60 s are left: FlexAttention peer, bf16 -> benchmark-flex/
#  11. optional, with mmdet and mmcv's CUDA ops and 120 s left: a training
#      step of each Table 2 model, bf16                              -> benchmark-models/
# gpu_check.log has all of it as it ran. Exit status: 0 when the tests
# (SASA's and SAN's) and the main benchmark passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/build/gpu_wheels"
BUDGET=570
MODEL_JSON="$ROOT/docs/benchmarks/gpu_cost_model.json"
# Distributions the layer tests and the benchmark need beyond torch and triton.
CARRIED=(mmengine addict yapf termcolor rich markdown-it-py mdurl pygments pyyaml packaging
         platformdirs numpy pytest pluggy iniconfig tomli)

DRY=0
case "${1:-}" in
  -h|--help)
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0 ;;
  --dry-run)
    DRY=1; shift ;;
  --fetch-wheels)
    PYVER="${GPU_PYTHON_VERSION:-3.12}"
    mkdir -p "$WHEELS"
    "$PY" -m pip download -q -d "$WHEELS" --no-deps --only-binary :all: \
      --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      mmengine==0.10.7 "${CARRIED[@]:1}"
    echo "[gpu_check] wheels for Python $PYVER in $WHEELS ($(du -sh "$WHEELS" | cut -f1))"
    exit 0 ;;
  -*)
    echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

OUT_DIR="${1:-${OUT:-work_dirs/gpu_check}}"
say() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
# run BUDGET_S CMD...: CMD under `timeout` of its budget or what is left,
# whichever is less; in a dry run only printed.
run() {
  local budget=$1; shift
  local limit; limit=$(left)
  (( budget < limit )) && limit=$budget
  if (( DRY )); then
    echo "+ timeout $budget $*"
    return 0
  fi
  if (( limit < 10 )); then
    say "skipped (budget spent): $*"
    return 124
  fi
  timeout "$limit" "$@"
}

BENCH=(tools/benchmark.py --device cuda --dtypes bfloat16)
SAN_TESTS=(tests/test_layers/test_san_ops.py tests/test_layers/test_san_attention.py -k triton)
SAN_TIMING=(tools/analysis_tools/san_op_timing.py --shape 8,256,80,80 --window 7
            --dtype bfloat16 --repeats 10)
if (( DRY )); then
  say "dry run: the steps tools/gpu_check.sh would run (outputs in $OUT_DIR)"
  run 150 "$PY" -m pytest tests/test_layers/test_triton_kernels.py -m 'not slow' -q
  run 200 "$PY" "${BENCH[@]}" --repeats 5 --impls triton torch --preset resnet50-640 \
    --preset fpn-head-640 --out "$OUT_DIR/benchmark"
  run 100 "$PY" "${BENCH[@]}" --repeats 5 --impls triton --preset resnet50-640-wflip \
    --preset fpn-head-640-wflip --out "$OUT_DIR/benchmark-wflip"
  run 20 "$PY" tools/analysis_tools/gpu_cost_model.py --model-json "$MODEL_JSON" \
    --calibrate "$OUT_DIR/benchmark/benchmark.json" "$OUT_DIR/benchmark-wflip/benchmark.json" \
    --out "$OUT_DIR"
  run 50 "$PY" -m pytest "${SAN_TESTS[@]}" -q
  run 40 "$PY" "${SAN_TIMING[@]}" --out "$OUT_DIR"
  run 90 "$PY" "${BENCH[@]}" --repeats 5 --impls triton --memory-format channels_last \
    --preset resnet50-640 --preset fpn-head-640 --out "$OUT_DIR/benchmark-channels-last"
  run 90 "$PY" "${BENCH[@]}" --repeats 5 --impls triton flex --preset resnet50-640 \
    --preset fpn-head-640 --out "$OUT_DIR/benchmark-flex"
  echo "(step 11 only with mmdet and mmcv's CUDA ops:)"
  echo "+ timeout 110 $PY ${BENCH[*]} --models --no-layers --repeats 3 --out $OUT_DIR/benchmark-models"
  exit 0
fi

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { say "ERROR: torch sees no CUDA device (this script is for a GPU machine)"; exit 2; }

# Unpack the carried wheels of whatever is not importable (never shadow
# what is installed).
SITE="$(mktemp -d)"
"$PY" - "$WHEELS" "$SITE" <<'PY'
import glob, importlib.util, os, sys, zipfile
wheels, site = sys.argv[1:]
modules = {'mmengine': 'mmengine', 'addict': 'addict', 'yapf': 'yapf', 'termcolor': 'termcolor',
           'rich': 'rich', 'markdown_it_py': 'markdown_it', 'mdurl': 'mdurl',
           'pygments': 'pygments', 'pyyaml': 'yaml', 'packaging': 'packaging',
           'platformdirs': 'platformdirs', 'numpy': 'numpy', 'pytest': 'pytest',
           'pluggy': 'pluggy', 'iniconfig': 'iniconfig', 'tomli': 'tomli'}
for wheel in sorted(glob.glob(os.path.join(wheels, '*.whl'))):
    dist = os.path.basename(wheel).split('-')[0].lower()
    module = modules.get(dist)
    if module and importlib.util.find_spec(module) is None:
        zipfile.ZipFile(wheel).extractall(site)
        print(f'[gpu_check] using carried {os.path.basename(wheel)}')
PY
export PYTHONPATH="$ROOT:${PYTHONPATH:+$PYTHONPATH:}$SITE"
export PYTHONWARNINGS=ignore

say "1. environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name()); print("triton", triton.__version__)'
  "$PY" -c 'import mmengine; print("mmengine", mmengine.__version__)'
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$OUT_DIR/env.txt"

say "2. Triton kernels against the reference, on CUDA (no interpreter)"
TRITON_INTERPRET=0 run 150 "$PY" -m pytest tests/test_layers/test_triton_kernels.py \
  -m 'not slow' -q -p no:cacheprovider --junitxml "$OUT_DIR/triton_tests.xml" \
  2>&1 | tee "$OUT_DIR/triton_tests.log"
TESTS_RC=${PIPESTATUS[0]}
say "tests exit code $TESTS_RC ($(left) s of the budget left)"

say "3. benchmark, bf16: Triton and the per-offset PyTorch path beside cuDNN, 640 shapes (W=80, ...)"
run 200 "$PY" "${BENCH[@]}" --repeats 5 --impls triton torch --preset resnet50-640 \
  --preset fpn-head-640 \
  --out "$OUT_DIR/benchmark"
BENCH_RC=$?
say "benchmark exit code $BENCH_RC ($(left) s left)"

say "4. benchmark, bf16: Triton beside cuDNN, the widths' divisibility by 16 flipped (W=84, ...)"
run 100 "$PY" "${BENCH[@]}" --repeats 5 --impls triton --preset resnet50-640-wflip \
  --preset fpn-head-640-wflip --out "$OUT_DIR/benchmark-wflip"
say "flipped-width benchmark exit code $? ($(left) s left)"

say "5. calibration: measured beside the cost model ($MODEL_JSON, sm_90)"
MEASURED=()
for f in "$OUT_DIR/benchmark/benchmark.json" "$OUT_DIR/benchmark-wflip/benchmark.json"; do
  [[ -f "$f" ]] && MEASURED+=("$f")
done
if [[ ${#MEASURED[@]} -gt 0 && -f "$MODEL_JSON" ]]; then
  "$PY" tools/analysis_tools/gpu_cost_model.py --model-json "$MODEL_JSON" \
    --calibrate "${MEASURED[@]}" --out "$OUT_DIR"
else
  say "no calibration: benchmark JSON or $MODEL_JSON missing"
fi

say "6. targets"
"$PY" - "$OUT_DIR" <<'PY' | tee "$OUT_DIR/targets.md"
import json, os, sys
out = sys.argv[1]
path = os.path.join(out, 'benchmark', 'benchmark.json')
if not os.path.exists(path):
    sys.exit('no benchmark.json: the benchmark did not finish')
rows = [r for r in json.load(open(path))['rows'] if 'time_ratio' in r]
print('| shape at 640 (batch 8), bf16 | Triton / cuDNN time (<= 1.5) | '
      'per-offset / Triton time (>= 10) | Triton / cuDNN extra memory |')
print('| --- | --- | --- | --- |')
for r in rows:
    if r['dtype'] != 'bfloat16' or not r['impl'].startswith('triton'):
        continue
    peer = next((p for p in rows if p['shape'] == r['shape'] and p['dtype'] == r['dtype']
                 and p['preset'] == r['preset'] and p['impl'].startswith('torch')), None)
    speedup = f"{peer['time_s'] / r['time_s']:.1f}" if peer else 'n/a'
    print(f"| {r['preset']} {tuple(r['shape'])} | {r['time_ratio']:.2f} | {speedup} "
          f"| {r['memory_ratio']:.2f} |")
PY

say "7. SAN's Triton ops and layers against the reference, on CUDA (no interpreter)"
TRITON_INTERPRET=0 run 50 "$PY" -m pytest "${SAN_TESTS[@]}" -q -p no:cacheprovider \
  --junitxml "$OUT_DIR/san_tests.xml" 2>&1 | tee "$OUT_DIR/san_tests.log"
SAN_TESTS_RC=${PIPESTATUS[0]}
say "SAN tests exit code $SAN_TESTS_RC ($(left) s left)"

say "8. SAN's ops, bf16: Triton beside the PyTorch path at batch 8, 256 channels, 80x80"
TRITON_INTERPRET=0 run 40 "$PY" "${SAN_TIMING[@]}" --out "$OUT_DIR"
say "SAN timing exit code $? ($(left) s left)"

if (( $(left) >= 60 )); then
  say "9. benchmark, bf16: channels-last inputs, Triton beside cuDNN's NHWC convolution"
  run 90 "$PY" "${BENCH[@]}" --repeats 5 --impls triton --memory-format channels_last \
    --preset resnet50-640 --preset fpn-head-640 --out "$OUT_DIR/benchmark-channels-last"
  say "channels-last benchmark exit code $? ($(left) s left)"
else
  say "9. channels-last benchmark skipped ($(left) s left)"
fi

if (( $(left) >= 60 )); then
  say "10. benchmark, bf16: FlexAttention peer (exact SASA mask and q.r) at the 640 shapes"
  run 90 "$PY" "${BENCH[@]}" --repeats 5 --impls triton flex --preset resnet50-640 \
    --preset fpn-head-640 \
    --out "$OUT_DIR/benchmark-flex"
  say "flex benchmark exit code $?"
else
  say "10. FlexAttention peer skipped ($(left) s left)"
fi

if "$PY" -c 'import mmdet, mmcv.ops' 2>/dev/null && (( $(left) >= 120 )); then
  say "11. benchmark, bf16: a training step of each Table 2 model (mmdet and mmcv are here)"
  run 110 "$PY" "${BENCH[@]}" --models --no-layers --repeats 3 --out "$OUT_DIR/benchmark-models"
  say "model benchmark exit code $?"
else
  say "11. model training steps skipped (needs mmdet and mmcv's CUDA ops, and 120 s; $(left) s left)"
fi

say "done in $((SECONDS - START)) s; outputs in $OUT_DIR"
[[ $TESTS_RC -eq 0 && $SAN_TESTS_RC -eq 0 && $BENCH_RC -eq 0 ]]
