#!/usr/bin/env bash
# Reproduce analyses/results/peers_cpa/: export the split, train CPA for each seed, score with
# the benchmark. One thread, one heavy process at a time.
#   bash analyses/peers/run_all_cpa.sh            # seeds 0 1 2, 200 epochs
#   SEEDS="0" EPOCHS=600 OUT=analyses/results/peers_cpa_epochs600 CPA_VENV=/work/cpa-venv bash analyses/peers/run_all_cpa.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CPA_VENV="${CPA_VENV:-/work/cpa-venv}"
SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-200}"
OUT="${OUT:-analyses/results/peers_cpa}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
[ -x "$CPA_VENV/bin/python" ] || { echo "no CPA venv at $CPA_VENV: run analyses/peers/install_cpa.sh" >&2; exit 2; }

.venv/bin/python analyses/peers/export_split.py --config norman --out "$OUT/norman_split.h5ad"
ext=()
for s in $SEEDS; do
    "$CPA_VENV/bin/python" analyses/peers/run_cpa.py --split "$OUT/norman_split.h5ad" --seed "$s" \
        --epochs "$EPOCHS" --out "$OUT/seed$s" 2>&1 | tee "$OUT/seed$s.log"
    ext+=("CPA_seed$s=$OUT/seed$s/pred.h5ad" "CPA_sampled_seed$s=$OUT/seed$s/pred_sampled.h5ad")
done
list=$(IFS=,; echo "${ext[*]}")
rm -rf "$OUT/benchmark"
.venv/bin/python -m pyro_pvae.benchmark --config norman "benchmark.methods=[control_mean,additive,linear]" \
    benchmark.seeds=3 benchmark.torch_threads=1 "benchmark.external=[$list]" output.run_dir="$OUT/benchmark" \
    2>&1 | tee "$OUT/benchmark.log"
.venv/bin/python analyses/peers/summarise_cpa.py "$OUT/benchmark/results.csv" | tee "$OUT/table.md"
