"""Can the DAG be read off the fitted latents where perturbations are hard interventions?

    python analyses/hard_intervention_check.py [--seeds 0 1] [--out analyses/results/hard_intervention_check]

With shift interventions the likelihood does not fix the DAG ``W`` (the decoder absorbs
``(I - W)^{-1}``), so the model's z_pert aim at the exogenous coordinates ``x = (I - W) z``
(*Identifiability* in the README). The simulator's coverage perturbations are *hard*
interventions (they cut a latent's parent edges), and those carry ``W``: in a condition that
hard-intervenes latent k, ``x_k = eps_k + s_k - [(T - I) x]_k`` with ``T = (I - W)^{-1}`` while
every other ``x_j = eps_j + s_j``, so within that condition the regression of ``x_k`` on the
other coordinates has coefficients ``-(T - I)_{k, -k}`` (non-zero on k's ancestors), and in
every other condition none. :func:`dag_from_hard_interventions` estimates ``T`` that way
(each condition names the latent whose within-condition regression gains most likelihood, if
significant; Bonferroni ``alpha``) and propagates, ``z = T x``.

The check fits the identifiability base (the small grid's, exactly as the study does) at each
seed and applies the estimator to (a) the true exogenous coordinates ``(I - W) z`` of the
controls and singles, what an exact shift model would infer, and (b) the fitted model's
z_pert (encoder means and refined posteriors). It reports the conditions found, the rank of
the true hard interventions among all (condition, latent) regressions, and the MCC against the
true z_pert before and after propagation. Writes ``summary.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from pyro_pvae.data import CONTROL

sys.path.insert(0, str(Path(__file__).resolve().parent))


def condition_regressions(x: np.ndarray, labels: np.ndarray, control: str = CONTROL) -> list[dict]:
    """Per condition other than ``control`` and latent k, among that condition's cells (each
    coordinate divided by its sd over the controls, then centred): the least-squares regression of
    ``x_k`` on the other coordinates and the log-likelihood it gains when ``x_k`` is that
    regression plus unit noise rather than unit noise alone (every other coordinate unit noise
    either way), ``gain = (sum x_k^2 - RSS_k) / 2``, with its p value (``2 gain ~ chi2(K - 1)``
    when the condition cuts nothing). In a condition that hard-intervenes latent k the true
    child ``x_k`` gains more than its parents regressed on it (its variance exceeds 1, theirs do
    not). Rows ``{condition, latent, gain, p, coef}`` (``coef``: K - 1 coefficients, the other
    latents in order)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    if not (labels == control).any():
        raise ValueError(f"condition_regressions: no cell is labelled {control!r}")
    x = x / x[labels == control].std(0)
    K = x.shape[1]
    rows = []
    for c in np.unique(labels[labels != control]):
        xc = x[labels == c]
        if len(xc) <= K + 1:
            continue
        xc = xc - xc.mean(0)
        for k in range(K):
            X, y = np.delete(xc, k, axis=1), xc[:, k]
            coef = np.linalg.lstsq(X, y, rcond=None)[0]
            gain = 0.5 * ((y ** 2).sum() - ((y - X @ coef) ** 2).sum())
            rows.append({"condition": c, "latent": k, "gain": float(gain),
                         "p": float(stats.chi2.sf(2.0 * gain, K - 1)), "coef": coef})
    return rows


def dag_from_hard_interventions(x: np.ndarray, labels: np.ndarray, control: str = CONTROL,
                                alpha: float = 0.01) -> tuple[np.ndarray, dict, list[dict]]:
    """``(W, targets, rows)``: ``W = I - T^{-1}`` in the controls' sd units of ``x``. Each condition
    names at most one hard-intervened latent, the one whose regression gains most
    (:func:`condition_regressions`), if its p value is below ``alpha`` / number of tests; row k
    of ``T = (I - W)^{-1}`` is ``e_k`` minus the coefficients of the condition that names k with
    the largest gain, and ``e_k`` where none does. ``targets`` maps those latents to their
    conditions. The propagated latents are ``x @ T.T``."""
    rows = condition_regressions(x, labels, control)
    K = np.asarray(x).shape[1]
    cut = alpha / max(1, len(rows))
    named = {}
    for c in {r["condition"] for r in rows}:
        best = max((r for r in rows if r["condition"] == c), key=lambda r: r["gain"])
        if best["p"] < cut and best["gain"] > named.get(best["latent"], {"gain": -np.inf})["gain"]:
            named[best["latent"]] = best
    T = np.eye(K)
    for k, r in named.items():
        T[k, np.arange(K) != k] = -r["coef"]
    return np.eye(K) - np.linalg.inv(T), {k: r["condition"] for k, r in named.items()}, rows


