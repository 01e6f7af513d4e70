#!/usr/bin/env bash
# The pretraining demo: does starting detection from a pretrained attention
# backbone beat starting from scratch? The paper's set-up (ImageNet, then
# COCO) at toy size, on 2 CPU cores in about 15 minutes:
#
#   bash tools/run_pretrain_demo.sh
#
# 1. writes the synthetic shape classification set (8 classes, 64x64, in
#    mmpretrain's CustomDataset folder layout) to data/sasa_pretrain/ and the
#    detection demo's shapes to data/sasa_demo/ (each skipped when there);
# 2. pretrains the detection demo's attention backbone as an mmpretrain
#    ImageClassifier (configs/demo/sasa-tiny_1xb32-6e_shape-classes.py) and
#    evaluates its top-1 on the held-out split;
# 3. trains the detection demo for 12 epochs from that checkpoint
#    (configs/demo/retinanet_sasa-tiny-shapes-pre_12e_shapes.py: every
#    backbone tensor loaded, stem and stage 1 and BN statistics frozen) and
#    from scratch (configs/demo/retinanet_sasa-tiny_12e_shapes.py), and
#    evaluates both (COCO bbox mAP on the held-out split);
# 4. prints, and writes to work_dirs/pretrain_demo/pretrain_demo_result.txt,
#    PRETRAIN DEMO RESULT: top-1 = A | detection mAP from scratch = B, from pretrained = C
#
# Outputs of each run in work_dirs/pretrain_demo/<config name>/. Environment:
#   SASA_PRETRAIN_DATA_ROOT   classification set (default data/sasa_pretrain)
#   SASA_DEMO_DATA_ROOT       detection set (default data/sasa_demo)
#   SASA_PRETRAIN_DEMO_WORK_DIR               default work_dirs/pretrain_demo
#   SASA_PRETRAIN_DEMO_CLS_OPTIONS, SASA_PRETRAIN_DEMO_DET_OPTIONS
#       extra --cfg-options (space-separated key=value) for the classifier's
#       and for both detectors' training and testing
#   SASA_PRETRAIN_DEMO_CLS_DATA_ARGS, SASA_PRETRAIN_DEMO_DET_DATA_ARGS
#       extra arguments of tools/misc/make_pretrain_dataset.py and of
#       tools/misc/make_demo_dataset.py (e.g. "--num-train-per-class 4")
#   SASA_PRETRAIN_DEMO_SKIP_SETUP=1           do not run tools/setup_env.sh
set -Eeuo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '[run_pretrain_demo] %s\n' "$*"; }
die() { printf '[run_pretrain_demo] ERROR: %s\n' "$*" >&2; exit 1; }
step=""
trap 'die "step \"$step\" failed (exit $?, line $LINENO): see the output above"' ERR

