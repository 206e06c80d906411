"""How well can the latents be recovered at all on the identifiability grid's simulations?
Oracle bounds for the ``R^2(z_inv) >= 0.95`` and ``MCC >= 0.9`` targets (README, *Identifiability*).

    python analyses/inv_recovery_bound.py [--grid small] [--conditions base deep_sequencing ...]
        [--seeds 2 | --seed-list 0 6 7] [--fit] [--out analyses/results/inv_recovery_bound]

For each condition and seed the simulation is drawn exactly as the study draws it, and scored on
the study's cells (controls and singles) with its scores:

* ``r2_oracle``: each cell's z_inv estimated by an oracle that knows everything but z_inv (the
  true decoder, dispersions, library size and the cell's true z_pert), the MAP of
  ``log p(x | z_inv, z_pert_true, l) + log N(z_inv; 0, I)`` (the simulator's NB likelihood),
  found by L-BFGS from 0 and from the truth (each cell's better optimum kept);
* ``r2_oracle_joint`` / ``mcc_oracle_joint``: the MAP of z_inv and eps together, ``z_pert = (I -
  W_c)^{-1}(eps + shift_c)`` with the true DAG and shift of the cell's condition: the posterior a
  model would target had it learned the truth. A fitted model that also infers z_pert cannot be
  expected to do better;
* ``mcc_exogenous_truth``: the MCC of the true exogenous latents ``(I - W_c) z_pert`` against the
  true ``z_pert``. The model's shift interventions leave W unidentified and the sparse rotation
  folds it into the decoder, so its z_pert aim at the exogenous latents: recovered exactly, they
  would score this (a reference point, not a bound: an inexact recovery may mix towards the
  propagated latents and score higher or lower);
* ``_controls`` / ``_perturbed``: the R^2's held-out error on each group, on the scale of the whole;
* ``probe_inv_from_x``: the study's ridge read-out of the expression;
* ``r2_oracle_joint_nonlinear`` (and with ``--fit`` ``r2_inv_refined_nonlinear``): the same halves
  scored by a kernel ridge regression instead of a linear map (``identifiability.nonlinear_r2``):
  near the linear R^2 when the latents are a linear image of the truth, above it when they are
  a smooth nonlinear warp of it (information kept, but not linearly).

``--fit`` also fits the study's model (its settings and split for that condition and seed) and
reports ``r2_inv`` (the encoder's posterior means) and, for each cell's refined posterior under
the *fitted* model (``PerturbedVAE.latents(refine_steps=...)``, as the study's ``*_refined``
scores), ``r2_inv_refined`` (all, controls, perturbed) and ``mcc_pert_refined``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _true_decoder(truth):
    """log-proportions of the simulator's decoder, ``log_softmax(baseline + f([z_inv, z_pert]))``."""
    import torch

    t = lambda k: torch.as_tensor(np.asarray(truth[k]), dtype=torch.float64)  # noqa: E731
    A, base = t("decoder_A"), t("baseline_logit")
    nonlinear = str(truth["decoder_kind"]) == "nonlinear"
    B, C, b = t("decoder_B"), t("decoder_C"), t("decoder_b")

    def log_rho(z):
        logits = base + z @ A.T
        if nonlinear:
            logits = logits + (torch.tanh(z @ C.T + b) - torch.tanh(b)) @ B.T
        return torch.log_softmax(logits, -1)
    return log_rho


