"""Where a predicted cell's counts go under ``model.library_model`` (README, *Real Norman 2019
cells*, the library-size model).

    python analyses/library_diagnostics.py [overrides] [--out analyses/results/library_diagnostics]

One fit of ``--config norman model.library_model=true`` (one thread, ``train.seed`` 0 unless
overridden). For KLF1 and its two held-out doubles: the 5 genes whose share of the counts rises
most in the held-out cells (against the training controls), that share in the held-out cells,
in 2,000 predicted cells and in the controls, and the mean total counts and the mean counts of
the other genes. If the predicted total is right but the share of the rising genes too low, the
extra depth lands on the other genes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONDITIONS = ("KLF1", "KLF1+MAP2K6", "KLF1+TGFBR2")


def main(argv) -> str:
    from norman_fit import fit_norman_one_thread, parse_out, write_summary
    from pyro_pvae.utils import to_dense

    argv, out = parse_out(argv)
    adata, split, vae = fit_norman_one_thread(["model.library_model=true"] + argv)
    cond = adata.obs["condition"].astype(str).to_numpy()
    X = to_dense(adata.X, np.float64)
    genes = np.asarray(adata.var_names).astype(str)
    test, train = np.asarray(split.test_idx), np.asarray(split.train_idx)
    ctrl = X[train[cond[train] == "control"]]
    lines = [f"# Library-size model: where the predicted counts go (`python analyses/library_diagnostics.py "
             f"{' '.join(argv)}`)", "",
             "| condition | rising genes | their share: held-out / predicted / controls | mean total: held-out / "
             "predicted / controls | other genes' mean counts: held-out / predicted / controls |",
             "|---|---|---|---|---|"]
    for c in CONDITIONS:
        pred = vae.predict([c], n_cells=2000, seed=0, unknown="ignore")
        P = to_dense(pred.X, np.float64)
        obs = X[test[cond[test] == c]]
        top = np.argsort(-(obs.sum(0) / obs.sum() - ctrl.sum(0) / ctrl.sum()))[:5]
        share = [M[:, top].sum() / M.sum() for M in (obs, P, ctrl)]
        total = [M.sum(1).mean() for M in (obs, P, ctrl)]
        rest = [np.delete(M, top, 1).sum(1).mean() for M in (obs, P, ctrl)]
        lines.append(f"| {c} | {', '.join(genes[top])} | {' / '.join(f'{v:.3f}' for v in share)} | "
                     f"{' / '.join(f'{v:.0f}' for v in total)} | {' / '.join(f'{v:.0f}' for v in rest)} |")
    return write_summary(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    from norman_fit import script

    script(__doc__, main)
