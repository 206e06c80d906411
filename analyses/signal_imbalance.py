"""Signal imbalance on the shipped real cells: do the invariant latents keep their variation,
are effects learned whatever the KL weight, does the model reproduce the singles it has seen,
and what does the post-fit work cost.

    python analyses/signal_imbalance.py [--out analyses/results/signal_imbalance] [--presets default paper]

For each preset (``default``: ``--config norman``; ``paper``: ``--config norman model=paper
train=paper``) one fit on the ``complete_doubles`` split, then:

* ``invariant_spread``: mean over z_inv dimensions of the across-cell sd of the posterior means
  (training cells); near 0 means z_inv collapsed to a point;
* ``effects_pip_above_0.5``: effects switched on;
* seen singles: for each single whose training cells the model saw, the held-out cells' change
  from the held-out reference controls, predicted by the model (its posterior predictive mean,
  ``predict_mean``: 4,000 predicted cells minus as many predicted controls from the same
  starting cells, the benchmark's point prediction) and by the mean of the single's training
  cells (minus the training controls' mean); Pearson over all genes and pseudobulk RMSE;
* ``post_fit_seconds`` / ``epoch_seconds``: the fixed cost of a 1-epoch fit beyond its one
  training epoch (rotation, effects table), one thread, against one epoch of training.

Writes ``results.csv`` and ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PRESETS = {"default": [], "paper": ["model=paper", "train=paper"]}


def seen_singles(vae, adata, split, n_draws: int = 50, n_cells: int = 4000) -> dict:
    from pyro_pvae import data as D
    from pyro_pvae.data.splits import heldout_control_idx
    from pyro_pvae.utils import lognormalize, to_dense

    cond = adata.obs["condition"].astype(str).to_numpy()
    L = to_dense(lognormalize(adata.X), np.float64)
    train, test = np.asarray(split.train_idx), np.asarray(split.test_idx)
    ref = L[heldout_control_idx(split, adata)].mean(0)
    train_ctrl = L[train[cond[train] == D.CONTROL]].mean(0)
    singles = [c for c, group in split.test_groups.items() if group == "single" and (cond[train] == c).any()]
    means = vae.predict_mean(singles + [D.CONTROL], n_cells=n_cells, n_draws=n_draws, seed=1)
    rows = []
    for c in singles:
        obs = L[test[cond[test] == c]].mean(0) - ref
        mean_of_training = L[train[cond[train] == c]].mean(0) - train_ctrl
        model = (means.loc[c] - means.loc[D.CONTROL]).to_numpy()
        for name, pred in (("model", model), ("training_mean", mean_of_training)):
            rows.append({"condition": c, "method": name, "pearson_delta_all": float(np.corrcoef(pred, obs)[0, 1]),
                         "pseudobulk_rmse_all": float(np.sqrt(np.mean((pred - obs) ** 2)))})
    df = pd.DataFrame(rows)
    return {f"{m}_{k}": float(df[df.method == m][k].mean()) for m in ("model", "training_mean")
            for k in ("pearson_delta_all", "pseudobulk_rmse_all")}


def post_fit_cost(overrides) -> dict:
    """Seconds of a 1-epoch fit beyond its training epoch (one thread)."""
    from norman_fit import fit_norman

    _, _, vae, _ = fit_norman(list(overrides) + ["train.epochs=1", "train.min_steps=0"], fit=False)
    t0 = time.perf_counter()
    vae.fit()
    vae.effects()
    total = time.perf_counter() - t0
    epoch = vae.history[0]["seconds"]
    return {"post_fit_seconds": total - epoch, "epoch_seconds": epoch}


def _markdown(df: pd.DataFrame) -> str:
    rows = [list(df.columns), ["---"] * df.shape[1]] + df.astype(str).values.tolist()
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def main(argv=None) -> int:
    from norman_fit import fit_norman

    from pyro_pvae.utils import atomic_write_csv, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="analyses/results/signal_imbalance")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.presets:
        adata, split, vae, seconds = fit_norman(PRESETS[name])
        row = {"preset": name, "fit_seconds": seconds, "epochs": len(vae.history),
               "invariant_spread": vae.invariant_spread(), "effects_pip_above_0.5": int((vae.pip() > 0.5).sum()),
               "effects": int(vae.pip().size), "c2": vae.module.composition_mean(),
               **seen_singles(vae, adata, split), **post_fit_cost(PRESETS[name])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    atomic_write_csv(out / "results.csv", df)
    lines = ["# Signal imbalance on the shipped real cells", "",
             f"`python analyses/signal_imbalance.py --presets {' '.join(args.presets)}` (one thread; see the script's "
             "docstring for every column)", "", _markdown(df.round(3)), ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