def oracle_latents(adata, idx, joint: bool = False, n_iter: int = 200):
    """MAP latents of cells ``idx`` under the simulator's truth (decoder, dispersions, library).

    ``joint=False``: z_inv alone, given each cell's true z_pert. ``joint=True``: z_inv and eps
    together, ``z_pert = (I - W_c)^{-1}(eps + shift_c)`` with the true W_c and shift of the cell's
    condition and ``eps ~ N(0, I)``: the posterior a model that had learned the truth exactly
    would target. Returns ``(z_inv, z_pert)`` (numpy)."""
    import scipy.sparse as sp
    import torch
    from pyro_pvae.simulate import condition_spec

    truth = adata.uns["truth"]
    D, K = int(truth["n_inv_latents"]), int(truth["n_pert_latents"])
    theta = torch.as_tensor(np.asarray(truth["theta"]), dtype=torch.float64)
    log_rho = _true_decoder(truth)
    X = adata.X[idx]
    x = torch.as_tensor(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=torch.float64)
    zp_true = torch.as_tensor(adata.obsm["z_pert_true"][idx], dtype=torch.float64)
    log_lib = torch.as_tensor(np.log(adata.obs["library_true"].to_numpy()[idx]), dtype=torch.float64)
    labels = adata.obs["condition"].astype(str).to_numpy()[idx]
    I_minus_W, shift = np.zeros((len(idx), K, K)), np.zeros((len(idx), K))
    for c in np.unique(labels):
        s, Wc = condition_spec(truth, c)
        I_minus_W[labels == c], shift[labels == c] = np.eye(K) - Wc, s
    I_minus_W, shift = torch.as_tensor(I_minus_W), torch.as_tensor(shift)

    def z_pert_of(v):
        if not joint:
            return zp_true
        return torch.linalg.solve_triangular(I_minus_W, (v[:, D:] + shift).unsqueeze(-1), upper=False).squeeze(-1)

    def neg_log_posterior(v):  # per cell (cells are independent); the prior is N(0, I) on z_inv (and eps)
        log_mu = log_lib.unsqueeze(-1) + log_rho(torch.cat([v[:, :D], z_pert_of(v)], -1))
        nb = torch.distributions.NegativeBinomial(total_count=theta, logits=log_mu - theta.log())
        return -(nb.log_prob(x).sum(-1) - 0.5 * (v ** 2).sum(-1))

    true_start = torch.as_tensor(adata.obsm["z_inv_true"][idx], dtype=torch.float64)
    if joint:  # eps = (I - W_c) z_pert - shift
        true_start = torch.cat([true_start, (I_minus_W @ zp_true.unsqueeze(-1)).squeeze(-1) - shift], -1)
    best, best_val = None, None
    for start in (torch.zeros_like(true_start), true_start):
        v = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], max_iter=n_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

        def closure():
            opt.zero_grad()
            loss = neg_log_posterior(v).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():  # keep each cell's better optimum of the two starts
            val = neg_log_posterior(v)
        if best is None:
            best, best_val = v.detach().clone(), val
        else:
            better = val < best_val
            best[better], best_val = v.detach()[better], torch.minimum(val, best_val)
    with torch.no_grad():
        return best[:, :D].numpy(), z_pert_of(best).numpy()


def group_r2(z_hat, z_true, perturbed, seed: int) -> dict:
    """The study's ``linear_r2`` (the same random half fits the map, the other half is scored),
    with the held-out squared error split by group: ``controls`` and ``perturbed`` are 1 - the
    group's mean squared error over the held-out cells' mean total variance, so the two read on
    the scale of ``all``."""
    from pyro_pvae import identifiability as idf

    te, resid, y = idf.heldout_linear_fit(z_hat, z_true, seed=seed)
    sq_err = (resid ** 2).sum(1)
    total = ((y - y.mean(0)) ** 2).sum(1).mean()
    return {"all": idf.linear_r2(z_hat, z_true, seed=seed),
            "controls": float(1 - sq_err[~perturbed[te]].mean() / total),
            "perturbed": float(1 - sq_err[perturbed[te]].mean() / total)}


def fitted_scores(cond: dict, seed: int, adata, idx, perturbed) -> dict:
    """The study's fit of ``cond`` on ``adata``, scored on cells ``idx``: ``r2_inv`` of the encoder
    means; ``r2_inv_refined`` (all, controls, perturbed) and ``mcc_pert_refined`` of each cell's
    refined posterior under the fitted model (module docstring)."""
    from identifiability import REFINE_STEPS, fit_condition
    from pyro_pvae import identifiability as idf

    vae = fit_condition(cond, seed, adata)
    zi_true = adata.obsm["z_inv_true"][idx]
    refined = vae.latents(adata, idx, refine_steps=REFINE_STEPS)
    r2 = group_r2(refined["z_inv"], zi_true, perturbed, seed)
    return {"r2_inv": idf.linear_r2(vae.latents(adata, idx)["z_inv"], zi_true, seed=seed),
            "r2_inv_refined": r2["all"], "r2_inv_refined_controls": r2["controls"],
            "r2_inv_refined_perturbed": r2["perturbed"],
            "r2_inv_refined_nonlinear": idf.nonlinear_r2(refined["z_inv"], zi_true, seed=seed),
            "mcc_pert_refined": idf.mcc(adata.obsm["z_pert_true"][idx], refined["z_pert"]).value}


