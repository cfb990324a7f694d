#!/usr/bin/env bash
# `make demo`: the main job end to end on a synthetic world (run from the repo root, venv on PATH).
set -euo pipefail
out=${DEMO_OUT:-demo-out}
mkdir -p "$out"

echo "== 1. three hospitals' patch banks, one synthetic world, different cancer mixes"
cmoe-bank synth "$out/A.h5" --force --site A --patients 120 --cancers BRCA,LUAD --patches 2000 --seed 1
cmoe-bank synth "$out/B.h5" --force --site B --patients 90 --cancers LUAD,KIRC --patches 2000 --seed 2
cmoe-bank synth "$out/C.h5" --force --site C --patients 90 --cancers BRCA,KIRC --patches 2000 --seed 3

echo "== 2. inspect (full validation + summary)"
cmoe-bank inspect "$out/A.h5"

tcga=${TCGA_DIR:-../shared/data/tcga}
if [ -f "$tcga/tcga_blca_all_clean.csv.zip" ]; then
  echo "== 3. a real TCGA cohort (genomics only), split by tissue-source site"
  cmoe-bank import-tcga "$out/tcga-blca" --force --table "$tcga/tcga_blca_all_clean.csv.zip" \
    --sites-by site --min-patients 40
fi
