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
echo "   (the c-index below: the model trained on all of sites A + B, scored on every patient of site C, a site"
echo "    it never saw; the federated c-index of step 5 is measured on other patients, see there)"
cmoe-train "$out/A.h5" "$out/B.h5" --eval "$out/C.h5" --out "$out/central" --force --epochs 20 "${model_sets[@]}"

echo "== 5. federation over TLS: a throwaway PKI, cmoe-server + three cmoe-client sites, $rounds rounds"
rm -rf "$out/pki"
cmoe-certs init "$out/pki" --host localhost > /dev/null
for site in A B C; do cmoe-certs site "$out/pki" "$site" > /dev/null; done
cmoe-certs show "$out/pki"
port=${DEMO_PORT:-19092}
ready_timeout=${DEMO_READY_TIMEOUT:-120}
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
echo "   (the c-index it prints: the federated model scored on each site's held-out patients, eval_fraction = 20%"
echo "    of every site's patients, never trained on; not the centralized baseline's patients of step 4)"
# The server's output goes to the terminal and to server.out, where its readiness line is looked for.
cmoe-server --rounds "$rounds" --min-sites 3 --pki "$out/pki" --listen "127.0.0.1:$port" --workdir "$out/server" --force \
  "${model_sets[@]}" --set local_epochs="$local_epochs" --set consolidate_round=1 > >(tee "$out/server.out") 2>&1 &
server=$!
pids+=("$server")
# Ready once the job is submitted: the SuperLink listens and every site key is registered (a site started before
# would be turned away). A line every 10 s meanwhile; a server that exits first stops the demo with its status.
started=$SECONDS
next_note=10
until grep -q "submitted; waiting for" "$out/server.out" 2>/dev/null; do
  kill -0 "$server" 2>/dev/null || { wait "$server"; echo "error: cmoe-server: exited before it was ready" >&2; exit 1; }
  waited=$((SECONDS - started))
  if ((waited >= ready_timeout)); then
    echo "error: cmoe-server: not ready after $ready_timeout s (DEMO_READY_TIMEOUT); see $out/server/superlink.log" >&2
    exit 1
  fi
  if ((waited >= next_note)); then echo "waiting for cmoe-server to be ready: $waited s"; next_note=$((waited + 10)); fi
  sleep 1
done
for site in A B C; do
  cmoe-client --site "$site" --bank "$out/$site.h5" --superlink "127.0.0.1:$port" \
    --ca "$out/pki/ca.pem" --key "$out/pki/sites/$site.key" \
    --workdir "$out/site-$site" > "$out/client-$site.log" 2>&1 &
  pids+=($!)
done
wait "$server"
echo "== centralized (step 4): trained on sites A + B, scored on all of the unseen site C: $out/central/results.json"
echo "== federated (step 5): trained on every site's training patients, scored on each site's held-out patients:"
echo "   $out/server/results.json"
