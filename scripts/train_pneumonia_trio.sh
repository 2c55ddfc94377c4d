#!/usr/bin/env bash
# The paper's binary pneumonia trio (VGG-16, ResNet-50, DenseNet-121) on the RSNA-layout synthetic
# benchmark, each trained twice: on clean data and on data with the planted "marker" shortcut
# (train split: marker on 90 % of pneumonia films, 10 % of the others; val/test: 30 % whatever the label).
# Writes per model: best.pt, history.jsonl, {test,train}_split/table1.{md,csv}; then table1_trio.md (all six) and,
# for the DenseNet pair, the "inconsistency of intention" analysis on the marker test split.
#
# Every step resumes: a finished dataset / model / table is skipped, an interrupted training continues
# from its last epoch. Settings (environment variables, defaults = the reduced CPU run):
#   WORK=runs  DEVICE=cpu  SIZE=128  N=3000  EPOCHS=5  BATCH=16  WORKERS=0  GEN_WORKERS=1
#   THREADS=1  ARCHS="densenet121 resnet50 vgg16"  INTENTION_IMAGES=200  PYTHON=python3
# GPU run used for the README table: DEVICE=cuda SIZE=224 N=6000 EPOCHS=8 BATCH=64 WORKERS=12 GEN_WORKERS=16
set -euo pipefail
WORK=${WORK:-runs}
DEVICE=${DEVICE:-cpu}
SIZE=${SIZE:-128}
N=${N:-3000}
EPOCHS=${EPOCHS:-5}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-0}
GEN_WORKERS=${GEN_WORKERS:-1}
THREADS=${THREADS:-1}
ARCHS=${ARCHS:-"densenet121 resnet50 vgg16"}
INTENTION_IMAGES=${INTENTION_IMAGES:-200}
PY=${PYTHON:-python3}
mkdir -p "$WORK"

clean="bench_rsna_s1_${SIZE}_n${N}"
marker="${clean}_marker"
for d in "$clean" "$marker"; do
  shortcut=None; [ "$d" = "$marker" ] && shortcut="'marker'"
  "$PY" -c "from cxr_explain.data.phantom import generate
generate('$WORK/$d', n=$N, seed=1, layout='rsna', size=$SIZE, shortcut=$shortcut, workers=$GEN_WORKERS)"
done

for arch in $ARCHS; do
  lr=1e-3; [ "$arch" = vgg16 ] && lr=1e-4   # VGG-16 has no BatchNorm: Adam 1e-3 from scratch diverges
  for d in "$clean" "$marker"; do
    run="$WORK/pneu_${arch}_${d}"
    note=""; [ "$d" = "$marker" ] && note="marker shortcut: p_pos 0.9 / p_neg 0.1 in train, 0.3 in val/test"
    resume=""; [ -f "$run/last.pt" ] && resume="--resume"
    # one failed model (diverged, out of memory) must not stop the others: report it and go on
    if [ ! -f "$run/done" ]; then
      if "$PY" -m cxr_explain.training train --data "$WORK/$d" --layout rsna --arch "$arch" --epochs "$EPOCHS" \
          --size "$SIZE" --batch-size "$BATCH" --lr "$lr" --workers "$WORKERS" --device "$DEVICE" \
          --threads "$THREADS" --seed 0 --no-progress --shortcut-note "$note" --out "$run" $resume; then
        touch "$run/done"
      else
        echo "FAILED: training $run (rerun this script to resume it)" >&2; continue
      fi
    fi
    for split in test train; do
      n_boot=1000; [ "$split" = train ] && n_boot=0
      [ -f "$run/${split}_split/table1.csv" ] || "$PY" -m cxr_explain.training auroc --data "$WORK/$d" \
          --checkpoint "$run/best.pt" --split "$split" --n-boot "$n_boot" --device "$DEVICE" \
          --workers "$WORKERS" --threads "$THREADS" --out "$run/${split}_split" \
        || echo "FAILED: $split AUROC of $run" >&2
    done
  done
done
"$PY" scripts/collect_trio_table.py "$WORK" --out "$WORK/table1_trio.md"

# Where does the DenseNet pair put its relevance on the marker test split? (paper Section 3)
for d in "$clean" "$marker"; do
  run="$WORK/pneu_densenet121_${d}"
  [ -f "$run/best.pt" ] || continue
  [ -f "$run/intention_on_marker_test/tables/intention.md" ] && continue
  "$PY" -m cxr_explain.cli evaluate --data "$WORK/$marker" --checkpoint "$run/best.pt" \
      --methods cam lrp rap --split test --max-images "$INTENTION_IMAGES" --intention Pneumonia \
      --device "$DEVICE" --workers "$WORKERS" --no-progress --out "$run/intention_on_marker_test" \
    || echo "FAILED: intention analysis of $run" >&2
done
