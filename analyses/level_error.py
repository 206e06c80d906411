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
  and the share of that excess in the 20% most expressed genes (by training control mean).
"""
from __future__ import annotations

import sys
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
    return write_summary(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    from norman_fit import script

    script(__doc__, main)
