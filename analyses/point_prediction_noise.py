"""How much Monte Carlo noise the model's point prediction carries, on the shipped real cells.

    python analyses/point_prediction_noise.py [train.seed=0 ...]

One fit of ``--config norman`` (one thread). For the held-out seen singles and doubles of the
benchmark's reference (:func:`pyro_pvae.benchmark.observed_reference`), the mean Pearson delta of the
model's predicted change against the observed change:

* ``cells_N``: the previous rounds' point prediction, the mean of ``predict``'s N cells (50
  posterior draws) minus the mean of max(N, 1000) predicted control cells, for N = 200, 2,000,
  10,000;
* ``predict_mean_seed_S``: :meth:`PerturbedVAE.predict_mean` (4,000 cells, 50 draws, the
  benchmark's setting) with prediction seed S: how much it moves between prediction seeds.

Prints one JSON line.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch


def main(overrides) -> dict:
    from norman_fit import fit_norman

    from pyro_pvae import data as D
    from pyro_pvae.benchmark import _conditions, _dense, observed_reference

    torch.set_num_threads(1)
    adata, split, vae, _ = fit_norman(overrides)
    D.lognormalize(adata)
    ref = observed_reference(adata, split)
    conds = list(ref.groups)

    def score(change) -> dict:
        return {g: round(float(np.mean([np.corrcoef(change[c], ref.obs_delta[c])[0, 1]
                                        for c in conds if ref.groups[c] == g])), 4) for g in ("single", "seen2")}

    out = {}
    for n in (200, 2000, 10000):
        pred = vae.predict(conds, n_cells=n, seed=0, unknown="ignore", n_draws=50)
        ctrl = _dense(vae.predict([D.CONTROL], n_cells=max(n, 1000), seed=7777, n_draws=50).layers["lognorm"]).mean(0)
        cells, pc = _dense(pred.layers["lognorm"]), _conditions(pred)
        out[f"cells_{n}"] = score({c: cells[pc == c].mean(0) - ctrl for c in conds})
    for s in (7777, 1, 2):
        prof = vae.predict_mean(conds + [D.CONTROL], n_cells=4000, n_draws=50, seed=s, unknown="ignore")
        out[f"predict_mean_seed_{s}"] = score({c: (prof.loc[c] - prof.loc[D.CONTROL]).to_numpy() for c in conds})
    return out


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        raise SystemExit(0)
    print(json.dumps(main(sys.argv[1:])), flush=True)
