"""Evaluation metrics for predicted single-cell perturbation responses.

Every metric is a small pure function of numpy arrays on **log-normalised** expression
(``log1p(counts / total * 1e4)``, see :func:`pyro_pvae.utils.lognormalize`). Arrays of cells are
``(n_cells, n_genes)``; a "change" or "delta" is a ``(n_genes,)`` difference of means from
the control mean. :func:`evaluate_condition` computes all of them for one held-out
condition; the benchmark averages them over conditions (and reports each condition).

Protocol choices (all documented here, tested in ``tests/test_metrics.py``)
--------------------------------------------------------------------------
Discrepancy-VAE / PerturbedVAE batch protocol (``nrmse``, ``r2_mean``, ``mmd``), following
the Discrepancy-VAE repository (uhlerlab/discrepancy_vae: ``src/inference.py``,
``src/utils.py``, ``notebooks/plot_samples.ipynb``):

* Pairing. There, each observed perturbed cell is paired with one randomly drawn control
  cell, the prediction for that pair is made from the control cell, and metrics are computed
  **cell-wise** between predicted cell i and observed cell i. Cells of one perturbation are
  shuffled and cut into batches of 32; an incomplete last batch is dropped. We do the same:
  the observed cells are shuffled (``seed``), the predicted cells (each already started from
  a random control cell) are taken in a shuffled order too, pair i = (pred i, obs i), and
  ``min(n_pred, n_obs) // 32`` full batches are formed.
* nRMSE per batch: ``sqrt(mean((y_pred - y)**2) / mean(y**2))`` over all cells x genes of
  the batch; averaged over the batches of the condition.
* R^2 per batch: ``max(r2_score(mean y_pred, mean y), 0)`` over genes, with the argument
  order exactly as in the repository (scikit-learn's first argument is ``y_true``, so the
  denominator is the variance over genes of the *predicted* batch mean). Averaged over batches.
* MMD per batch: biased (V-statistic) estimator ``mean(Kxx + Kyy - Kxy - Kyx)`` with a sum of
  Gaussian kernels ``exp(-||a-b||^2 / h)``; default bandwidths are the repository's
  evaluation setting ``MMD_loss(fix_sigma=1000, kernel_num=10, kernel_mul=2)``, i.e.
  ``h = 1000 / 2**5 * 2**i`` for ``i = 0..9`` (31.25 ... 16000). ``bandwidths="median"``
  gives the median heuristic instead (h = median squared pairwise distance, times
  ``2**(i - 2)`` for i = 0..4). Averaged over batches.

Other metrics:

* Differentially expressed genes: :func:`top_de_genes` runs scanpy's ``rank_genes_groups``
  (method ``'t-test'``, Welch, ``rankby_abs=True`` so up- *and* down-regulated genes count, as
  GEARS does) of the observed condition cells against control cells, on log-normalised data.
* Changes. The observed change is ``mean(obs) - mean(reference controls)``; the predicted
  change is ``mean(pred) - mean(the method's own predicted controls)`` (``pred_ctrl_lognorm``
  of :func:`evaluate_condition`; default: the reference controls, the old protocol). With the
  reference controls held out from training (``pyro_pvae/benchmark.py``) the two changes
  share no control noise: subtracting one control mean from both rewards any predicted
  change that carries minus that mean's noise.
* Pearson delta: Pearson correlation over genes of predicted vs observed change (all genes;
  top-20 DE genes).
* Pseudobulk RMSE / L2: RMSE and Euclidean norm over genes of ``mean(pred) - mean(obs)``
  (no control involved).
* ``delta_rmse_all``: RMSE over genes of predicted vs observed change. It equals
  ``pseudobulk_rmse_all`` only when both changes are taken from the same control mean.
* Energy distance: ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Euclidean, V-statistic, so exactly 0
  for identical sets), each side subsampled to at most ``max_cells`` cells.
* Direction accuracy: fraction of top-20 DE genes with ``sign(pred change) == sign(obs change)``.
* Coverage: fraction of genes whose observed change lies in the central 90% interval
  (empirical 5% and 95% quantiles) of posterior predictive samples of the change:
  ``coverage90_all`` over all genes, ``coverage90_top20de`` over the top-20 DE genes. The DE
  genes must be chosen on cells other than the scored ones: chosen on the scored cells they
  are the genes whose observed change is extreme, and a perfect predictive distribution
  covers them less than 90% of the time.

Ill-defined cases
-----------------
A metric that cannot be computed (a condition with fewer than 32 cells for a batch, too few
cells for a DE test, zero variance for a Pearson correlation or R^2, ...) is never returned as
a bare NaN: the metric function returns a :class:`MetricNote`, a ``str`` subclass holding the
reason. :func:`results_frame` turns it into ``value = NaN`` with the reason in the ``note``
column (and also flags any bare NaN it is given as ``"undefined (no reason recorded)"``).
Summaries skip NaN values and count them in ``n_undefined``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from pyro_pvae.data import DataError
from pyro_pvae.utils import lognormalize as lognormalize_counts  # noqa: F401  (name kept for callers)
from pyro_pvae.utils import to_dense

BATCH_SIZE = 32
N_TOP_DE = 20
DE_METHOD = "t-test"
# Discrepancy-VAE evaluation: MMD_loss(fix_sigma=1000, kernel_num=10, kernel_mul=2)
DVAE_MMD_BANDWIDTHS = tuple(1000.0 / 2.0 ** (10 // 2) * 2.0 ** i for i in range(10))

METRIC_NAMES = (
    "nrmse", "r2_mean", "mmd",
    "pearson_delta_all", "pearson_delta_top20de",
    "pseudobulk_rmse_all", "pseudobulk_rmse_top20de",
    "l2_mean_all", "l2_mean_top20de",
    "energy_distance", "direction_acc_top20de", "coverage90_all", "coverage90_top20de",
    "delta_rmse_all", "width90_all", "width90_top20de",
)
# metrics where larger is better (everything else: smaller is better)
HIGHER_IS_BETTER = frozenset({"r2_mean", "pearson_delta_all", "pearson_delta_top20de",
                              "direction_acc_top20de", "coverage90_all", "coverage90_top20de"})


class MetricNote(str):
    """Reason a metric is undefined for a condition (a ``str``); stands in for NaN."""

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"MetricNote({str(self)!r})"


def is_note(value) -> bool:
    return isinstance(value, str)


# --------------------------------------------------------------------------- helpers
def _cells(X) -> np.ndarray:
    """Dense float64 (n_cells, n_genes) array; a single profile becomes one row."""
    return np.atleast_2d(to_dense(X, np.float64))


def _gene_index(genes, gene_names: Sequence[str] | None, n_genes: int) -> np.ndarray:
    """Gene names or integer positions -> integer positions."""
    genes = list(genes)
    if all(isinstance(g, (int, np.integer)) for g in genes):
        return np.asarray(genes, dtype=int)
    if gene_names is None:
        raise DataError("gene names given for top_de but gene_names is None")
    lookup = {g: i for i, g in enumerate(gene_names)}
    missing = [g for g in genes if g not in lookup]
    if missing:
        raise DataError(f"top-DE genes not among the genes: {missing[:5]}")
    return np.asarray([lookup[g] for g in genes], dtype=int)


# --------------------------------------------------------------------------- basic metrics
def nrmse(y_pred, y) -> float | MetricNote:
    """``sqrt(mean((y_pred - y)^2) / mean(y^2))`` over all entries (normalised by the truth)."""
    y_pred, y = np.asarray(y_pred, float), np.asarray(y, float)
    denom = np.mean(y ** 2)
    if denom == 0:
        return MetricNote("nrmse undefined: observed values are all zero")
    return float(np.sqrt(np.mean((y_pred - y) ** 2) / denom))


def r2_clipped(first, second) -> float | MetricNote:
    """``max(sklearn.metrics.r2_score(first, second), 0)``; ``first`` plays y_true.

    The protocol calls it as ``r2_clipped(mean y_pred, mean y)`` (repository order).
    """
    a, b = np.asarray(first, float).ravel(), np.asarray(second, float).ravel()
    ss_tot = np.sum((a - a.mean()) ** 2)
    if ss_tot == 0:
        return MetricNote("r2 undefined: zero variance over genes")
    return float(max(1.0 - np.sum((a - b) ** 2) / ss_tot, 0.0))


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d, 0.0)


def mmd(x, y, bandwidths: Sequence[float] | str | None = None) -> float:
    """Biased squared MMD with a sum of Gaussian kernels ``exp(-||a-b||^2 / h)``.

    ``bandwidths``: None -> Discrepancy-VAE evaluation setting (:data:`DVAE_MMD_BANDWIDTHS`);
    ``"median"`` -> median heuristic (five kernels around the median squared distance);
    or an explicit sequence of ``h``. Symmetric in (x, y); exactly 0 for identical sets.
    """
    x, y = _cells(x), _cells(y)
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    if bandwidths is None:
        hs = DVAE_MMD_BANDWIDTHS
    elif isinstance(bandwidths, str):
        if bandwidths != "median":
            raise ValueError(f"bandwidths must be None, 'median' or a sequence, got {bandwidths!r}")
        alld = np.concatenate([dxx.ravel(), dyy.ravel(), dxy.ravel()])
        med = np.median(alld[alld > 0]) if np.any(alld > 0) else 1.0
        hs = tuple(med * 2.0 ** (i - 2) for i in range(5))
    else:
        hs = tuple(float(h) for h in bandwidths)

    def k(d):
        return sum(np.exp(-d / h) for h in hs)

    return float(max(k(dxx).mean() + k(dyy).mean() - 2.0 * k(dxy).mean(), 0.0))


def batch_pairs(n_pred: int, n_obs: int, batch_size: int = BATCH_SIZE,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random cell-wise pairing into full batches: list of (pred_idx, obs_idx) arrays."""
    rng = np.random.default_rng(seed)
    n = min(n_pred, n_obs)
    n_batches = n // batch_size
    pi = rng.permutation(n_pred)[: n_batches * batch_size]
    oi = rng.permutation(n_obs)[: n_batches * batch_size]
    return [(pi[b * batch_size:(b + 1) * batch_size], oi[b * batch_size:(b + 1) * batch_size])
            for b in range(n_batches)]


