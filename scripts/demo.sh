#!/usr/bin/env bash
# `make demo`: the main job end to end on a synthetic world (run from the repo root, venv on PATH).
#   1. three hospitals' patch banks from one synthetic world, different cancer mixes
#   2. full validation of a bank
#   3. a real TCGA cohort imported as one genomics-only bank per tissue-source site
#   4. the centralized baseline: cmoe-train on two sites, evaluated on the third
#   5. the federation over TLS with site authentication (a throwaway PKI from cmoe-certs): a real
#      SuperLink (cmoe-server) and three SuperNodes (cmoe-client) on loopback
set -euo pipefail
out=${DEMO_OUT:-demo-out}
rounds=${DEMO_ROUNDS:-5}
local_epochs=${DEMO_LOCAL_EPOCHS:-5}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # three sites share two cores: no thread oversubscription
model_sets=(--set feature_dim=64 --set tokens=64 --set batch_size=16 --set sparsify_keep=0.25)

echo "== 1. three hospitals' patch banks, one synthetic world, different cancer mixes"
# A world with a strong planted signal (--risk-sd 2: oracle c-index ~0.82) and ~200 patients per cancer and
# site, so that a few rounds can show learning; `cmoe-bank inspect` prints each site's oracle c-index.
synth() { cmoe-bank synth "$out/$1.h5" --force --site "$1" --patients "$2" --cancers "$3" --patches 400 \
            --feature-dim 64 --genomic-features 16 --signal-fraction 0.1 --risk-sd 2 --seed "$4"; }
synth A 400 BRCA,LUAD 1
synth B 360 LUAD,KIRC 2
synth C 360 BRCA,KIRC 3

echo "== 2. inspect (full validation + summary)"
cmoe-bank inspect "$out/A.h5"

tcga=${TCGA_DIR:-data/tcga}  # the repository's own copy (data/tcga/README.md says where it comes from)
echo "== 3. a real TCGA cohort (genomics only), one bank per tissue-source site"
cmoe-bank import-tcga "$out/tcga-blca" --force --table "$tcga/tcga_blca_all_clean.csv.zip" \
  --sites-by site --min-patients 40 | grep '^wrote'

echo "== 4. centralized baseline: train on A + B, evaluate on the unseen site C"
cmoe-train "$out/A.h5" "$out/B.h5" --eval "$out/C.h5" --out "$out/central" --force --epochs 20 "${model_sets[@]}"

echo "== 5. federation over TLS: a throwaway PKI, cmoe-server + three cmoe-client sites, $rounds rounds"
rm -rf "$out/pki"
cmoe-certs init "$out/pki" --host localhost > /dev/null
for site in A B C; do cmoe-certs site "$out/pki" "$site" > /dev/null; done
cmoe-certs show "$out/pki"
port=${DEMO_PORT:-19092}
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
cmoe-server --rounds "$rounds" --min-sites 3 --pki "$out/pki" --listen "127.0.0.1:$port" --workdir "$out/server" --force \
  "${model_sets[@]}" --set local_epochs="$local_epochs" --set consolidate_round=1 &
server=$!
sleep 3
for site in A B C; do
  cmoe-client --site "$site" --bank "$out/$site.h5" --superlink "127.0.0.1:$port" \
    --ca "$out/pki/ca.pem" --key "$out/pki/sites/$site.key" \
    --workdir "$out/site-$site" > "$out/client-$site.log" 2>&1 &
  pids+=($!)
done
wait "$server"
