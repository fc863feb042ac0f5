#!/usr/bin/env bash
# Issue 26's study on the CelebA sample (the 2000 face crops at 128 x 128, split 80/10/10 by file name:
# 1600 training, 200 validation and 200 test images). Each system's own learning rate is chosen on the
# validation split; only the --evaluate test command reads the test split. Batch 32 (50 steps an epoch on
# 1600 images; the paper's 256 would give 6). A 15-epoch run takes about 30 minutes on one CPU thread, so
# the study spans sessions: a finished run is read back and an unfinished one resumed (--auto-resume), so
# rerunning this file continues where it stopped. GM-VQ at its package defaults (beta 1, gamma 0.1,
# temperature 2 -> 0.1, chosen on CIFAR-10) and the best CIFAR-10 baseline, VQ-VAE + l2 + replace.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/celeba
RUNS=${RUNS:-runs/study}
CELEBA="python experiments/sweep.py --dataset celeba --runs-dir $RUNS --epochs 15"
LADDER="lr=0.0001|0.0003|0.001|0.003|0.01|0.03"

# 1. Seed 0 of both systems' grids first (a first look while the second seeds train; not a choice).
$CELEBA "gmvq:batch_size=32,lr=0.001|0.003|0.01" "vqvae-l2-replace:batch_size=32,lr=0.001|0.003|0.01" --seeds 0 \
    --out $OUT/lr-seed0
# 2. Both seeds, each grid extended until its best value is interior.
for system in gmvq vqvae-l2-replace; do
  $CELEBA "$system:batch_size=32,lr=0.001|0.003|0.01" --seeds 0,1 --extend "$LADDER" --out $OUT/lr-$system
done
# 3. The finals (3 seeds x 30 epochs, test) at each system's lr with the lowest mean validation MSE in
#    step 2: written here once step 2 has chosen.