def main(argv) -> str:
    import argparse

    import torch

    import pandas as pd

    from identifiability import _exogenous, _lognorm, _ridge_r2, load_grid, resolve_conditions, simulate_condition
    from norman_fit import write_summary
    from signal_imbalance import _markdown
    from pyro_pvae import identifiability as idf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="small")
    ap.add_argument("--conditions", nargs="*", default=["base", "deep_sequencing", "data_rich", "linear_sim",
                                                        "cell_cycle_weak"])
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the grid's)")
    ap.add_argument("--seed-list", type=int, nargs="+", default=None, help="these seeds instead of --seeds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fit", action="store_true", help="also fit the study's model: encoder vs refined R^2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # as the study's fits (bitwise reproducible: fit_and_score)
    grid = load_grid(args.grid)
    conds = {c["name"]: c for c in resolve_conditions(grid)}
    unknown = [c for c in args.conditions if c not in conds]
    if unknown:
        raise SystemExit(f"error: unknown condition(s) {unknown}; the grid has {sorted(conds)}")
    rows = []
    for name in args.conditions:
        for seed in args.seed_list or range(args.seeds or int(grid.get("seeds", 2))):
            adata = simulate_condition(conds[name], seed)
            idx = np.flatnonzero(adata.obs["n_targets"].to_numpy() <= 1)  # as the study scores
            perturbed = adata.obs["n_targets"].to_numpy()[idx] > 0
            zi_true, zp_true = adata.obsm["z_inv_true"][idx], adata.obsm["z_pert_true"][idx]
            known = group_r2(oracle_latents(adata, idx)[0], zi_true, perturbed, seed)
            zi_joint, zp_joint = oracle_latents(adata, idx, joint=True)
            joint = group_r2(zi_joint, zi_true, perturbed, seed)
            rows.append({"condition": name, "seed": seed,
                         "r2_oracle": known["all"], "r2_oracle_controls": known["controls"],
                         "r2_oracle_perturbed": known["perturbed"],
                         "r2_oracle_joint": joint["all"], "r2_oracle_joint_controls": joint["controls"],
                         "r2_oracle_joint_perturbed": joint["perturbed"],
                         "r2_oracle_joint_nonlinear": idf.nonlinear_r2(zi_joint, zi_true, seed=seed),
                         "mcc_oracle_joint": idf.mcc(zp_true, zp_joint).value,
                         "mcc_exogenous_truth": idf.mcc(zp_true, _exogenous(adata, idx)).value,
                         "probe_inv_from_x": _ridge_r2(_lognorm(adata.X[idx]), zi_true, seed),
                         **(fitted_scores(conds[name], seed, adata, idx, perturbed) if args.fit else {})})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    mean = df.groupby("condition", sort=False).mean(numeric_only=True).drop(columns="seed")
    text = (f"# Oracle bounds on R^2(z_inv) and MCC (`python analyses/inv_recovery_bound.py {' '.join(argv)}`)\n\n"
            "Mean over seeds, on the study's cells (controls and singles). `r2_oracle`: MAP z_inv knowing the "
            "true decoder, dispersions, library and z_pert; `r2_oracle_joint`: MAP z_inv and eps together, "
            "knowing the true globals and each cell's condition (the posterior of a model that had learned the "
            "truth), with `mcc_oracle_joint` its z_pert's MCC; `mcc_exogenous_truth`: the MCC of latents equal "
            "to the true exogenous ones, (I - W_c) z_pert (what a model that leaves the DAG's edges in the decoder "
            "would score with its latents recovered exactly). R^2 is the study's linear_r2; `_controls` / `_perturbed`: its held-out error on "
            "each group, on the scale of the whole (1 - group MSE / total variance). With `--fit`: `r2_inv`, "
            "the fitted encoder's means; `r2_inv_refined` (and by group) and `mcc_pert_refined`, each cell's "
            "refined posterior under the fitted model. `_nonlinear`: the same halves scored by kernel ridge "
            "regression instead of a linear map (above the linear R^2 only if the latents are a nonlinear warp "
            "of the truth).\n\n" + _markdown(mean.round(3).reset_index()) + "\n")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(args.out) / "results.csv", index=False)
    return write_summary(args.out, text)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
