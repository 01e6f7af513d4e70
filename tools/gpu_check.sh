#!/usr/bin/env bash
# One short, prepared run on a machine with an NVIDIA GPU: the Triton
# kernels' tests on CUDA (compiled, no interpreter), then the GPU benchmark
# beside cuDNN's convolution. Everything goes to one folder; it finishes in
# about 8 minutes on an H100/H200-class GPU.
#
#   bash tools/gpu_check.sh [OUT_DIR]      # default: $OUT, else work_dirs/gpu_check
#   bash tools/gpu_check.sh --fetch-wheels # on a machine with PyPI: fill build/gpu_wheels/
#
# Needs Python with torch (a CUDA build) and triton. mmengine, pytest and
# their pure-Python dependencies are taken from build/gpu_wheels/ when they
# are not installed (a GPU node without a package registry: fetch the wheels
# elsewhere, copy the folder along). mmdet and mmcv are optional: with them
# the Table 2 models' training step is timed too; the layer and its kernels
# need neither. PYTHON picks the interpreter (default: python3).
#
# Outputs in OUT_DIR: env.txt (GPU, versions), triton_tests.log and .xml,
# benchmark/ and benchmark-flex/ (table, benchmark.json, benchmark.png when
# matplotlib is there), targets.md (the issue's GPU targets, met or not),
# gpu_check.log (all of the above as it ran).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/build/gpu_wheels"
# Distributions the layer tests and the benchmark need beyond torch and triton.
CARRIED=(mmengine addict yapf termcolor rich markdown-it-py mdurl pygments pyyaml packaging
         platformdirs numpy pytest pluggy iniconfig tomli)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  PYVER="${GPU_PYTHON_VERSION:-3.12}"
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q -d "$WHEELS" --no-deps --only-binary :all: \
    --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    mmengine==0.10.7 "${CARRIED[@]:1}"
  echo "[gpu_check] wheels for Python $PYVER in $WHEELS ($(du -sh "$WHEELS" | cut -f1))"
  exit 0
fi

OUT_DIR="${1:-${OUT:-work_dirs/gpu_check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
say() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
START=$SECONDS

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

say "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name()); print("triton", triton.__version__)'
  "$PY" -c 'import mmengine; print("mmengine", mmengine.__version__)'
  "$PY" -c 'import mmdet, mmcv; print("mmdet", mmdet.__version__, "mmcv", mmcv.__version__)' 2>/dev/null \
    || echo "mmdet/mmcv: not installed (model-level benchmark skipped)"
} | tee "$OUT_DIR/env.txt"

say "Triton kernels against the reference, on CUDA (no interpreter)"
TRITON_INTERPRET=0 timeout 240 "$PY" -m pytest tests/test_layers/test_triton_kernels.py \
  -m 'not slow' -q -p no:cacheprovider --junitxml "$OUT_DIR/triton_tests.xml" \
  2>&1 | tee "$OUT_DIR/triton_tests.log"
TESTS_RC=${PIPESTATUS[0]}
say "tests exit code $TESTS_RC"

say "benchmark: layers at the ResNet-50/FPN/head shapes, float32 and bfloat16 (Triton, per-offset PyTorch)"
MODELS=()
"$PY" -c 'import mmdet, mmcv.ops' 2>/dev/null && MODELS=(--models)
timeout 330 "$PY" tools/benchmark.py --device cuda --impls triton torch --repeats 5 \
  "${MODELS[@]}" --out "$OUT_DIR/benchmark"
BENCH_RC=$?
say "benchmark exit code $BENCH_RC"

say "benchmark: FlexAttention peer (exact SASA mask and q.r) at the 640 shapes, bfloat16"
timeout 150 "$PY" tools/benchmark.py --device cuda --impls triton flex --dtypes bfloat16 \
  --preset resnet50-640 --preset fpn-head-640 --repeats 5 --out "$OUT_DIR/benchmark-flex"
say "flex benchmark exit code $?"

say "targets"
"$PY" - "$OUT_DIR" <<'PY' | tee "$OUT_DIR/targets.md"
import json, os, sys
out = sys.argv[1]
path = os.path.join(out, 'benchmark', 'benchmark.json')
if not os.path.exists(path):
    sys.exit('no benchmark.json: the benchmark did not finish')
rows = [r for r in json.load(open(path))['rows'] if 'time_ratio' in r]
print('| ResNet-50 shape at 640 (batch 8), bf16 | Triton / cuDNN time (<= 1.5) | '
      'per-offset / Triton time (>= 10) | Triton / cuDNN extra memory (<= 2) |')
print('| --- | --- | --- | --- |')
for r in rows:
    if r['preset'] != 'resnet50-640' or r['dtype'] != 'bfloat16' or not r['impl'].startswith('triton'):
        continue
    peer = next((p for p in rows if p['shape'] == r['shape'] and p['dtype'] == r['dtype']
                 and p['preset'] == r['preset'] and p['impl'].startswith('torch')), None)
    speedup = f"{peer['time_s'] / r['time_s']:.1f}" if peer else 'n/a'
    print(f"| {tuple(r['shape'])} | {r['time_ratio']:.2f} | {speedup} | {r['memory_ratio']:.2f} |")
models = [r for r in rows if r['kind'] == 'model' and r['dtype'] == 'bfloat16'] \
    if any(r['kind'] == 'model' for r in rows) else []
for r in models:
    print(f"model {r['label']}: {r['time_ratio']:.2f}x the conv baseline's step (target <= 1.5)")
if not models:
    print('(no model-level figures: mmdet/mmcv not installed here)')
PY

say "done in $((SECONDS - START)) s; outputs in $OUT_DIR"
[[ $TESTS_RC -eq 0 && $BENCH_RC -eq 0 ]]
