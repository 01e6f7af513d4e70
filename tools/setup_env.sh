#!/usr/bin/env bash
# Create (or check) the project environment in .venv/ at the repository root.
#
# Installs, pinned: torch 2.14.1 (the CUDA 13 build, which also runs on a
# CPU-only machine) with torchvision 0.29.1 and triton, mmengine 0.10.7,
# mmcv 2.1.0 with its compiled ops, mmdet 3.3.0, mmpretrain 1.2.0,
# pycocotools, onnx/onnxruntime, the test tools and this package in editable
# mode (which compiles the attention's CPU kernel against that torch).
#
# mmcv 2.1.0 has no binary wheel for torch 2.14: it is built from its PyPI
# source once into a wheel cache outside the repository, keyed by Python,
# torch and the kind of ops (CPU only, or CUDA for an architecture list), and
# reused afterwards. Which kind:
#   - CUDA ops when `nvidia-smi` sees a GPU, or SASA_MMDET_CUDA=1;
#   - CPU ops otherwise, or with SASA_MMDET_CUDA=0.
#
# Idempotent: on a ready environment whose inputs did not change it only
# verifies the imports (under a minute). Environment variables:
#   SASA_MMDET_CACHE            cache folder (default: ~/.cache/sasa_mmdet)
#   SASA_MMDET_PYTHON           Python 3.11 interpreter to build the venv from
#   SASA_MMDET_CUDA             1: build mmcv's CUDA ops, 0: CPU ops (default: detect)
#   SASA_MMDET_CUDA_ARCH_LIST   GPU architectures for mmcv's CUDA ops
#                               (default "8.0;9.0+PTX": sm_80 code also runs on
#                               8.6/8.9 GPUs, PTX is JIT-compiled on newer ones)
#   MAX_JOBS                    parallel compile jobs (default: all cores)
#   SASA_MMDET_NATIVE           1: compile the attention's CPU kernel for this
#                               machine's CPU (-march=native, about 2x faster
#                               here, docs/benchmarks.md); 0: portable build
#                               for a .venv used on other CPUs (default: 1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY_BASE="${SASA_MMDET_PYTHON:-python3.11}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"   # torch and torchvision, exact
TORCH_VERSION="$(sed -n 's/^torch==//p' "$CONSTRAINTS")"
MMCV_VERSION="2.1.0"
MMCV_SDIST_URL="https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz"
MMCV_SDIST_SHA256="d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f"
CACHE="${SASA_MMDET_CACHE:-$HOME/.cache/sasa_mmdet}"
SASA_MMDET_NATIVE="${SASA_MMDET_NATIVE:-1}"
[[ "$SASA_MMDET_NATIVE" == 0 || "$SASA_MMDET_NATIVE" == 1 ]] \
  || { echo "SASA_MMDET_NATIVE must be 0 or 1, got $SASA_MMDET_NATIVE" >&2; exit 1; }
STAMP="$VENV/.sasa_mmdet_ready"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

say() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "step failed (line $LINENO): $BASH_COMMAND"' ERR

# Which mmcv ops to build: CUDA where a GPU is (or when asked), CPU otherwise.
if [[ -n "${SASA_MMDET_CUDA:-}" ]]; then
  [[ "$SASA_MMDET_CUDA" == 0 || "$SASA_MMDET_CUDA" == 1 ]] \
    || die "SASA_MMDET_CUDA must be 0 or 1, got '$SASA_MMDET_CUDA'"
  WITH_CUDA="$SASA_MMDET_CUDA"
elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  WITH_CUDA=1
else
  WITH_CUDA=0
fi
ARCH_LIST="${SASA_MMDET_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
if [[ "$WITH_CUDA" == 1 ]]; then
  OPS_KEY="cuda-sm$(tr -d '.' <<<"$ARCH_LIST" | tr ';+' '_-' | tr 'A-Z' 'a-z')"
else
  OPS_KEY="cpu"
fi
WHEELS="$CACHE/wheels/py311-torch${TORCH_VERSION}-${OPS_KEY}"

