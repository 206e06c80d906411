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
    import torch

    from norman_fit import fit_norman
    from pyro_pvae.utils import atomic_write_text, to_dense

    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    torch.set_num_threads(1)
    overrides = ["model.library_model=true"] + list(argv)
    adata, split, vae, _ = fit_norman(overrides)
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
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "summary.md", text)
    return text


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    print(main(sys.argv[1:]))
