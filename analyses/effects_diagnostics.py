"""Why the model's doubles miss on ``norman_effects``: composition scale, top-gene shrinkage and
how the choice of top-20 genes moves coverage (seed 0 fit of the preset, 63 held-out doubles).

    python analyses/effects_diagnostics.py [model.KEY=VALUE ...] [--model saved.pt] [--save fit.pt]

Fits ``--config norman_effects`` with the overrides (one thread, ``train.seed=0``; about 10 min)
or loads ``--model``, then prints one JSON line:

* the fitted composition: ``c2`` (posterior mean), the latent interaction scale ``tau`` and share
  ``pair_pi``, with ``model.gene_interactions`` / ``gene_effects`` the gene-level interaction
  scale ``b_I``, with ``model.pair_composition`` the spread ``c_spread`` of log c over pairs and the
  10% / 90% quantiles of the training pairs' own c;
* over the held-out doubles, on each double's 20 genes of largest |real change|: the mean
  |real change|, |model change| (posterior predictive mean, as the benchmark scores it) and
  |sum of the model's own predictions of the two singles|;
* coverage of the 90% intervals (50 draws, as many cells as held out) of the real change over
  all genes and over the top-20 genes picked three ways: on the real change (the scored value),
  on the held-out cells' observed change (the benchmark's choice), and on the sum of the two
  training singles' observed changes (what a predictor knows).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main(overrides, model_path=None, save=None) -> dict:
    from omegaconf import OmegaConf

    from pyro_pvae import data as D
    from pyro_pvae.api import PerturbedVAE
    from pyro_pvae.benchmark import (_conditions, _fit_model, effects_change_draws, hydra_overrides, model_changes,
                                     pseudobulk_log1p_cpm, top_genes, train_settings)
    from pyro_pvae.config import compose, load_dataset, resolve_split
    from pyro_pvae.data.splits import heldout_control_idx
    from pyro_pvae.metrics import coverage

    torch.set_num_threads(1)
    cfg = compose("norman_effects", hydra_overrides(overrides))
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    if model_path:
        vae = PerturbedVAE.load(model_path, adata=adata)
    else:
        vae = _fit_model(adata, split, OmegaConf.to_container(cfg.model, resolve=True),
                         train_settings(cfg, overrides), "PerturbedVAE", 0)
        if save:
            vae.save(save)
    means = vae.module.global_means()
    out = {"c2": round(float(means.get("c2", torch.tensor(1.0))), 3)}
    if "pair_scale" in means:
        out.update(tau=round(float(means["pair_scale"]), 3), pair_pi=round(float(means["pair_pi"]), 3))
    if "gene_pair_scale" in means:
        out["b_I"] = round(float(means["gene_pair_scale"]), 3)
    if "c_spread" in means:  # model.pair_composition: sd of log c over pairs, and the training pairs' c
        out["c_spread"] = round(float(means["c_spread"]), 3)
        out["c_pair_range"] = [round(float(v), 3) for v in means["pair_log_c"].exp().quantile(torch.tensor([0.1, 0.9]))]

    truth = adata.uns["truth"]
    real = {str(c): np.asarray(truth["true_delta_log1p_cpm"])[i] for i, c in enumerate(truth["conditions"])}
    cond = _conditions(adata)
    tr, te = np.asarray(split.train_idx), np.asarray(split.test_idx)
    ctrl_held = pseudobulk_log1p_cpm(adata.X[heldout_control_idx(split, adata)])
    ctrl_train = pseudobulk_log1p_cpm(adata.X[tr[cond[tr] == D.CONTROL]])
    doubles = [c for c in split.test_groups if c in real]
    singles = sorted({s for c in doubles for s in D.parse_condition(c)})
    change = model_changes(vae, doubles + singles, n_cells=2000, n_draws=50, seed=0)
    rows = []
    for i, c in enumerate(doubles):
        a, b = D.parse_condition(c)
        cells = te[cond[te] == c]
        observed = pseudobulk_log1p_cpm(adata.X[cells]) - ctrl_held
        singles_sum = sum(pseudobulk_log1p_cpm(adata.X[tr[cond[tr] == s]]) - ctrl_train for s in (a, b))
        draws = effects_change_draws(vae, c, 50, len(cells), i)
        t = real[c]
        top = top_genes(t)
        picked = [top, top_genes(observed), top_genes(singles_sum)]
        rows.append([np.abs(t[top]).mean(), np.abs(change[c][top]).mean(), np.abs((change[a] + change[b])[top]).mean(),
                     coverage(draws, t, 0.9)] + [coverage(draws[:, g], t[g], 0.9) for g in picked])
    names = ["top20_abs_real_change", "top20_abs_model_change", "top20_abs_model_singles_sum", "coverage90_all",
             "coverage90_top20_picked_on_real", "coverage90_top20_picked_on_heldout_cells",
             "coverage90_top20_picked_on_training_singles"]
    out.update({k: round(float(v), 3) for k, v in zip(names, np.mean(rows, 0))})
    out["n_doubles"] = len(doubles)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--model", help="a saved model (PerturbedVAE.save) of this config instead of a fit")
    ap.add_argument("--save", help="where to save the fitted model")
    args = ap.parse_args()
    print(json.dumps(main(args.overrides, args.model, args.save)))
