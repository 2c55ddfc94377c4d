#!/usr/bin/env bash
# Reproduce the model shipped as src/cxr_explain/assets/default_densenet121.pt.
# CPU, 1 torch thread (fastest on a shared 2-core machine), about 45-60 minutes depending on load (the shipped run: 46 min).
set -euo pipefail
WORK=${WORK:-runs}
DATA=$WORK/bench_nih_s0_128
RUN=$WORK/default_densenet121

# 1. The synthetic benchmark: NIH layout, 8 box findings, seed 0, 3000 films at 128 px
#    (split by patient 70/10/20: train/val/test).
python3 -c "from cxr_explain.data.phantom import generate; generate('$DATA', n=3000, seed=0, size=128, workers=1, progress=False)"

# 2. Train DenseNet-121 from scratch (Adam 1e-3, BCE, ReduceLROnPlateau x0.1, small random affine, no flips).
python3 -m cxr_explain.training train --data "$DATA" --layout nih --arch densenet121 \
    --epochs 10 --size 128 --batch-size 16 --lr 1e-3 --workers 0 --device cpu --threads 1 --seed 0 \
    --out "$RUN"

# 3. Table 1 on the benchmark's test split.
python3 -m cxr_explain.training auroc --data "$DATA" --checkpoint "$RUN/best.pt" --split test \
    --batch-size 32 --n-boot 1000 --threads 1 --out "$RUN/test"

# 4. Ship it: fp16 weights, 16 reference test films with their logits, the card numbers; writes
#    src/cxr_explain/assets/{default_densenet121.pt,MODEL_CARD.md} and docs/MODEL_CARD.md.
python3 -m cxr_explain.training.package --package "$RUN/best.pt" --data "$DATA" \
    --generator-note "${GENERATOR_NOTE:-phantom generator at commit $(git rev-parse --short HEAD)}"
