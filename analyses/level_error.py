"""Where the model's pseudobulk level error on the real held-out doubles comes from, against
the linear baseline's (README, *Real Norman 2019 cells*).

    python analyses/level_error.py [overrides] [--out analyses/results/level_error]

One fit of ``--config norman`` (one thread, ``train.seed`` 0 unless overridden); the model's
point prediction exactly as the benchmark's seed 0 computes it (``predict_mean``, 4,000 cells,
50 draws, seed 7777) and the linear baseline's exact one. Prints and writes (``summary.md``):

* the control level: RMSE of the model's predicted control mean, of the training control
  mean and of all training cells' mean against the held-out control mean;
* per held-out double: pseudobulk RMSE of model and linear, and the mean |change| over genes
  of model, linear and the observed change;
* the genes where the model's squared error exceeds linear's most (summed over the doubles),
  and the share of that excess in the 20% most expressed genes (by training control mean);
* how each method composes the double: the least-squares factor ``<d_AB, d_A + d_B> / |d_A +
  d_B|^2`` of its predicted double change on the sum of its own predicted single changes
  (the singles predicted after the doubles, so the doubles' numbers do not move), against the
  same factor of the full Norman data's pseudobulk log fold changes (the package's
  ``datasets.norman19_effects()``, 2,000 genes of every cell, not the shipped subset) on the
  genes the two share; and the mean |change| over genes of its two singles, model and linear;
* for the doubles and their singles, the model's mean |change| and pseudobulk RMSE (against the
  held-out cells) from its point prediction and from a plug-in one, the globals at their
  posterior mean (``predict_mean(posterior_mean=True)``): does the posterior averaging shrink?
* the doubles predicted with the composition scale c2's posterior moved to a median of 0.8, 0.9
  and 1.0 (its spread kept; :func:`composition_at`; the training doubles' start cells move back to
  control with it too), against the learned c2: pseudobulk RMSE, Pearson delta and the predicted HBZ
  level of each double. Can one c2 serve the five doubles?
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv) -> str:
    from norman_fit import fit_norman_one_thread, parse_out, write_summary
    from pyro_pvae import benchmark as B
    from pyro_pvae import data as D
    from pyro_pvae.baselines import make_baseline
    from pyro_pvae.metrics import rmse

    argv, out = parse_out(argv)
    adata, split, vae = fit_norman_one_thread(argv)
    D.lognormalize(adata)
    ref = B.observed_reference(adata, split)
    doubles = [c for c, g in ref.groups.items() if g == "seen2"]
    prof = vae.predict_mean(doubles + [D.CONTROL], n_cells=4000, n_draws=50, seed=7777, unknown="ignore")
    lin = make_baseline("linear", seed=0).fit(adata, split)
    model_ctrl = prof.loc[D.CONTROL].to_numpy()
    train_ctrl, held_ctrl = ref.train_control.mean(0), ref.control.mean(0)
    all_train = np.asarray(adata.layers["lognorm"][np.asarray(split.train_idx)].mean(0)).ravel()
    genes = np.asarray(adata.var_names).astype(str)
    lines = [f"# Level error on the held-out doubles (`python analyses/level_error.py {' '.join(argv)}`)", "",
             f"Control level vs the held-out controls: model {rmse(model_ctrl, held_ctrl):.4f}, "
             f"training controls {rmse(train_ctrl, held_ctrl):.4f}, all training cells "
             f"{rmse(all_train, held_ctrl):.4f} (RMSE over genes).", "",
             "| double | pseudobulk RMSE model | linear | mean abs change model | linear | observed |",
             "|---|---|---|---|---|---|"]
    excess = np.zeros(len(genes))
    for c in doubles:
        obs = ref.observed[c].mean(0)
        model, linear = prof.loc[c].to_numpy(), lin.control_mean_ + lin.predict_change(c)
        excess += (model - obs) ** 2 - (linear - obs) ** 2
        lines.append(f"| {c} | {rmse(model, obs):.4f} | {rmse(linear, obs):.4f} | "
                     f"{np.abs(model - model_ctrl).mean():.3f} | {np.abs(linear - train_ctrl).mean():.3f} | "
                     f"{np.abs(obs - held_ctrl).mean():.3f} |")
    high = train_ctrl > np.quantile(train_ctrl, 0.8)
    top = np.argsort(-excess)[:10]
    lines += ["", f"Excess squared error of the model over linear, summed over genes and doubles: {excess.sum():.3f}; "
              f"in the 20% most expressed genes: {excess[high].sum():.3f} ({excess[high].sum() / excess.sum():.0%}).",
              "", "| gene | excess | training control mean | model control | held-out control mean |",
              "|---|---|---|---|---|"]
    lines += [f"| {genes[j]} | {excess[j]:.3f} | {train_ctrl[j]:.2f} | {model_ctrl[j]:.2f} | {held_ctrl[j]:.2f} |"
              for j in top]
    singles = sorted({t for c in doubles for t in D.parse_condition(c)})
    single_prof = vae.predict_mean(singles + [D.CONTROL], n_cells=4000, n_draws=50, seed=7778, unknown="ignore")
    lines += ["", *composition_table(lin, doubles, prof, single_prof, genes)]
    lines += ["", *plugin_table(vae, ref, doubles + singles, prof, single_prof)]
    lines += ["", *composition_sensitivity_table(vae, ref, doubles, prof, lin)]
    return write_summary(out, "\n".join(lines) + "\n")


def composition_factor(double_change, single_changes) -> float:
    """Least-squares factor c of ``double_change ~ c (sum of single_changes)``."""
    total = np.sum(single_changes, axis=0)
    return float(double_change @ total / (total @ total))


def composition_table(lin, doubles, prof, single_prof, genes) -> list[str]:
    """Markdown rows: each double's composition factor for the model, linear and the full data."""
    from pyro_pvae import data as D
    from pyro_pvae.datasets import norman19_effects

    ctrl, single_ctrl = prof.loc[D.CONTROL].to_numpy(), single_prof.loc[D.CONTROL].to_numpy()
    eff = norman19_effects()
    s_row = {str(s): i for i, s in enumerate(eff["sing_labels"])}
    d_row = {str(d): i for i, d in enumerate(eff["doub_labels"])}
    shared = np.isin(np.asarray(eff["genes_hvg"]).astype(str), genes)
    rows = ["How each composes the double: least-squares factor of its double change on the sum of its single "
            "changes (1: additive)", "",
            "| double | model | linear | full Norman data (pseudobulk, %d shared genes) | mean abs change of its "
            "singles, model | linear |" % shared.sum(),
            "|---|---|---|---|---|---|"]
    for c in doubles:
        targets = D.parse_condition(c)
        model = composition_factor(prof.loc[c].to_numpy() - ctrl,
                                   [single_prof.loc[t].to_numpy() - single_ctrl for t in targets])
        linear = composition_factor(lin.predict_change(c), [lin.predict_change(t) for t in targets])
        key = next((k for k in ("+".join(targets), "+".join(targets[::-1])) if k in d_row), None)
        full = (composition_factor(eff["lfc_d"][d_row[key]][shared], [eff["lfc_s"][s_row[t]][shared] for t in targets])
                if key is not None and all(t in s_row for t in targets) else float("nan"))
        size_model = np.mean([np.abs(single_prof.loc[t].to_numpy() - single_ctrl).mean() for t in targets])
        size_linear = np.mean([np.abs(lin.predict_change(t)).mean() for t in targets])
        rows.append(f"| {c} | {model:.2f} | {linear:.2f} | {full:.2f} | {size_model:.3f} | {size_linear:.3f} |")
    return rows


