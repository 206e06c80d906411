#!/usr/bin/env bash
# Re-run every table quoted in README.md (CPU; about 30 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=analyses/results
rm -rf $R/fit_norman $R/benchmark_norman $R/benchmark_norman_effects $R/identifiability_small $R/benchmark_simulation
/usr/bin/time -v $PY -m pyro_pvae.fit --config norman train.progress=false output.run_dir=$R/fit_norman > $R/fit_norman.log 2>&1
$PY -m pyro_pvae.benchmark --config norman output.run_dir=$R/benchmark_norman
$PY -m pyro_pvae.benchmark --config norman_effects output.run_dir=$R/benchmark_norman_effects
$PY analyses/identifiability.py --grid small --jobs 2
# norman_like (59,500 simulated cells x 5,000 genes): held-out doubles only and fewer predictive
# draws, to fit a 2-core CPU (the singles' held-out cells add 100 conditions, about an hour more)
$PY -m pyro_pvae.benchmark --config simulation +split.kwargs.single_test_fraction=0.0 \
    benchmark.n_pred_cells=100 benchmark.n_change_draws=20 output.run_dir=$R/benchmark_simulation