def variance_ratios(x: np.ndarray, labels: np.ndarray, control: str = CONTROL) -> np.ndarray:
    """(conditions other than ``control``, K): each coordinate's variance among a condition's
    cells over its variance among the controls. For the exact exogenous coordinates it is 1 up
    to sampling noise except where a condition cuts a latent's parents; a latent space that the
    fit has warped (a different local linear map in each condition) shows it everywhere."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    ref = x[labels == control].var(0)
    return np.array([x[labels == c].var(0) / ref for c in np.unique(labels[labels != control])])


def _hard_pairs(truth, permutation=None) -> set:
    """(condition, latent) of the true hard interventions on latents with parents; latents
    renamed by ``permutation`` (true index -> inferred index) when given."""
    W = np.asarray(truth["W"])
    hard = np.asarray(truth["hard_targets"], dtype=bool)
    perts = [str(p) for p in truth["perturbations"]]
    out = set()
    for p, k in zip(*np.nonzero(hard)):
        if np.abs(W[k]).sum() > 0:
            out.add((perts[p], int(k if permutation is None else permutation[k])))
    return out


def _report(name, x, z_true, labels, truth, permutation=None) -> list[str]:
    from pyro_pvae import identifiability as idf

    W_hat, targets, rows = dag_from_hard_interventions(x, labels)
    T = np.linalg.inv(np.eye(len(W_hat)) - W_hat)
    ranked = sorted(rows, key=lambda r: -r["gain"])
    hard = _hard_pairs(truth, permutation)
    ranks = sorted(1 + i for i, r in enumerate(ranked) if (r["condition"], r["latent"]) in hard)
    found = ", ".join(f"{c} on {k}" for k, c in sorted(targets.items())) or "none"
    lo, hi = np.percentile(variance_ratios(x, labels), [10, 90])
    return [f"| {name} | {lo:.2f}-{hi:.2f} | {idf.mcc(z_true, x).value:.3f} | {idf.mcc(z_true, x @ T.T).value:.3f} | "
            f"{found} | {', '.join(map(str, ranks))} of {len(rows)} |"]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / "hard_intervention_check")

    import torch
    from threadpoolctl import threadpool_limits

    import identifiability as study
    from norman_fit import write_summary
    from pyro_pvae import identifiability as idf

    torch.set_num_threads(1)
    cond = {c["name"]: c for c in study.resolve_conditions(study.load_grid("small"))}["base"]
    lines = [f"# DAG from hard interventions on the identifiability base "
             f"(`python analyses/hard_intervention_check.py --seeds {' '.join(map(str, args.seeds))}`)", "",
             "Per latents: the spread of each coordinate's variance across conditions (relative to the",
             "controls; 1 where the latent space is the same linear image of the truth in every condition),",
             "the MCC against the true z_pert as given and after propagation by the W the estimator reads",
             "off them, the hard interventions it finds, and the ranks of the true hard interventions on",
             "latents with parents among all (condition, latent) regressions (1 = the largest gain).", ""]
    for seed in args.seeds:
        with threadpool_limits(limits=1, user_api="blas"):
            adata = study.simulate_condition(cond, seed)
            truth = adata.uns["truth"]
            idx = np.flatnonzero(adata.obs["n_targets"].to_numpy() <= 1)
            labels = adata.obs["condition"].astype(str).to_numpy()[idx]
            z_true = adata.obsm["z_pert_true"][idx]
            x_true = z_true @ (np.eye(len(truth["W"])) - np.asarray(truth["W"])).T
            vae = study.fit_condition(cond, seed, adata)
            encoder = vae.latents(adata, idx)["z_pert"]
            refined = vae.latents(adata, idx, refine_steps=study.REFINE_STEPS)["z_pert"]
        hard = ", ".join(f"{c} on {k}" for c, k in sorted(_hard_pairs(truth), key=lambda t: t[1]))
        lines += [f"## Seed {seed}", "",
                  f"True edges (child, parent, weight): "
                  f"{[(int(k), int(j), round(float(truth['W'][k][j]), 2)) for k, j in zip(*np.nonzero(truth['W']))]}; "
                  f"hard interventions on latents with parents: {hard}", "",
                  "| latents | variance in a condition / in the controls, 10th-90th percentile | MCC as given | "
                  "MCC propagated by the estimated W | hard interventions found | ranks of the true ones |",
                  "|---|---|---|---|---|---|"]
        lines += _report("true exogenous coordinates (I - W) z", x_true, z_true, labels, truth)
        for name, x in (("model, encoder means", encoder), ("model, refined posteriors", refined)):
            perm = idf.mcc(x_true, x)  # true -> inferred latent index, for the ranks
            lines += _report(name, x, z_true, labels, truth, dict(zip(perm.true_idx, perm.inferred_idx)))
        lines.append("")
    return write_summary(out, "\n".join(lines))


if __name__ == "__main__":
    from norman_fit import script

    script(__doc__, main)