def plugin_table(vae, ref, conds, prof, single_prof) -> list[str]:
    """Markdown rows: the model's mean |change| and pseudobulk RMSE (against the condition's held-out
    cells) from its point prediction, the posterior predictive mean, and from a plug-in prediction
    with the globals at their posterior mean (``predict_mean(posterior_mean=True)``)."""
    from pyro_pvae import data as D
    from pyro_pvae.metrics import rmse

    plug = vae.predict_mean(conds + [D.CONTROL], n_cells=4000, n_draws=50, seed=7779, unknown="ignore",
                            posterior_mean=True)
    rows = ["Does the posterior averaging shrink the changes? The point prediction (predictive mean) against "
            "the globals at their posterior mean (plug-in)", "",
            "| condition | mean abs change: predictive mean | plug-in | pseudobulk RMSE: predictive mean | plug-in |",
            "|---|---|---|---|---|"]
    for c in conds:
        mean = prof if c in prof.index else single_prof
        pred, plugged = mean.loc[c].to_numpy(), plug.loc[c].to_numpy()
        sizes = (np.abs(pred - mean.loc[D.CONTROL].to_numpy()).mean(), np.abs(plugged - plug.loc[D.CONTROL].to_numpy()).mean())
        obs = ref.observed[c].mean(0) if c in ref.observed else None
        errors = ("n/a", "n/a") if obs is None else (f"{rmse(pred, obs):.4f}", f"{rmse(plugged, obs):.4f}")
        rows.append(f"| {c} | {sizes[0]:.3f} | {sizes[1]:.3f} | {errors[0]} | {errors[1]} |")
    return rows


