"""Compare settings (e.g. ``model.parameterisation``) on real cells and on a simulation with truth.

    python analyses/param_check.py real model.parameterisation=centered train.seed=1
    python analyses/param_check.py sim model.parameterisation=noncentered

``real``: one fit of ``--config norman`` (shipped Norman subset, ``complete_doubles`` split, one
thread) with the overrides. For each held-out single whose training cells the model saw, and for
each held-out double: Pearson correlation of the predicted pseudobulk change of log-normalised
expression with the observed change (held-out cells minus the held-out reference controls). The
model's change: singles, the training control cells moved to the single minus the same cells
as controls (posterior-mean globals, 5 draws of each cell); doubles, the posterior predictive
mean (10 draws x 300 cells, from its own predicted controls). For the singles also the mean of
their training cells (minus the training controls), and how well the model reconstructs its own
training cells' group means (their posterior latents) against that mean
(``single_reconstruction_vs_training_mean``) and against the held-out change
(``single_reconstruction``). ``pip_on_fraction``: the
share of effects with PIP > 0.5.

``sim``: one fit on the identifiability base simulation (``analyses/grids/small.yaml``, seed 0;
overrides ``model.KEY=VALUE`` / ``train.KEY=VALUE``): RMSE of the predicted change of 8 singles
and of the held-out doubles against the true change (``simulate.true_condition_means``), the
additive baseline's, and the ratio of predicted to true change norms.

``tiny``: the test suite's tiny fit; the share of effects with PIP > 0.5 against the truth's.

Prints one JSON line. Single seeds are noisy on the real subset: compare over ``train.seed``.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import yaml


def _pearson(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _apply_overrides(overrides, sections: dict) -> None:
    """``model.KEY=VALUE`` / ``train.KEY=VALUE`` into the dicts ``sections`` (YAML values)."""
    for kv in overrides:
        key, value = kv.split("=", 1)
        section, name = key.split(".", 1)
        sections[section][name] = yaml.safe_load(value)


def real(overrides) -> dict:
    from norman_fit import fit_norman

    from pyro_pvae import data as D
    from pyro_pvae.data.splits import heldout_control_idx
    from pyro_pvae.utils import lognormalize, to_dense

    adata, split, vae, seconds = fit_norman(overrides)
    out = {"fit_s": round(seconds), "invariant_spread": round(vae.invariant_spread(), 3),
           "pip_on_fraction": round(float((vae.pip() > 0.5).mean()), 3)}
    cond = adata.obs["condition"].astype(str).to_numpy()
    L = to_dense(lognormalize(adata.X), np.float64)
    X = torch.as_tensor(to_dense(adata.X, np.float32))
    train, test = np.asarray(split.train_idx), np.asarray(split.test_idx)
    ref = L[heldout_control_idx(split, adata)].mean(0)
    train_ctrl_idx = train[cond[train] == D.CONTROL]
    train_ctrl = L[train_ctrl_idx].mean(0)
    module = vae.module.eval()
    means = module.global_means()

    def drawn(idx, condition, local_latents):
        """mean log-normalised expression of 5 x len(idx) cells drawn from the cells ``idx``
        (posterior-mean globals): "posterior" = with their own latents, "counterfactual" = control
        cells moved to ``condition``"""
        u = torch.as_tensor(vae.perturbation_matrix([condition] * len(idx)), dtype=torch.float32)
        torch.manual_seed(0)
        return np.mean([lognormalize(module.sample_cells(X[idx], u, means, local_latents=local_latents)).mean(0).numpy()
                        for _ in range(5)], 0)

    ctrl_recon = drawn(train_ctrl_idx, D.CONTROL, "posterior")
    ctrl_pred = drawn(train_ctrl_idx, D.CONTROL, "counterfactual")
    scores: dict[str, list] = {}
    for c, group in split.test_groups.items():
        obs = L[test[cond[test] == c]].mean(0) - ref
        if group == "single":
            if not (cond[train] == c).any():
                continue
            own = train[cond[train] == c]
            training_mean = L[own].mean(0) - train_ctrl
            pred = drawn(train_ctrl_idx, c, "counterfactual") - ctrl_pred
            scores.setdefault("single_model", []).append(_pearson(pred, obs))
            scores.setdefault("single_training_mean", []).append(_pearson(training_mean, obs))
            recon = drawn(own, c, "posterior") - ctrl_recon
            scores.setdefault("single_reconstruction_vs_training_mean", []).append(_pearson(recon, training_mean))
            scores.setdefault("single_reconstruction", []).append(_pearson(recon, obs))
        else:
            pred = vae.predict_change_samples(c, n_draws=10, n_cells=300, seed=1).mean(0)
            scores.setdefault("double_model", []).append(_pearson(pred, obs))
            scores.setdefault("double_model_rmse", []).append(float(np.sqrt(np.mean((pred - obs) ** 2))))
    return {**out, **{k: round(float(np.mean(v)), 3) for k, v in scores.items()}}


def sim(overrides) -> dict:
    from identifiability import load_grid, resolve_conditions

    from pyro_pvae.api import PerturbedVAE
    from pyro_pvae.baselines import make_baseline
    from pyro_pvae.data import make_split
    from pyro_pvae.simulate import simulate, true_condition_means

    base = next(c for c in resolve_conditions(load_grid("small")) if c["name"] == "base")
    settings, model, train = base["sim"], base["model"], base["train"]
    preset = settings.pop("preset", "tiny")
    _apply_overrides(overrides, {"model": model, "train": train})
    adata = simulate(preset, 0, **settings)
    truth = adata.uns["truth"]
    split = make_split(adata, "norman_discrepancy", 0, heldout_singles=())
    t0 = time.perf_counter()
    vae = PerturbedVAE(adata, split=split, model=model, train={"seed": 0, **train}).fit()
    out = {"fit_s": round(time.perf_counter() - t0), "pip_on_fraction": round(float((vae.pip() > 0.5).mean()), 3)}
    singles = [str(p) for p in np.asarray(truth["perturbations"])][:8]
    doubles = [str(d) for d in np.asarray(truth["doubles"])]
    means = true_condition_means(adata, ["control"] + singles + doubles, n_cells=2000, seed=0)
    additive = make_baseline("additive").fit(adata, split)
    scores: dict[str, list] = {}
    for group, conds in (("single", singles), ("double", doubles)):
        for c in conds:
            true_change = means[c] - means["control"]
            pred = vae.predict_change_samples(c, n_draws=8, n_cells=250, seed=0).mean(0)
            scores.setdefault(f"{group}_rmse_model", []).append(np.sqrt(np.mean((pred - true_change) ** 2)))
            scores.setdefault(f"{group}_rmse_additive", []).append(
                np.sqrt(np.mean((additive.predict_change(c) - true_change) ** 2)))
            scores.setdefault(f"{group}_norm_ratio", []).append(np.linalg.norm(pred) / np.linalg.norm(true_change))
    return {**out, **{k: round(float(np.mean(v)), 3) for k, v in scores.items()}}


def tiny(overrides) -> dict:
    """The test suite's tiny fit (tests/conftest.py: ``simulate("tiny", 0)``, combo_seen split,
    4 + 4 latents, 100 epochs) with ``train.KEY=VALUE`` / ``model.KEY=VALUE`` overrides: the
    share of the true perturbations' effects with PIP > 0.5 against the truth's share."""
    from pyro_pvae import data as D
    from pyro_pvae.api import PerturbedVAE
    from pyro_pvae.simulate import simulate

    adata = simulate("tiny", seed=0)
    split = D.make_split(adata, "combo_seen", 0, unseen_gene_fraction=0.0, train_seen2_fraction=0.5)
    cfg = {"model": {"latent_inv": 4, "latent_pert": 4, "hidden": 64},
           "train": {"epochs": 100, "batch_size": 64, "progress": False, "early_stopping_patience": 100}}
    _apply_overrides(overrides, cfg)
    vae = PerturbedVAE(adata, split=split, model=cfg["model"], train=cfg["train"]).fit()
    truth = adata.uns["truth"]
    rows = [vae.vocabulary.index(p) for p in truth["perturbations"]]
    return {"pip_on_fraction": round(float((vae.pip()[rows] > 0.5).mean()), 3),
            "true_on_fraction": round(float(np.asarray(truth["gates"]).mean()), 3)}


def main(argv) -> None:
    if not argv or argv[0] not in ("real", "sim", "tiny"):
        raise SystemExit("usage: python analyses/param_check.py real|sim|tiny [KEY=VALUE ...]")
    torch.set_num_threads(1)
    import logging
    logging.getLogger("pyro_pvae").setLevel(logging.WARNING)
    result = {"data": argv[0], "overrides": argv[1:], **{"real": real, "sim": sim, "tiny": tiny}[argv[0]](argv[1:])}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