def batch_protocol(pred, obs, batch_size: int = BATCH_SIZE, seed: int = 0,
                   mmd_bandwidths=None) -> dict[str, float | MetricNote]:
    """Discrepancy-VAE protocol for one condition: mean over 32-cell batches of
    cell-wise nRMSE, clipped R^2 of batch means, and MMD (see module docstring)."""
    pred, obs = _cells(pred), _cells(obs)
    pairs = batch_pairs(len(pred), len(obs), batch_size, seed)
    if not pairs:
        note = MetricNote(f"fewer than {batch_size} cells (predicted {len(pred)}, "
                          f"observed {len(obs)}): no full batch")
        return {"nrmse": note, "r2_mean": note, "mmd": note}
    vals: dict[str, list] = {"nrmse": [], "r2_mean": [], "mmd": []}
    for pi, oi in pairs:
        yp, yo = pred[pi], obs[oi]
        vals["nrmse"].append(nrmse(yp, yo))
        vals["r2_mean"].append(r2_clipped(yp.mean(0), yo.mean(0)))
        vals["mmd"].append(mmd(yp, yo, mmd_bandwidths))
    out: dict[str, float | MetricNote] = {}
    for k, v in vals.items():
        good = [x for x in v if not is_note(x)]
        out[k] = float(np.mean(good)) if good else MetricNote(
            f"undefined in all {len(v)} batches: {v[0]}")
    return out