[[ $# -eq 0 ]] || die "no arguments expected (got: $*); see the environment variables in $0"

CLS_CONFIG=configs/demo/sasa-tiny_1xb32-6e_shape-classes.py
SCRATCH_CONFIG=configs/demo/retinanet_sasa-tiny_12e_shapes.py
PRE_CONFIG=configs/demo/retinanet_sasa-tiny-shapes-pre_12e_shapes.py
export SASA_PRETRAIN_DATA_ROOT="${SASA_PRETRAIN_DATA_ROOT:-data/sasa_pretrain}"
export SASA_DEMO_DATA_ROOT="${SASA_DEMO_DATA_ROOT:-data/sasa_demo}"
WORK="${SASA_PRETRAIN_DEMO_WORK_DIR:-work_dirs/pretrain_demo}"
read -r -a CLS_OPTS <<<"${SASA_PRETRAIN_DEMO_CLS_OPTIONS:-}"
read -r -a DET_OPTS <<<"${SASA_PRETRAIN_DEMO_DET_OPTIONS:-}"
read -r -a CLS_DATA_ARGS <<<"${SASA_PRETRAIN_DEMO_CLS_DATA_ARGS:-}"
read -r -a DET_DATA_ARGS <<<"${SASA_PRETRAIN_DEMO_DET_DATA_ARGS:-}"
PY="$ROOT/.venv/bin/python"
START=$SECONDS

# --cfg-options KEY=VALUE... or nothing
cfg_options() { [[ $# -gt 0 ]] && printf '%s\n' --cfg-options "$@"; return 0; }

# train CONFIG into WORK_DIR (extra options after), echo the last checkpoint
train() {
  local config="$1" work_dir="$2"; shift 2
  local opts; mapfile -t opts < <(cfg_options "$@")
  "$PY" tools/train.py "$config" --work-dir "$work_dir" "${opts[@]}" >&2
  [[ -s "$work_dir/last_checkpoint" ]] \
    || die "training $config wrote no $work_dir/last_checkpoint"
  local ckpt; ckpt="$(cat "$work_dir/last_checkpoint")"
  [[ -f "$ckpt" ]] || die "checkpoint $ckpt (from $work_dir/last_checkpoint) is missing"
  echo "$ckpt"
}

# evaluate CONFIG's CHECKPOINT into WORK_DIR, echo the value of METRIC
evaluate() {
  local config="$1" ckpt="$2" work_dir="$3" metric="$4"; shift 4
  local opts; mapfile -t opts < <(cfg_options "$@")
  local log="$work_dir/test_output.log"
  "$PY" tools/test.py "$config" "$ckpt" --work-dir "$work_dir" "${opts[@]}" \
    > "$log" 2>&1 || { tail -n 40 "$log" >&2; die "testing $ckpt failed (log: $log)"; }
  local value
  value="$(grep -o "$metric: [0-9.]*" "$log" | tail -1 | cut -d' ' -f2)"
  [[ -n "$value" ]] || die "no $metric in the test output ($log)"
  say "$config: $metric = $value" >&2
  echo "$value"
}

if [[ "${SASA_PRETRAIN_DEMO_SKIP_SETUP:-0}" != 1 ]]; then
  step="set up the environment (tools/setup_env.sh)"
  say "$step"
  bash tools/setup_env.sh
fi

step="write the datasets ($SASA_PRETRAIN_DATA_ROOT, $SASA_DEMO_DATA_ROOT)"
say "$step"
"$PY" tools/misc/make_pretrain_dataset.py --out "$SASA_PRETRAIN_DATA_ROOT" "${CLS_DATA_ARGS[@]}"
"$PY" tools/misc/make_demo_dataset.py --out "$SASA_DEMO_DATA_ROOT" "${DET_DATA_ARGS[@]}"

CLS_DIR="$WORK/$(basename "$CLS_CONFIG" .py)"
SCRATCH_DIR="$WORK/$(basename "$SCRATCH_CONFIG" .py)"
PRE_DIR="$WORK/$(basename "$PRE_CONFIG" .py)"
# a rerun starts afresh (tools/train.py would otherwise keep old checkpoints)
rm -rf "$CLS_DIR" "$SCRATCH_DIR" "$PRE_DIR"

step="pretrain the backbone as a classifier ($CLS_CONFIG)"
say "$step"
T0=$SECONDS
CLS_CKPT="$(train "$CLS_CONFIG" "$CLS_DIR" "${CLS_OPTS[@]}")"
step="evaluate the classifier on the held-out split"
TOP1="$(evaluate "$CLS_CONFIG" "$CLS_CKPT" "$CLS_DIR" 'accuracy/top1' "${CLS_OPTS[@]}")"
T_CLS=$((SECONDS - T0))

step="train the detector from scratch ($SCRATCH_CONFIG)"
say "$step"
T0=$SECONDS
SCRATCH_CKPT="$(train "$SCRATCH_CONFIG" "$SCRATCH_DIR" "${DET_OPTS[@]}")"
step="evaluate the detector trained from scratch"
MAP_SCRATCH="$(evaluate "$SCRATCH_CONFIG" "$SCRATCH_CKPT" "$SCRATCH_DIR" 'coco/bbox_mAP' "${DET_OPTS[@]}")"
T_SCRATCH=$((SECONDS - T0))

step="train the detector from the pretrained backbone ($PRE_CONFIG)"
say "$step"
T0=$SECONDS
PRE_CKPT="$(train "$PRE_CONFIG" "$PRE_DIR" \
  "model.backbone.init_cfg.checkpoint=$CLS_CKPT" "${DET_OPTS[@]}")"
step="check that the backbone loaded every tensor from $CLS_CKPT"
PRE_LOG="$(ls -t "$PRE_DIR"/*/*.log | head -1)"
LOADED="$(grep -o 'SASAResNet: all [0-9]* tensors loaded from [^ ]*' "$PRE_LOG" | head -1 || true)"
[[ -n "$LOADED" ]] || die "no 'SASAResNet: all N tensors loaded' line in $PRE_LOG"
say "$LOADED"
step="evaluate the detector trained from the pretrained backbone"
MAP_PRE="$(evaluate "$PRE_CONFIG" "$PRE_CKPT" "$PRE_DIR" 'coco/bbox_mAP' "${DET_OPTS[@]}")"
T_PRE=$((SECONDS - T0))

RESULT="PRETRAIN DEMO RESULT: top-1 = $TOP1 | detection mAP from scratch = $MAP_SCRATCH, from pretrained = $MAP_PRE"
mkdir -p "$WORK"
printf '%s\n' "$RESULT" > "$WORK/pretrain_demo_result.txt"
say "done in $((SECONDS - START)) s (pretraining + top-1: ${T_CLS} s, detection from scratch: ${T_SCRATCH} s, from pretrained: ${T_PRE} s); outputs in $WORK/"
echo "$RESULT"
