"""Recovery scores for identifiability studies on simulated data (pure numpy / scipy).

All functions compare an inferred quantity with the simulator's truth
(:func:`pyro_pvae.simulate.simulate` keeps it in ``uns['truth']`` and ``obsm``):

* :func:`mcc` -- mean correlation coefficient of the perturbation latents: the mean absolute
  Pearson correlation between true and inferred ``z_pert`` dimensions after the optimal
  one-to-one matching (Hungarian algorithm on the absolute correlation matrix). ``z_pert`` is
  identifiable only up to permutation and per-dimension scaling (and sign), which the matching
  and the absolute correlation remove. Returns the matching too.
* :func:`linear_r2` -- R^2 of a least-squares linear map (with intercept) from one set of
  latents to another, fitted on a random half of the cells and scored on the other half.
  ``linear_r2(z_inv_hat, z_inv_true)`` is recovery of ``z_inv`` up to an invertible linear map;
  ``linear_r2(z_pert_hat, z_inv_true)`` is *leakage* (invariant variation absorbed by the
  perturbation block; should be low).
* :func:`match_effects` -- matching of latent dimensions by the perturbation effects: the
  Hungarian matching on the absolute correlation, over perturbations, between the columns of
  the true ``delta`` (P x K) and of the inferred posterior-mean effects. Gate and DAG scores
  need *some* matching of latent indices; the effect-based matching uses only the global
  parameters (no cells), the latent matching of :func:`mcc` uses the cells. Both are
  reported by the study; they agree when recovery is good.
* :func:`pip_scores` -- F1 (PIP > 0.5) and AUPRC (average precision of the PIP ranking) of the
  inferred inclusion probabilities against the true gates, after a matching.
* :func:`shd` / :func:`permute_dag` -- structural Hamming distance between the true DAG and the
  inferred one (edges ``|W| > threshold``) after permuting the inferred latents by a matching.
  A permutation may break the lower-triangular order of the inferred ``W``; the SHD works on
  arbitrary directed adjacency matrices, counting per unordered pair of latents one
  *addition* (edge only in the estimate), one *deletion* (edge only in the truth) or one
  *reversal* (edge in both, opposite directions).
* :func:`rmse` -- root mean square error of a predicted vs true pseudobulk change.

Convention for ``W``: ``W[k, j] != 0`` is the edge ``j -> k`` (row = child), as in
``z = W z + ...`` of both the simulator and the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .metrics import rmse  # noqa: F401  (one definition, re-exported here)

__all__ = [
    "Matching",
    "abs_corr",
    "hungarian_match",
    "mcc",
    "linear_r2",
    "heldout_linear_fit",
    "match_effects",
    "pip_scores",
    "average_precision",
    "permute_dag",
    "dag_edges",
    "shd",
    "rmse",
]


@dataclass
class Matching:
    """One-to-one matching of true dimensions to inferred dimensions.

    ``true_idx[i]`` is matched with ``inferred_idx[i]``; ``corr[i]`` is their (signed)
    correlation and ``sign[i]`` its sign. ``value`` is the mean absolute correlation of the
    matched pairs (the MCC when the inputs are latents).
    """

    true_idx: np.ndarray
    inferred_idx: np.ndarray
    corr: np.ndarray
    value: float
    n_true: int = -1

    @property
    def sign(self) -> np.ndarray:
        return np.where(self.corr < 0, -1.0, 1.0)

    def as_permutation(self, n_true: int | None = None) -> np.ndarray:
        """perm[k] = inferred index matched to true index k (-1 where unmatched)."""
        if n_true is None:
            n_true = self.n_true if self.n_true >= 0 else int(self.true_idx.max()) + 1
        perm = np.full(n_true, -1, dtype=int)
        perm[self.true_idx] = self.inferred_idx
        return perm


def _as2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def abs_corr(a, b) -> np.ndarray:
    """Signed Pearson correlation matrix between the columns of ``a`` (n x K) and ``b`` (n x K').

    Constant columns have correlation 0 with everything (not NaN).
    """
    a, b = _as2d(a), _as2d(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"row counts differ: {a.shape[0]} vs {b.shape[0]}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    c = (a.T @ b) / np.outer(np.where(na > 0, na, 1.0), np.where(nb > 0, nb, 1.0))
    c[na == 0, :] = 0.0
    c[:, nb == 0] = 0.0
    return c


def hungarian_match(corr: np.ndarray) -> Matching:
    """Matching maximising the summed absolute correlation (rows: true, columns: inferred).

    With more inferred than true dimensions, every true dimension is matched and the extra
    inferred ones are ignored (and vice versa); ``value`` averages over the matched pairs.
    """
    corr = np.asarray(corr, dtype=np.float64)
    r, c = linear_sum_assignment(-np.abs(corr))
    vals = corr[r, c]
    return Matching(true_idx=r, inferred_idx=c, corr=vals,
                    value=float(np.abs(vals).mean()) if len(vals) else np.nan, n_true=corr.shape[0])


def mcc(z_true, z_hat) -> Matching:
    """Mean correlation coefficient of latents (``.value``) with its Hungarian matching."""
    return hungarian_match(abs_corr(z_true, z_hat))


def _heldout_halves(X, Y, seed: int, train_fraction: float):
    """(fitting rows, held-out rows): a seeded random ``train_fraction`` of the rows and the rest,
    shared by :func:`linear_r2` and :func:`nonlinear_r2`."""
    n = X.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"row counts differ: {n} vs {Y.shape[0]}")
    if n < 4:
        raise ValueError("need at least 4 rows")
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = int(round(train_fraction * n))
    n_tr = min(max(n_tr, 2), n - 2)
    return perm[:n_tr], perm[n_tr:]


def _heldout_r2(resid, Y) -> float:
    """1 - SSE / SST over all output dimensions of the held-out targets ``Y`` (NaN if constant)."""
    sst = ((Y - Y.mean(0)) ** 2).sum()
    return float(1.0 - (resid ** 2).sum() / sst) if sst > 0 else np.nan


def heldout_linear_fit(z_from, z_to, seed: int = 0, train_fraction: float = 0.5):
    """The least-squares linear map (with intercept) of :func:`linear_r2`, fitted on a random
    ``train_fraction`` of the rows: returns the held-out row indices, their residuals and their
    targets (``z_to`` rows), so callers can split the held-out error (e.g. by cell group)."""
    X, Y = _as2d(z_from), _as2d(z_to)
    tr, te = _heldout_halves(X, Y, seed, train_fraction)
    Xa = np.hstack([X, np.ones((X.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(Xa[tr], Y[tr], rcond=None)
    return te, Y[te] - Xa[te] @ coef, Y[te]


def linear_r2(z_from, z_to, seed: int = 0, train_fraction: float = 0.5) -> float:
    """Held-out R^2 of the least-squares linear prediction (with intercept) of ``z_to`` from
    ``z_from``: fit on a random ``train_fraction`` of the rows, score on the rest
    (:func:`heldout_linear_fit`).

    R^2 = 1 - SSE / SST summed over all output dimensions (variance-weighted); can be
    negative for a map worse than the held-out mean.
    """
    _, resid, Y = heldout_linear_fit(z_from, z_to, seed, train_fraction)
    return _heldout_r2(resid, Y)


def nonlinear_r2(z_from, z_to, seed: int = 0, train_fraction: float = 0.5) -> float:
    """Held-out R^2 of a smooth nonlinear prediction of ``z_to`` from ``z_from``: kernel ridge
    regression (RBF kernel on standardised inputs; ridge and kernel width chosen by 3-fold
    cross-validation within the fitting rows), on the same random halves as :func:`linear_r2`.

    Beside :func:`linear_r2` it separates lost information from a warp: latents that are a smooth
    invertible but nonlinear function of the truth score below 1 linearly and near 1 here."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV

    X, Y = _as2d(z_from), _as2d(z_to)
    tr, te = _heldout_halves(X, Y, seed, train_fraction)
    tr = np.sort(tr)  # in row order: the cross-validation folds are contiguous blocks of it
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-12
    Xs = (X - mu) / sd
    dim = X.shape[1]
    search = GridSearchCV(KernelRidge(kernel="rbf"), cv=3,
                          param_grid={"alpha": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
                                      "gamma": [g / dim for g in (0.01, 0.03, 0.1, 0.3, 1.0)]})
    search.fit(Xs[tr], Y[tr] - Y[tr].mean(0))
    return _heldout_r2(Y[te] - Y[tr].mean(0) - search.predict(Xs[te]), Y[te])


def match_effects(delta_true, delta_hat) -> Matching:
    """Match latent dimensions by the correlation, over perturbations, of true effect columns
    (``delta_true``, P x K) and inferred posterior-mean effect columns (P x K')."""
    return hungarian_match(abs_corr(delta_true, delta_hat))


def average_precision(y_true, score) -> float:
    """Area under the precision-recall curve as average precision (sklearn's definition:
    sum over positives, in decreasing score order, of precision at that rank; ties share
    the precision of the whole tied block). NaN when there are no positives."""
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if not y.any():
        return np.nan
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    # thresholds at distinct scores (ties form one step)
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(((recall - recall_prev) * precision).sum())


def pip_scores(pip, gates, matching: Matching | np.ndarray | None = None, threshold: float = 0.5) -> dict:
    """F1 at ``PIP > threshold``, precision, recall and AUPRC of inferred PIPs (P x K')
    against true gates (P x K), after reordering the inferred columns by ``matching``
    (a :class:`Matching` or a permutation ``perm[k] = inferred column for true k``; None:
    identity). True latents left unmatched count as all-zero PIP columns."""
    gates = np.asarray(gates, dtype=bool)
    pip = np.asarray(pip, dtype=np.float64)
    K = gates.shape[1]
    if matching is None:
        perm = np.arange(K)
    elif isinstance(matching, Matching):
        perm = matching.as_permutation(K)
    else:
        perm = np.asarray(matching, dtype=int)
    aligned = np.zeros(gates.shape)
    ok = perm >= 0
    aligned[:, ok] = pip[:, perm[ok]]
    pred = aligned > threshold
    tp = float((pred & gates).sum())
    fp = float((pred & ~gates).sum())
    fn = float((~pred & gates).sum())
    precision = tp / (tp + fp) if tp + fp > 0 else np.nan
    recall = tp / (tp + fn) if tp + fn > 0 else np.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else np.nan
    return {"f1": f1, "precision": precision, "recall": recall,
            "auprc": average_precision(gates, aligned), "base_rate": float(gates.mean())}


def permute_dag(W_hat, matching: Matching | np.ndarray) -> np.ndarray:
    """Inferred DAG weights re-indexed to the true latents: ``out[k, j] = W_hat[perm[k], perm[j]]``
    with ``perm[k]`` the inferred latent matched to true latent ``k`` (rows/columns of unmatched
    true latents are zero). The result need not be lower triangular."""
    W_hat = np.asarray(W_hat, dtype=np.float64)
    if isinstance(matching, Matching):
        n = matching.n_true if matching.n_true >= 0 else int(matching.true_idx.max()) + 1
        perm = matching.as_permutation(n)
    else:
        perm = np.asarray(matching, dtype=int)
    K = len(perm)
    out = np.zeros((K, K))
    ok = perm >= 0
    idx = np.flatnonzero(ok)
    out[np.ix_(idx, idx)] = W_hat[np.ix_(perm[ok], perm[ok])]
    return out


def dag_edges(W, threshold: float = 0.0) -> np.ndarray:
    """Boolean adjacency ``|W| > threshold`` without self-loops (``[k, j]``: edge j -> k)."""
    A = np.abs(np.asarray(W, dtype=np.float64)) > threshold
    np.fill_diagonal(A, False)
    return A


def shd(W_true, W_hat, threshold: float = 0.1, true_threshold: float = 0.0) -> dict:
    """Structural Hamming distance between two directed graphs on the same (matched) nodes.

    Per unordered pair {i, j}: nothing if both graphs agree; a *reversal* if each has exactly
    one edge there and they point opposite ways; otherwise one *addition* per estimated edge
    absent from the truth and one *deletion* per true edge absent from the estimate (a pair
    with a 2-cycle in one graph can contribute more than one). ``shd = additions + deletions +
    reversals``. Edges: ``|W_hat| > threshold``, ``|W_true| > true_threshold``.
    """
    T = dag_edges(W_true, true_threshold)
    E = dag_edges(W_hat, threshold)
    if T.shape != E.shape:
        raise ValueError(f"shapes differ: {T.shape} vs {E.shape}")
    K = T.shape[0]
    add = dele = rev = 0
    for i in range(K):
        for j in range(i + 1, K):
            t = (T[i, j], T[j, i])
            e = (E[i, j], E[j, i])
            if t == e:
                continue
            if sum(t) == 1 and sum(e) == 1:  # one edge each, opposite directions
                rev += 1
                continue
            add += int(e[0] and not t[0]) + int(e[1] and not t[1])
            dele += int(t[0] and not e[0]) + int(t[1] and not e[1])
    return {"shd": add + dele + rev, "additions": add, "deletions": dele, "reversals": rev,
            "n_true_edges": int(T.sum()), "n_est_edges": int(E.sum())}