def pearson(a, b) -> float | MetricNote:
    """Pearson correlation of two vectors; a note when either has zero variance."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if len(a) < 2:
        return MetricNote("pearson undefined: fewer than 2 genes")
    a, b = a - a.mean(), b - b.mean()
    na, nb = np.sqrt(np.sum(a * a)), np.sqrt(np.sum(b * b))
    if na == 0 or nb == 0:
        which = "predicted" if na == 0 else "observed"
        return MetricNote(f"pearson undefined: zero variance of the {which} change")
    return float(np.clip(np.sum(a * b) / (na * nb), -1.0, 1.0))


def rmse(a, b) -> float:
    """Root mean square error over all entries."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def l2(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.sqrt(np.sum((a - b) ** 2)))


def energy_distance(x, y, max_cells: int = 500, seed: int = 0) -> float:
    """Energy distance ``2E|X-Y| - E|X-X'| - E|Y-Y'|`` (Euclidean, V-statistic).

    Each set is subsampled without replacement to at most ``max_cells`` cells.
    """
    x, y = _cells(x), _cells(y)
    rng = np.random.default_rng(seed)
    if len(x) > max_cells:
        x = x[rng.choice(len(x), max_cells, replace=False)]
    if len(y) > max_cells:
        y = y[rng.choice(len(y), max_cells, replace=False)]
    dxy = np.sqrt(_sq_dists(x, y)).mean()
    dxx = np.sqrt(_sq_dists(x, x)).mean()
    dyy = np.sqrt(_sq_dists(y, y)).mean()
    return float(max(2.0 * dxy - dxx - dyy, 0.0))


