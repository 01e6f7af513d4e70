#!/usr/bin/env bash
# The bundled demo: train a small attention RetinaNet from scratch on the
# synthetic shapes dataset and report its COCO bbox mAP on the held-out split.
#
#   bash tools/run_demo.sh [CONFIG]
#
# CONFIG defaults to configs/demo/retinanet_sasa-tiny_shapes.py; pass
# configs/demo/retinanet_r-tiny_shapes.py for its convolutional twin.
# Steps: set up (or check) .venv, write data/sasa_demo (skipped when already
# there), train into work_dirs/<config name>/, evaluate the last checkpoint on
# the val split with tools/test.py and draw its detections. Extra arguments
# after CONFIG go to both tools/train.py and tools/test.py as --cfg-options,
# e.g. `bash tools/run_demo.sh configs/demo/retinanet_r-tiny_shapes.py
# train_cfg.max_epochs=1`. Environment: SASA_DEMO_DATA_ROOT (dataset folder,
# default data/sasa_demo), SASA_DEMO_WORK_DIR (default work_dirs/<name>).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '[run_demo] %s\n' "$*"; }
die() { printf '[run_demo] ERROR: %s\n' "$*" >&2; exit 1; }
step=""
trap 'die "step \"$step\" failed (exit $?, line $LINENO): see the output above"' ERR

CONFIG="${1:-configs/demo/retinanet_sasa-tiny_shapes.py}"
shift || true
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG"
NAME="$(basename "$CONFIG" .py)"
export SASA_DEMO_DATA_ROOT="${SASA_DEMO_DATA_ROOT:-data/sasa_demo}"
WORK_DIR="${SASA_DEMO_WORK_DIR:-work_dirs/$NAME}"
CFG_OPTS=()
if [[ $# -gt 0 ]]; then
  CFG_OPTS=(--cfg-options "$@")
fi
PY="$ROOT/.venv/bin/python"
START=$SECONDS

step="set up the environment (tools/setup_env.sh)"
say "$step"
bash tools/setup_env.sh

step="generate the synthetic shapes dataset in $SASA_DEMO_DATA_ROOT"
say "$step"
"$PY" tools/misc/make_demo_dataset.py --out "$SASA_DEMO_DATA_ROOT"

step="train $CONFIG into $WORK_DIR"
say "$step"
"$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" "${CFG_OPTS[@]}"

step="find the trained checkpoint"
[[ -s "$WORK_DIR/last_checkpoint" ]] \
  || die "training wrote no $WORK_DIR/last_checkpoint"
CKPT="$(cat "$WORK_DIR/last_checkpoint")"
[[ -f "$CKPT" ]] || die "checkpoint $CKPT (from $WORK_DIR/last_checkpoint) is missing"

step="evaluate $CKPT on the val split (tools/test.py)"
say "$step"
TEST_LOG="$WORK_DIR/test_output.log"
"$PY" tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK_DIR" \
  --show-dir detections "${CFG_OPTS[@]}" 2>&1 | tee "$TEST_LOG"

step="read the COCO mAP and the outputs"
MAP="$(grep -o 'coco/bbox_mAP: [0-9.]*' "$TEST_LOG" | tail -1 | cut -d' ' -f2)"
[[ -n "$MAP" ]] || die "no coco/bbox_mAP in the test output ($TEST_LOG)"
# tools/test.py writes into a new timestamped folder of the work dir
TEST_RUN="$(ls -td "$WORK_DIR"/*/ | head -1)"
TEST_RUN="${TEST_RUN%/}"
SHOW_DIR="$TEST_RUN/detections"
[[ -d "$SHOW_DIR" ]] && compgen -G "$SHOW_DIR/*.jpg" >/dev/null \
  || die "no drawn detections in $SHOW_DIR"
TRAIN_JSON="$(ls -t "$WORK_DIR"/*/vis_data/scalars.json 2>/dev/null | head -1 || true)"
TEST_JSON="$(ls "$TEST_RUN"/*.json 2>/dev/null | head -1 || true)"

say "done in $((SECONDS - START)) s"
echo "DEMO RESULT: $NAME  COCO bbox mAP = $MAP (val split, $SASA_DEMO_DATA_ROOT) | detections drawn in $SHOW_DIR/ | JSON logs: training ${TRAIN_JSON:-<none>}, test ${TEST_JSON:-<none>}"
