#!/usr/bin/env bash
# Create (or check) the project environment in .venv/ at the repository root.
#
# Installs, pinned: torch 2.13.0 (CPU build), mmengine 0.10.7, mmcv 2.1.0 with
# its compiled ops, mmdet 3.3.0, pycocotools, the test tools and this package
# in editable mode. mmcv 2.1.0 has no binary wheel on the index: it is built
# from source once (about 30 minutes on 2 cores) into a wheel cache outside
# the repository, keyed by Python and torch version, and reused afterwards.
#
# Idempotent: on a ready environment whose inputs did not change it only
# verifies the imports. Environment variables:
#   SASA_MMDET_CACHE   cache folder (default: ~/.cache/sasa_mmdet)
#   SASA_MMDET_PYTHON  Python 3.11 interpreter to build the venv from
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY_BASE="${SASA_MMDET_PYTHON:-python3.11}"
TORCH_SPEC="torch==2.13.0+cpu"
MMCV_VERSION="2.1.0"
CACHE="${SASA_MMDET_CACHE:-$HOME/.cache/sasa_mmdet}"
WHEELS="$CACHE/wheels/py311-torch2.13.0-cpu"
STAMP="$VENV/.sasa_mmdet_ready"

say() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "step failed (line $LINENO): $BASH_COMMAND"' ERR

inputs_hash() {
  cat "$ROOT/tools/setup_env.sh" "$ROOT/requirements/"*.txt "$ROOT/setup.py" "$ROOT"/sasa_mmdet/layers/csrc/* | sha256sum | cut -c1-16
}

verify() {
  "$VENV/bin/python" - <<'PY'
import torch, mmcv, mmengine, mmdet, mmcv.ops, sasa_mmdet  # noqa: F401
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])
mmcv.ops.batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]),
                     dict(type='nms', iou_threshold=0.5))
assert not torch.version.cuda, 'a CUDA build of torch was installed'
print(f'[setup_env] ready: torch {torch.__version__}, mmcv {mmcv.__version__}, '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}')
PY
}

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
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "installing build tools and $TORCH_SPEC (CPU build)"
"${PIP[@]}" install -q --upgrade pip wheel ninja "$(grep '^setuptools' "$ROOT/requirements/runtime.txt")"
"${PIP[@]}" install -q "$TORCH_SPEC" || die "could not install $TORCH_SPEC; it is the CPU build of torch (a plain 'torch' would pull a multi-GB CUDA build)"

mkdir -p "$WHEELS"
MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$MMCV_WHEEL" ]]; then
  say "no cached mmcv $MMCV_VERSION wheel in $WHEELS"
  say "building mmcv $MMCV_VERSION with compiled ops from source: expect about 30 minutes on 2 cores (once per machine)"
  BUILD_DIR="$(mktemp -d "$CACHE/build.XXXXXX")"
  start=$SECONDS
  MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" "${PIP[@]}" wheel --no-build-isolation --no-deps \
      "mmcv==$MMCV_VERSION" -w "$BUILD_DIR" > "$CACHE/mmcv-build.log" 2>&1 \
    || { tail -n 40 "$CACHE/mmcv-build.log" >&2; die "mmcv build failed; full log: $CACHE/mmcv-build.log"; }
  # Move into place only when complete, so an interrupted build never leaves a broken cache.
  mv "$BUILD_DIR"/mmcv-"$MMCV_VERSION"-*.whl "$WHEELS"/
  rm -rf "$BUILD_DIR"
  MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
  say "mmcv built in $(( (SECONDS - start) / 60 )) min: $MMCV_WHEEL"
else
  say "using cached mmcv wheel $MMCV_WHEEL"
fi

say "installing mmcv, mmengine, mmdet, pycocotools, test tools and sasa_mmdet (editable)"
"${PIP[@]}" install -q "$MMCV_WHEEL" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt" "$TORCH_SPEC"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
"${PIP[@]}" check || die "pip check found broken requirements"

verify
echo "$HASH" > "$STAMP"