def direction_accuracy(pred_delta, obs_delta) -> float | MetricNote:
    """Fraction of genes with ``sign(pred) == sign(obs)`` (pass the top-DE subset)."""
    p, o = np.asarray(pred_delta, float).ravel(), np.asarray(obs_delta, float).ravel()
    if len(o) == 0:
        return MetricNote("direction accuracy undefined: no genes")
    return float(np.mean(np.sign(p) == np.sign(o)))


def coverage(change_samples, obs_delta, level: float = 0.9) -> float | MetricNote:
    """Fraction of genes whose observed change lies in the central ``level`` interval of the
    samples (``change_samples``: S x G, ``obs_delta``: G; pass the top-DE subset)."""
    s = np.asarray(change_samples, float)
    o = np.asarray(obs_delta, float).ravel()
    if s.ndim != 2 or s.shape[1] != len(o):
        raise ValueError(f"change_samples must be S x {len(o)}, got {s.shape}")
    if s.shape[0] < 2:
        return MetricNote("coverage undefined: fewer than 2 posterior samples")
    if len(o) == 0:
        return MetricNote("coverage undefined: no genes")
    lo, hi = central_interval(s, level)
    return float(np.mean((o >= lo) & (o <= hi)))


def central_interval(samples: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``samples`` (S x G), the bounds of its central ``level`` interval."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a], axis=0)
    return lo, hi


def interval_width(change_samples, level: float = 0.9) -> float | MetricNote:
    """Mean over genes of the width of the central ``level`` interval of the samples (S x G):
    how sharp the intervals whose :func:`coverage` is reported are."""
    s = np.asarray(change_samples, float)
    if s.ndim != 2 or s.shape[0] < 2 or s.shape[1] == 0:
        return MetricNote("interval width undefined: fewer than 2 posterior samples or no genes")
    lo, hi = central_interval(s, level)
    return float(np.mean(hi - lo))


#: widening exponents tried by :meth:`IntervalCalibration.fit` (0: one factor for every gene)
CALIBRATION_GAMMAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


@dataclass
class IntervalCalibration:
    r"""A recalibration of predictive draws of a change, fitted on conditions the model
    predicts as if unseen and whose change was observed (e.g. the training doubles with their
    own interaction replaced by draws from its fitted prior: :meth:`PerturbedVAE.calibrate_intervals`).

    Each gene's draws are stretched about their mean m_g,

        d' = m_g + s_g (d - m_g),   s_g = max(1, k sqrt(1 + (gamma |m_g| / h_g)^2)),

    with h_g the half-width of the gene's central ``level`` interval: ``k`` widens every
    interval alike, ``gamma`` widens those of large predicted changes more (errors of
    composition grow with the size of the change). A gene's observed change o_g lies in the
    stretched interval exactly when t_g = |o_g - m_g| / |q_g - m_g| <= s_g, q_g the interval
    end on o_g's side; so for each gamma, k is the ``level`` quantile over all genes of all
    calibration conditions (split-conformal) of what each gene needs, 0 where its raw interval
    covers and t_g / sqrt(1 + (gamma |m_g| / h_g)^2) elsewhere, and gamma is the value whose
    coverage of each condition's ``n_top`` top genes (largest |change| in ``select``, else
    largest |m_g|) comes nearest ``level``.

    Intervals are only ever widened (s_g >= 1): the calibration conditions also shaped the
    fit, so they are predicted better than truly unseen ones; their residuals can show that
    intervals are too narrow, never that they are too wide (on the shipped real cells a
    two-sided version narrowed the held-out doubles' intervals from 0.92 to 0.80 coverage)."""

    k: float = 1.0
    gamma: float = 0.0
    level: float = 0.9
    n_conditions: int = 0
    coverage_before: float = float("nan")  # all genes of the calibration conditions
    coverage_top_before: float = float("nan")  # their n_top genes of largest predicted change
    coverage_after: float = float("nan")
    coverage_top_after: float = float("nan")

    @staticmethod
    def _bounds(draws: np.ndarray, level: float):
        return (draws.mean(0), *central_interval(draws, level))

    @classmethod
    def _needed(cls, draws, observed, level):
        """t_g: the stretch each gene's interval needs to cover o_g, and the stretch profile
        |m_g| / h_g."""
        m, lo, hi = cls._bounds(draws, level)
        with np.errstate(divide="ignore", invalid="ignore"):
            side = np.where(observed >= m, hi - m, m - lo)
            t = np.where(observed == m, 0.0, np.abs(observed - m) / side)
            ratio = np.abs(m) / np.maximum((hi - lo) / 2.0, 1e-12)
        return np.nan_to_num(t, nan=np.inf), ratio, m

    @classmethod
    def fit(cls, draws: Sequence[np.ndarray], observed: Sequence[np.ndarray], level: float = 0.9,
            n_top: int = 20, gammas: Sequence[float] = CALIBRATION_GAMMAS,
            select: Sequence[np.ndarray] | None = None) -> "IntervalCalibration":
        """Fit from ``draws[i]`` (S x G predictive draws of condition i's change) and
        ``observed[i]`` (G, its observed change). ``select[i]`` (optional, G): the change the
        ``n_top`` genes of condition i are chosen by (e.g. from other cells of it than
        ``observed[i]``, as the benchmark chooses its top-20 DE genes; default: the draws' mean)."""
        if len(draws) == 0 or len(draws) != len(observed) or (select is not None and len(select) != len(draws)):
            raise ValueError(f"IntervalCalibration.fit needs one observed change per set of draws and at least "
                             f"one condition; got {len(draws)} sets of draws and {len(observed)} changes"
                             + ("" if select is None else f" and {len(select)} selection changes"))
        parts = [cls._needed(np.asarray(d, float), np.asarray(o, float).ravel(), level) for d, o in zip(draws, observed)]
        t = np.concatenate([p[0] for p in parts])
        ratio = np.concatenate([p[1] for p in parts])
        chosen_by = [p[2] for p in parts] if select is None else [np.asarray(c, float).ravel() for c in select]
        top = np.concatenate([np.isin(np.arange(len(c)), np.argsort(-np.abs(c), kind="stable")[:n_top])
                              for c in chosen_by])
        q = min(1.0, math.ceil((len(t) + 1) * level) / len(t))  # split-conformal quantile
        best = None
        for g in gammas:
            r = np.where(t <= 1.0, 0.0, t / np.sqrt(1.0 + (g * ratio) ** 2))
            k = float(np.quantile(r, q))
            cov_top = float(np.mean(r[top] <= k))
            if best is None or abs(cov_top - level) < abs(best[2] - level) - 1e-9:
                best = (g, k, cov_top, float(np.mean(r <= k)))
        g, k, cov_top, cov = best
        if not np.isfinite(k):
            raise ValueError("IntervalCalibration.fit: the draws of the calibration conditions have zero width where "
                             "the observed change differs from them; more draws or cells are needed")
        return cls(k=k, gamma=float(g), level=level, n_conditions=len(parts),
                   coverage_before=float(np.mean(t <= 1.0)), coverage_top_before=float(np.mean(t[top] <= 1.0)),
                   coverage_after=cov, coverage_top_after=cov_top)

    def apply(self, draws) -> np.ndarray:
        """The stretched draws (S x G) of one condition's change."""
        d = np.asarray(draws, float)
        m, lo, hi = self._bounds(d, self.level)
        ratio = np.abs(m) / np.maximum((hi - lo) / 2.0, 1e-12)
        return m + np.maximum(1.0, self.k * np.sqrt(1.0 + (self.gamma * ratio) ** 2)) * (d - m)

    def to_dict(self) -> dict:
        return asdict(self)


def top_de_genes(observed_condition_cells, control_cells, gene_names: Sequence[str],
                 n: int = N_TOP_DE, method: str = DE_METHOD, min_cells: int = 3) -> list[str]:
    """Top-``n`` DE genes of a condition vs control (scanpy ``rank_genes_groups``,
    ``rankby_abs=True``), computed on the observed log-normalised cells.

    Raises :class:`DataError` when either group has fewer than ``min_cells`` cells.
    Cost: seconds for ~10^4 control cells x 5000 genes. Pass cells other than the ones to be
    scored (see the module docstring, *Coverage*); compute it once per condition and pass it
    to :func:`evaluate_condition` as ``top_de`` for every method and seed.
    """
    import anndata as ad
    import scanpy as sc

    obs_x, ctrl_x = _cells(observed_condition_cells), _cells(control_cells)
    if len(obs_x) < min_cells or len(ctrl_x) < min_cells:
        raise DataError(f"too few cells for a DE test (condition {len(obs_x)}, control "
                        f"{len(ctrl_x)}; need >= {min_cells} each)")
    gene_names = [str(g) for g in gene_names]
    if obs_x.shape[1] != len(gene_names):
        raise DataError(f"{obs_x.shape[1]} genes in the cells but {len(gene_names)} gene names")
    X = np.vstack([obs_x, ctrl_x]).astype(np.float32)
    groups = pd.Categorical(["cond"] * len(obs_x) + ["ctrl"] * len(ctrl_x))
    a = ad.AnnData(X=X, obs=pd.DataFrame({"g": groups}, index=[str(i) for i in range(len(X))]),
                   var=pd.DataFrame(index=pd.Index(gene_names)))
    a.uns["log1p"] = {"base": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(a, "g", groups=["cond"], reference="ctrl", method=method,
                                rankby_abs=True, n_genes=min(n, len(gene_names)),
                                use_raw=False)
    return [str(g) for g in a.uns["rank_genes_groups"]["names"]["cond"][:n]]


# --------------------------------------------------------------------------- per condition
def evaluate_condition(pred_lognorm, obs_lognorm, ctrl_lognorm, gene_names: Sequence[str],
                       top_de: Sequence[str] | Sequence[int] | None = None,
                       pred_change_samples=None, seed: int = 0, batch_size: int = BATCH_SIZE,
                       max_cells_energy: int = 500, mmd_bandwidths=None, pred_ctrl_lognorm=None,
                       obs_top_lognorm=None, top_change_samples=None, pred_mean=None,
                       pred_ctrl_mean=None, calibration: "IntervalCalibration | None" = None
                       ) -> dict[str, float | str]:
    """All metrics for one condition (log-normalised predicted, observed, control cells).

    ``ctrl_lognorm``: the reference controls the observed change is measured from.
    ``pred_ctrl_lognorm``: the method's own predicted control cells, which its predicted
    change is measured from (default: ``ctrl_lognorm``). ``top_de``: gene names or positions
    (default: :func:`top_de_genes` on observed vs control, which selects on the scored cells).
    ``pred_change_samples``: S x G posterior predictive samples of the change, enables
    ``coverage90_all`` and ``coverage90_top20de``. ``obs_top_lognorm``: the observed cells the
    ``*_top20de`` metrics are scored on (default ``obs_lognorm``; pass the cells other than
    those ``top_de`` was chosen on), with ``top_change_samples`` drawn for their number of
    cells (default ``pred_change_samples``). ``pred_mean`` / ``pred_ctrl_mean``: the method's
    point predictions of the condition's and the controls' mean profiles when they are known
    better than from the given cells (a model's posterior predictive mean from many more
    cells; default: the cells' means). ``calibration``: an :class:`IntervalCalibration`
    applied to the samples before the coverage metrics (the raw samples' coverage is then
    ``coverage90_*_uncalibrated``). Undefined metrics are :class:`MetricNote` strings.
    """
    pred, obs, ctrl = _cells(pred_lognorm), _cells(obs_lognorm), _cells(ctrl_lognorm)
    pred_ctrl = ctrl if pred_ctrl_lognorm is None else _cells(pred_ctrl_lognorm)
    n_genes = obs.shape[1]
    if pred.shape[1] != n_genes or ctrl.shape[1] != n_genes or pred_ctrl.shape[1] != n_genes:
        raise DataError(f"gene dimension mismatch: pred {pred.shape[1]}, obs {n_genes}, "
                        f"ctrl {ctrl.shape[1]}, predicted ctrl {pred_ctrl.shape[1]}")
    out: dict[str, float | str] = {}
    out.update(batch_protocol(pred, obs, batch_size=batch_size, seed=seed,
                              mmd_bandwidths=mmd_bandwidths))

    obs_mean = obs.mean(0)
    pred_mean = pred.mean(0) if pred_mean is None else np.asarray(pred_mean, dtype=np.float64).ravel()
    pred_ctrl_mean = pred_ctrl.mean(0) if pred_ctrl_mean is None else np.asarray(pred_ctrl_mean, np.float64).ravel()
    if pred_mean.shape[0] != n_genes or pred_ctrl_mean.shape[0] != n_genes:
        raise DataError(f"gene dimension mismatch: predicted mean {pred_mean.shape[0]}, predicted control mean "
                        f"{pred_ctrl_mean.shape[0]}, obs {n_genes}")
    obs_delta, pred_delta = obs_mean - ctrl.mean(0), pred_mean - pred_ctrl_mean
    top_mean = obs_mean if obs_top_lognorm is None else _cells(obs_top_lognorm).mean(0)
    top_delta = top_mean - ctrl.mean(0)

    de_idx: np.ndarray | MetricNote
    if top_de is None:
        try:
            de_idx = _gene_index(top_de_genes(obs, ctrl, gene_names), gene_names, n_genes)
        except DataError as e:
            de_idx = MetricNote(f"no top-DE genes: {e}")
    else:
        de_idx = _gene_index(top_de, gene_names, n_genes)
        if len(de_idx) == 0:
            de_idx = MetricNote("no top-DE genes given")

    out["pearson_delta_all"] = pearson(pred_delta, obs_delta)
    out["pseudobulk_rmse_all"] = rmse(pred_mean, obs_mean)
    out["l2_mean_all"] = l2(pred_mean, obs_mean)
    out["delta_rmse_all"] = rmse(pred_delta, obs_delta)
    if is_note(de_idx):
        for k in ("pearson_delta_top20de", "pseudobulk_rmse_top20de", "l2_mean_top20de",
                  "direction_acc_top20de"):
            out[k] = de_idx
    else:
        out["pearson_delta_top20de"] = pearson(pred_delta[de_idx], top_delta[de_idx])
        out["pseudobulk_rmse_top20de"] = rmse(pred_mean[de_idx], top_mean[de_idx])
        out["l2_mean_top20de"] = l2(pred_mean[de_idx], top_mean[de_idx])
        out["direction_acc_top20de"] = direction_accuracy(pred_delta[de_idx], top_delta[de_idx])
    if len(pred) < 1 or len(obs) < 1:
        out["energy_distance"] = MetricNote("energy distance undefined: an empty cell set")
    else:
        out["energy_distance"] = energy_distance(pred, obs, max_cells=max_cells_energy, seed=seed)
    if pred_change_samples is not None:
        samples = _cells(pred_change_samples)
        if samples.shape[1] != n_genes:
            raise DataError(f"pred_change_samples has {samples.shape[1]} genes, expected {n_genes}")
        top_samples = samples if top_change_samples is None else _cells(top_change_samples)
        versions = {"": (samples, top_samples)}
        if calibration is not None:  # the reported intervals are the calibrated ones
            versions = {"": (calibration.apply(samples), calibration.apply(top_samples)),
                        "_uncalibrated": versions[""]}
        for suffix, (s_all, s_top) in versions.items():
            out["coverage90_all" + suffix] = coverage(s_all, obs_delta, 0.9)
            out["coverage90_top20de" + suffix] = (de_idx if is_note(de_idx)
                                                  else coverage(s_top[:, de_idx], top_delta[de_idx], 0.9))
            out["width90_all" + suffix] = interval_width(s_all, 0.9)
            out["width90_top20de" + suffix] = de_idx if is_note(de_idx) else interval_width(s_top[:, de_idx], 0.9)
    return out


# --------------------------------------------------------------------------- results tables
RESULT_COLUMNS = ["method", "condition", "group", "metric", "value", "seed", "note"]
_ID_KEYS = ("method", "condition", "group", "seed", "note", "metrics")


def results_frame(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Long-form results: columns ``method, condition, group, metric, value, seed, note``.

    Each row is a mapping with ``method``, ``condition``, ``seed`` (optional ``group``) and the
    metrics, either flat (every other key is a metric) or nested under ``"metrics"`` (e.g.
    the output of :func:`evaluate_condition`). A string value (a :class:`MetricNote`) becomes
    ``value = NaN`` with the string in ``note``; a bare NaN gets the note
    ``"undefined (no reason recorded)"``. A row-level ``note`` is appended to each metric's note.
    """
    records = []
    for row in rows:
        missing = [k for k in ("method", "condition", "seed") if k not in row]
        if missing:
            raise DataError(f"result row lacks {missing}: {dict(row)!r}"[:300])
        metrics = dict(row.get("metrics", {}))
        metrics.update({k: v for k, v in row.items() if k not in _ID_KEYS})
        row_note = str(row.get("note") or "")
        for name, v in metrics.items():
            note = ""
            if isinstance(v, str):
                value, note = math.nan, str(v)
            else:
                value = float(v)
                if math.isnan(value):
                    note = "undefined (no reason recorded)"
            if row_note:
                note = f"{note}; {row_note}" if note else row_note
            records.append({"method": str(row["method"]), "condition": str(row["condition"]),
                            "group": str(row.get("group") or ""), "metric": str(name),
                            "value": value, "seed": int(row["seed"]), "note": note})
    return pd.DataFrame.from_records(records, columns=RESULT_COLUMNS)


def summarize(df: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Method x metric summary: per seed, average each metric over conditions (NaN skipped);
    then mean and sd (ddof=1; NaN with a single seed) of those averages over seeds.

    ``by``: extra grouping columns, e.g. ``("group",)``. Columns: ``method, *by, metric,
    mean, sd, n_seeds, n_conditions, n_undefined``.
    """
    keys = ["method", *by, "metric"]
    per_seed = (df.groupby(keys + ["seed"], sort=False)
                .agg(value=("value", "mean"),
                     n_conditions=("value", "count"),
                     n_undefined=("value", lambda v: int(v.isna().sum())))
                .reset_index())
    out = (per_seed.groupby(keys, sort=False)
           .agg(mean=("value", "mean"), sd=("value", lambda v: v.std(ddof=1) if v.notna().sum() > 1 else math.nan),
                n_seeds=("seed", "nunique"), n_conditions=("n_conditions", "max"),
                n_undefined=("n_undefined", "sum"))
           .reset_index())
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summary_markdown(df: pd.DataFrame, reference_rows: Iterable[Mapping] | None = None,
                     digits: int = 4) -> str:
    """Markdown: a table of *measured* results (method rows, metric columns, ``mean ± sd``
    over seeds), and, if given, a separate table of published numbers headed
    "published, different data version". The two are never mixed.

    ``reference_rows``: mappings with ``method``, ``metric``, ``value`` and optionally
    ``setting`` (e.g. "Norman 2019, double held-out") and ``source``.
    """
    s = summarize(df)
    metrics = [m for m in METRIC_NAMES if m in set(s["metric"])]
    metrics += [m for m in dict.fromkeys(s["metric"]) if m not in metrics]
    methods = list(dict.fromkeys(s["method"]))
    lines = ["## Measured (this run)", "",
             "Mean ± sd over seeds of per-seed averages over conditions "
             "(n/a: undefined for every condition, see the `note` column of the long table).", "",
             "| method | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for m in methods:
        cells = []
        for met in metrics:
            r = s[(s["method"] == m) & (s["metric"] == met)]
            if r.empty:
                cells.append("")
                continue
            mean, sd = float(r["mean"].iloc[0]), float(r["sd"].iloc[0])
            cells.append(_fmt(mean, digits) + ("" if math.isnan(sd) else f" ± {_fmt(sd, digits)}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ref = list(reference_rows or [])
    if ref:
        lines += ["", "## Reference: published, different data version", "",
                  "Numbers reported in the literature on other versions/splits of the data; "
                  "not measured here and not directly comparable with the table above.", "",
                  "| method | metric | value | setting | source |", "|---|---|---|---|---|"]
        for r in ref:
            v = r.get("value")
            vs = _fmt(float(v), digits) if isinstance(v, (int, float)) else str(v)
            lines.append(f"| {r.get('method', '')} | {r.get('metric', '')} | {vs} | "
                         f"{r.get('setting', '')} | {r.get('source', '')} |")
    return "\n".join(lines) + "\n"
