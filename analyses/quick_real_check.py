"""A quick single-seed comparison of settings on the shipped real subset (not the benchmark).

    python analyses/quick_real_check.py                          # the norman preset
    python analyses/quick_real_check.py train.restore_best=true  # any override
    python analyses/quick_real_check.py model.decoder=hybrid

One fit of ``--config norman`` with the overrides (one thread); for the held-out doubles and
singles of its split: mean over conditions of the Pearson correlation and RMSE between the
predicted pseudobulk change of log-normalised expression (10 posterior draws x 200 cells, from
the model's own predicted controls) and the observed change, measured here simply from the
training controls' mean (the benchmark, ``python -m pyro_pvae.benchmark --config norman``,
uses held-out reference controls instead); the additive baseline on the same footing. Used to
choose ``train.restore_best`` and the decoder default; prints one JSON line.
"""
import json
import sys

import numpy as np
import torch


def main(overrides):
    from norman_fit import fit_norman

    from pyro_pvae import data as D
    from pyro_pvae.baselines import Additive
    from pyro_pvae.utils import lognormalize, to_dense

    torch.set_num_threads(1)
    adata, split, vae, seconds = fit_norman(overrides)
    res = {"overrides": list(overrides), "fit_s": round(seconds), "epochs": len(vae.history),
           "pip>0.5": int((vae.pip() > 0.5).sum()), "spread": round(vae.invariant_spread(), 3),
           "c2": round(vae.module.composition_mean(), 3)}
    cond = adata.obs["condition"].astype(str).to_numpy()
    L = to_dense(lognormalize(adata.X), np.float64)
    train, test = np.asarray(split.train_idx), np.asarray(split.test_idx)
    ctrl = L[train[cond[train] == D.CONTROL]].mean(0)
    additive = Additive().fit(adata, split)
    for group in ("single", "double"):
        scores = {"model": [], "additive": []}
        for c, g in split.test_groups.items():
            if (g == "single") != (group == "single"):
                continue
            obs = L[test[cond[test] == c]].mean(0) - ctrl
            preds = {"model": vae.predict_change_samples(c, n_draws=10, n_cells=200).mean(0),
                     "additive": additive.predict_change(c)}
            for name, pred in preds.items():
                scores[name].append((np.corrcoef(pred, obs)[0, 1], np.sqrt(np.mean((pred - obs) ** 2))))
        res[group] = {f"{name}_{metric}": round(float(np.mean([s[i] for s in v])), 4)
                      for name, v in scores.items() for i, metric in enumerate(("pearson", "rmse"))}
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
