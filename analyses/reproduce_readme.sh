#!/usr/bin/env bash
# Re-run every table quoted in README.md (CPU; about 15-20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=analyses/results
rm -rf $R/benchmark_norman $R/benchmark_norman_effects $R/identifiability_small $R/fit_norman
/usr/bin/time -v $PY -m pyro_pvae.fit --config norman train.progress=false output.run_dir=$R/fit_norman 2>&1 | tee $R/fit_norman.log
$PY -m pyro_pvae.benchmark --config norman output.run_dir=$R/benchmark_norman
$PY -m pyro_pvae.benchmark --config norman_effects output.run_dir=$R/benchmark_norman_effects
$PY analyses/identifiability.py --grid small --jobs 2
