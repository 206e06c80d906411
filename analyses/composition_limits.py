"""How well can simple composition models cover the REAL changes of held-out Norman doubles?

    python analyses/composition_limits.py [--seed 0]

Uses the real pseudobulk effects shipped with the package (``pyro_pvae/datasets/
norman19_pseudobulk_effects.npz``: ``lfc_s``, ``lfc_d``, log1p CPM changes of 104 singles and
130 doubles over 2,000 genes; the scale of the ``norman_effects`` benchmark), with NO sampling
noise: the singles' real changes are known exactly. A seeded half of the complete doubles
(both singles measured) trains each composition model, the other half is scored, as in the
``norman_effects`` split. Models of a double's change y given its singles' sum a = y_A + y_B:

* ``global c + Laplace(b)``: y = c a + r, c the median least-squares factor of the training
  pairs, r ~ Laplace(0, b) with one b (mean |residual| of the training pairs);
* ``global c + Laplace(b_g)``: the same with a scale per gene;
* ``c_pair ~ LogNormal + Laplace(b)``: a factor per pair drawn from the LogNormal fitted to
  the training pairs' factors, and one residual scale (the structure of the model's
  ``model.pair_composition=true model.gene_interactions=true``: c_2 with a spread over pairs,
  a gene-level interaction per pair with one learned scale b_I);
* ``c_pair ~ LogNormal + Laplace(b_g)``: the same with per-gene residual scales.

For each, the 90% predictive interval's coverage of the held-out doubles' real changes over all
genes, over each double's 20 genes of largest real |change| (chosen on the value scored, which
picks the genes where the double lies furthest out), and over the 20 genes of largest |sum of
its singles| (chosen on what a predictor knows). It shows how much of a double's top genes no
composition of its singles predicts within the spread that fits the other genes. Prints a
markdown table.

A second table: the Pearson delta (all genes) of the plain sum of the singles after projecting
each single onto the K leading principal directions of the 104 singles (all of them training
conditions in ``norman_effects``): how much of a double's pattern a model whose effects live in K
latent directions, read out linearly, can carry (the model's decoder is nonlinear, so this is a
guide, not a bound).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

EFFECTS = Path(__file__).resolve().parents[1] / "pyro_pvae" / "datasets" / "norman19_pseudobulk_effects.npz"


def coverage(draws: np.ndarray, y: np.ndarray, *tops: np.ndarray) -> tuple[float, ...]:
    """Share of all genes, then of each gene set in ``tops``, whose y lies in the 90% interval."""
    lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
    inside = (y >= lo) & (y <= hi)
    return (float(inside.mean()),) + tuple(float(inside[t].mean()) for t in tops)


def main(seed: int = 0, n_draws: int = 2000) -> list[tuple[str, float, float, float]]:
    e = np.load(EFFECTS)
    singles, doubles, parts = e["lfc_s"].astype(np.float64), e["lfc_d"].astype(np.float64), e["comp_idx"]
    rng = np.random.default_rng(seed)
    complete = np.flatnonzero(e["comp_ok"])
    rng.shuffle(complete)
    train, test = complete[: len(complete) // 2], complete[len(complete) // 2:]
    summed = singles[parts[:, 0]] + singles[parts[:, 1]]
    factors = np.array([summed[d] @ doubles[d] / (summed[d] @ summed[d]) for d in train])
    log_c = np.log(np.clip(factors, 1e-2, None))
    c = float(np.exp(np.median(log_c)))
    residual = doubles[train] - c * summed[train]
    b_global, b_gene = float(np.abs(residual).mean()), np.abs(residual).mean(0)
    models = {
        "global c + Laplace(b)": lambda: (c, b_global),
        "global c + Laplace(b_g)": lambda: (c, b_gene),
        "c_pair ~ LogNormal + Laplace(b)": lambda: (
            np.exp(log_c.mean() + log_c.std() * rng.standard_normal((n_draws, 1))), b_global),
        "c_pair ~ LogNormal + Laplace(b_g)": lambda: (
            np.exp(log_c.mean() + log_c.std() * rng.standard_normal((n_draws, 1))), b_gene),
    }
    rows = []
    for name, params in models.items():
        covs = []
        for d in test:
            factor, scale = params()
            draws = factor * summed[d] + rng.laplace(0.0, 1.0, (n_draws, summed.shape[1])) * scale
            by_truth, by_singles = np.argsort(-np.abs(doubles[d]))[:20], np.argsort(-np.abs(summed[d]))[:20]
            covs.append(coverage(draws, doubles[d], by_truth, by_singles))
        rows.append((name, *np.mean(covs, 0).tolist()))
    print(f"{len(train)} training / {len(test)} held-out complete doubles (seed {seed}); "
          f"training factors: median c {c:.2f}, sd of log c {log_c.std():.2f}\n")
    print("| composition model | coverage90_all | top-20 genes by the double's real |change| | top-20 genes by "
          "|sum of its singles| |")
    print("|---|---|---|---|")
    for name, a, t, s in rows:
        print(f"| {name} | {a:.2f} | {t:.2f} | {s:.2f} |")
    _, _, directions = np.linalg.svd(singles, full_matrices=False)
    print("\n| K leading directions of the singles | share of their squared change | Pearson delta of the "
          "projected sum on the held-out doubles |")
    print("|---|---|---|")
    for k in (10, 30, 50, len(singles)):
        projected = singles @ directions[:k].T @ directions[:k]
        share = float((projected ** 2).sum() / (singles ** 2).sum())
        pair_sum = projected[parts[test, 0]] + projected[parts[test, 1]]
        r = np.mean([np.corrcoef(pair_sum[i], doubles[d])[0, 1] for i, d in enumerate(test)])
        print(f"| {k} | {share:.2f} | {r:.3f} |")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    main(ap.parse_args().seed)