@contextmanager
def composition_at(vae, c2: float):
    """While inside, the posterior of the composition scale c2 has median ``c2`` (its log-scale
    spread kept); the fitted value is restored on leaving."""
    import torch

    param = vae.module.c2_loc
    fitted = param.detach().clone()
    with torch.no_grad():
        param.fill_(math.log(c2))
    try:
        yield vae
    finally:
        with torch.no_grad():
            param.copy_(fitted)


def composition_sensitivity_table(vae, ref, doubles, prof, lin, levels=(0.8, 0.9, 1.0), gene: str = "HBZ"
                                  ) -> list[str]:
    """Markdown rows: each double's pseudobulk RMSE / Pearson delta / predicted ``gene`` level with the
    learned c2 and with c2 moved to each of ``levels`` (predictions only; the fit is unchanged)."""
    from pyro_pvae import data as D
    from pyro_pvae.metrics import pearson, rmse

    g = list(map(str, ref.genes)).index(gene)
    held_ctrl = ref.control.mean(0)
    learned = math.exp(float(vae.module.c2_loc))  # the median, like the levels
    profiles = {f"learned ({learned:.2f})": prof}
    for level in levels:
        with composition_at(vae, level):
            profiles[f"{level:g}"] = vae.predict_mean(doubles + [D.CONTROL], n_cells=4000, n_draws=50, seed=7777,
                                                      unknown="ignore")
    rows = [f"Can one composition scale serve the five doubles? The model's doubles with c2 moved to a median of "
            f"{', '.join(f'{v:g}' for v in levels)} at prediction (its spread kept), against the learned c2: "
            f"pseudobulk RMSE / Pearson delta / predicted {gene} (held-out controls: {held_ctrl[g]:.2f})", "",
            "| double | observed " + gene + " | linear | " + " | ".join(f"c2 {k}" for k in profiles) + " |",
            "|---" * (3 + len(profiles)) + "|"]
    sums = {k: [] for k in ["linear", *profiles]}
    for c in doubles:
        obs = ref.observed[c].mean(0)
        linear = lin.control_mean_ + lin.predict_change(c)  # as main()'s table
        cells = [f"{obs[g]:.2f}"]
        for key, pred, ctrl in [("linear", linear, lin.control_mean_)] + [
                (k, p.loc[c].to_numpy(), p.loc[D.CONTROL].to_numpy()) for k, p in profiles.items()]:
            score = (rmse(pred, obs), float(pearson(pred - ctrl, obs - held_ctrl)))
            sums[key].append(score)
            cells.append(f"{score[0]:.4f} / {score[1]:.3f} / {pred[g]:.2f}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    rows.append("| mean | | " + " | ".join(f"{np.mean([s[0] for s in v]):.4f} / {np.mean([s[1] for s in v]):.3f}"
                                        for v in sums.values()) + " |")
    return rows


if __name__ == "__main__":
    from norman_fit import script

    script(__doc__, main)
