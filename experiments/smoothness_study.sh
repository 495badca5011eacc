#!/usr/bin/env bash
# Metasmoothness study (issue 3, docs/smoothness.md): on digits and mnist1d, score each recipe of
# the default menu by S and Ŝ (4 directions of per-example data weights, h = 0.05), then run 20
# meta-steps of MGD data reweighting on a pool with 30% label noise and report the drop of the
# validation loss and its correlation with the scores. About 15 minutes on 2 CPU cores.
# Resumable: rerun the same command with --resume DIR in place of --out DIR.
set -euo pipefail
OUT=${1:-runs/smoothness-study}
for dataset in digits mnist1d; do
  python -m mgd smoothness --dataset "$dataset" --steps 300 --label-noise 0.3 \
    --directions 4 --h 0.05 --mgd-steps 20 --meta-lr 0.1 --crafting-seeds 0,1,2,3,4 \
    --out "$OUT/$dataset" --quiet
  cat "$OUT/$dataset/report.md"
done