inputs_hash() {
  { cat "$ROOT/tools/setup_env.sh" "$ROOT/requirements/"*.txt "$ROOT/setup.py" "$ROOT/pyproject.toml" \
        "$ROOT"/sasa_mmdet/layers/csrc/* "$ROOT"/sasa_mmdet/deployment/csrc/*; echo "$OPS_KEY native=$SASA_MMDET_NATIVE"
    ls "${CACHE}/onnxruntime-headers/include/onnxruntime" /usr/include/onnxruntime 2>/dev/null || true; } | sha256sum | cut -c1-16
}

verify() {
  "$VENV/bin/python" - "$WITH_CUDA" <<'PY'
import sys
import torch, torchvision, triton, mmcv, mmengine, mmdet, mmpretrain, mmcv.ops, sasa_mmdet  # noqa: F401
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
scores = torch.tensor([0.9, 0.8])
mmcv.ops.batched_nms(boxes, scores, torch.tensor([0, 0]), dict(type='nms', iou_threshold=0.5))
torchvision.ops.nms(boxes, scores, 0.5)
assert torch.version.cuda, 'torch is not the CUDA build'
if sys.argv[1] == '1':
    from mmcv.ops import get_compiling_cuda_version
    mmcv_cuda = get_compiling_cuda_version()
    assert mmcv_cuda != 'not available', 'mmcv has no CUDA ops'
    print(f'[setup_env] mmcv CUDA ops compiled with CUDA {mmcv_cuda}')
print(f'[setup_env] ready: torch {torch.__version__} (CUDA {torch.version.cuda}, '
      f'GPU {"available" if torch.cuda.is_available() else "not available"}), '
      f'torchvision {torchvision.__version__}, triton {triton.__version__}, '
      f'mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmpretrain {mmpretrain.__version__}')
PY
}

# onnxruntime's C/C++ headers, for the package's onnxruntime custom-op library
# (from Debian's libonnxruntime-dev; quick when already there). Without them
# the library is not built and its tests skip.
bash "$ROOT/tools/deployment/install_onnxruntime_headers.sh" \
  || say "WARNING: no onnxruntime headers: the onnxruntime custom-op library will not be built"
HASH="$(inputs_hash)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  say "environment in .venv is up to date; verifying"
  verify
  exit 0
fi

command -v "$PY_BASE" >/dev/null || die "$PY_BASE not found (set SASA_MMDET_PYTHON to a Python 3.11 interpreter)"
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment in $VENV"
  "$PY_BASE" -m venv "$VENV"
fi
# Every install is constrained to the exact torch and torchvision, so no
# resolver can swap in another torch (pip's own caps still apply too).
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PIN=(-c "$CONSTRAINTS")

say "installing build tools and torch $TORCH_VERSION with torchvision (about 1 minute; 5.5 GB)"
"${PIP[@]}" install -q --upgrade pip wheel ninja "$(grep '^setuptools' "$ROOT/requirements/runtime.txt")"
step_start=$SECONDS
"${PIP[@]}" install -q "${PIN[@]}" torch torchvision \
  || die "could not install torch $TORCH_VERSION and torchvision (requirements/constraints.txt)"
say "torch and torchvision ready in $((SECONDS - step_start)) s"

mkdir -p "$WHEELS"
MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$MMCV_WHEEL" ]]; then
  BUILD_DIR="$(mktemp -d "$CACHE/build.XXXXXX")"
  LOG="$CACHE/mmcv-build-$OPS_KEY.log"
  if [[ "$WITH_CUDA" == 1 ]]; then
    say "building mmcv $MMCV_VERSION with CUDA ops for TORCH_CUDA_ARCH_LIST=$ARCH_LIST:" \
        "expect about 45 minutes on 2 cores for the default two architectures (once per machine)"
    # torch takes CUDA_HOME from the nvcc on the PATH (two levels up), which
    # is wrong where that nvcc is a wrapper script (these machines:
    # /usr/local/bin/nvcc exec's /usr/local/cuda-13.0/bin/nvcc): the C++
    # files that include cuda_runtime_api.h then miss the toolkit's headers.
    # Take a toolkit that has them.
    if [[ -z "${CUDA_HOME:-}" ]]; then
      NVCC_REAL="$(readlink -f "$(command -v nvcc || true)" || true)"
      for candidate in /usr/local/cuda "${NVCC_REAL%/bin/nvcc}"; do
        if [[ -x "$candidate/bin/nvcc" && -f "$candidate/include/cuda_runtime_api.h" ]]; then
          CUDA_HOME="$candidate"; break
        fi
      done
    fi
    [[ -n "${CUDA_HOME:-}" && -f "$CUDA_HOME/include/cuda_runtime_api.h" ]] \
      || die "no CUDA toolkit with headers found: set CUDA_HOME to one (bin/nvcc, include/cuda_runtime_api.h)"
    export CUDA_HOME
    say "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"
    # The CUDA toolkit of a machine may lack cuSPARSE's headers, which torch's
    # headers include; torch's pip CUDA packages ship them.
    NV_INCLUDE="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))')"
    export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"
    export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST"
  else
    say "building mmcv $MMCV_VERSION with CPU ops from source: expect about 15 minutes on 2 cores (once per machine)"
    export FORCE_CUDA=0
  fi
  start=$SECONDS
  # mmcv 2.1.0's setup.py forces -std=c++17 for g++ and nvcc, but torch 2.14's
  # headers need C++20 ("C++20 or later compatible compiler is required to use
  # ATen"). Build from the pinned PyPI source with only those flags changed.
  curl -sSfL --retry 3 -o "$BUILD_DIR/mmcv-$MMCV_VERSION.tar.gz" "$MMCV_SDIST_URL"
  echo "$MMCV_SDIST_SHA256  $BUILD_DIR/mmcv-$MMCV_VERSION.tar.gz" | sha256sum -c --quiet
  tar xzf "$BUILD_DIR/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD_DIR"
  SRC="$BUILD_DIR/mmcv-$MMCV_VERSION"
  sed -i "s/'-std=c++17'/'-std=c++20'/g" "$SRC/setup.py"
  grep -q "'-std=c++20'" "$SRC/setup.py" && ! grep -q "'-std=c++17'" "$SRC/setup.py" \
    || die "the C++ standard patch did not apply to $SRC/setup.py"
  MMCV_WITH_OPS=1 "${PIP[@]}" wheel --no-build-isolation --no-deps "${PIN[@]}" \
      "$SRC" -w "$BUILD_DIR" > "$LOG" 2>&1 \
    || { tail -n 40 "$LOG" >&2; die "mmcv build failed; full log: $LOG"; }
  # Move into place only when complete, so an interrupted build never leaves a broken cache.
  mv "$BUILD_DIR"/mmcv-"$MMCV_VERSION"-*.whl "$WHEELS"/
  rm -rf "$BUILD_DIR"
  MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
  say "mmcv built in $(( (SECONDS - start) / 60 )) min: $MMCV_WHEEL"
else
  say "using cached mmcv wheel $MMCV_WHEEL"
fi

say "installing mmcv, mmengine, mmdet, mmpretrain, pycocotools, onnxruntime, test tools and sasa_mmdet (editable)"
step_start=$SECONDS
"${PIP[@]}" install -q "${PIN[@]}" "$MMCV_WHEEL" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"
# The environment is built for this machine: the attention's CPU kernel
# compiled for its CPU unless SASA_MMDET_NATIVE=0 (setup.py's default is the
# portable build).
SASA_MMDET_NATIVE="$SASA_MMDET_NATIVE" "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
"${PIP[@]}" check || die "pip check found broken requirements"
say "installed in $((SECONDS - step_start)) s"
# With transformers installed beside pycocotools, mmpretrain turns on its
# multimodal imports (and their downloads): keep it out.
if "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("transformers") is None)'; then
  die "transformers is installed in .venv; remove it (mmpretrain would switch on its multimodal models)"
fi

verify
echo "$HASH" > "$STAMP"
