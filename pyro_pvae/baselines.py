"""Baselines sharing the model's prediction interface (docs/ARCHITECTURE.md).

Every baseline has a ``name`` (the method name used in results tables) and

* ``fit(adata, split)``: uses only the training cells ``split.train_idx`` (``split=None``:
  all cells). Expression is log-normalised: ``adata.layers["lognorm"]`` when present (so it
  matches what the evaluation compares against), else ``utils.lognormalize(adata.X)``.
* ``predict_change(condition) -> (G,)``: predicted change of the mean from the training
  control mean, on the log-normalised scale.
* ``predict(conditions, n_cells=100, seed=0) -> AnnData``: ``n_cells`` cells per condition,
  each a randomly drawn (with replacement) training control cell's log-normalised profile plus
  ``predict_change(condition)``. ``layers["lognorm"]`` holds them; ``X`` is ``None`` (the
  baselines do not model counts); ``obs`` has ``condition``, ``n_targets`` and
  ``control_index`` (position in ``adata`` of the control cell the prediction started from).
  Values are not clipped at 0 (clipping would bias the predicted mean away from
  control mean + change); pass ``clip=True`` to ``predict`` for non-negative cells.
* ``notes``: ``{condition: reason}`` for anything a prediction had to paper over (a target
  gene never seen as a training single contributes zero), for the results ``note`` column.

Conditions are canonicalised with ``format_condition(parse_condition(label))``, so
``"SET+KLF1"`` and ``"KLF1+SET"`` are the same condition.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyro_pvae.data import CONTROL, DataError, format_condition, parse_condition
from pyro_pvae.utils import lognormalize, to_dense


def _canon(label: str) -> str:
    return format_condition(parse_condition(str(label)))


class Baseline:
    """Shared machinery: training lognorm, control pool, per-condition mean changes."""

    name = "baseline"

    def __init__(self):
        self.notes: dict[str, str] = {}
        self._fitted = False

    # ---------------------------------------------------------------- fitting
    def fit(self, adata, split=None):
        if "condition" not in adata.obs:
            raise DataError("adata.obs['condition'] is required (canonical AnnData)")
        idx = (np.arange(adata.n_obs) if split is None
               else np.asarray(split.train_idx, dtype=int))
        if len(idx) == 0:
            raise DataError("the split has no training cells")
        if "lognorm" in adata.layers:
            L = adata.layers["lognorm"][idx]
        else:
            L = lognormalize(adata.X[idx])
        L = sp.csr_matrix(L) if sp.issparse(L) else np.asarray(L)
        conds = np.array([_canon(c) for c in adata.obs["condition"].values[idx]])
        ctrl = conds == CONTROL
        if not ctrl.any():
            raise DataError("no control cells among the training cells")
        self.gene_names = pd.Index(adata.var_names.astype(str))
        self._ctrl_pool = L[np.flatnonzero(ctrl)]
        self._ctrl_index = idx[ctrl]
        self.control_mean_ = np.asarray(self._ctrl_pool.mean(axis=0), dtype=np.float64).ravel()
        # mean change of each training perturbation condition
        self.train_changes_: dict[str, np.ndarray] = {}
        self.train_n_cells_: dict[str, int] = {}
        for c in pd.unique(conds[~ctrl]):
            rows = np.flatnonzero(conds == c)
            m = np.asarray(L[rows].mean(axis=0), dtype=np.float64).ravel()
            self.train_changes_[c] = m - self.control_mean_
            self.train_n_cells_[c] = len(rows)
        self.single_changes_ = {parse_condition(c)[0]: d for c, d in self.train_changes_.items()
                                if len(parse_condition(c)) == 1}
        self.notes = {}
        self._fit_extra(L, conds)
        self._fitted = True
        return self

    def _fit_extra(self, L, conds):
        """Hook for subclasses (called at the end of ``fit``)."""

    def _check(self):
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.fit must be called before predicting")

    # ---------------------------------------------------------------- predicting
    def predict_change(self, condition: str) -> np.ndarray:
        raise NotImplementedError

    def _additive_sum(self, condition: str) -> np.ndarray:
        """Sum of the training single changes of the targets; unseen targets add zero."""
        targets = parse_condition(_canon(condition))
        out = np.zeros(len(self.gene_names))
        missing = [t for t in targets if t not in self.single_changes_]
        for t in targets:
            if t in self.single_changes_:
                out += self.single_changes_[t]
        if missing:
            self.notes[_canon(condition)] = (
                f"{self.name}: target(s) {', '.join(missing)} never seen as a training single; "
                "contributed zero change")
        return out

    def predict(self, conditions: Sequence[str] | str, n_cells: int = 100, seed: int = 0,
                clip: bool = False):
        import anndata as ad

        self._check()
        if isinstance(conditions, str):
            conditions = [conditions]
        rng = np.random.default_rng(seed)
        blocks, labels, starts = [], [], []
        for c in conditions:
            c = _canon(c)
            delta = self.predict_change(c)
            pick = rng.integers(0, self._ctrl_pool.shape[0], size=n_cells)
            cells = to_dense(self._ctrl_pool[pick], np.float64) + delta[None, :]
            if clip:
                cells = np.maximum(cells, 0.0)
            blocks.append(cells.astype(np.float32))
            labels += [c] * n_cells
            starts.append(self._ctrl_index[pick])
        Xl = (np.vstack(blocks) if blocks
              else np.zeros((0, len(self.gene_names)), dtype=np.float32))
        obs = pd.DataFrame({
            "condition": pd.Series(labels, dtype=str),
            "n_targets": np.array([len(parse_condition(c)) for c in labels], dtype=int),
            "control_index": (np.concatenate(starts) if starts else np.zeros(0, int)),
        })
        obs.index = [f"pred{i}" for i in range(len(obs))]
        return ad.AnnData(obs=obs, var=pd.DataFrame(index=self.gene_names.copy()),
                          layers={"lognorm": Xl}, uns={"method": self.name})


class ControlMean(Baseline):
    """No change: every predicted cell is a training control cell."""

    name = "control_mean"

    def predict_change(self, condition: str) -> np.ndarray:
        self._check()
        return np.zeros(len(self.gene_names))


class Additive(Baseline):
    """Control + sum over targets of (training mean of the single - control mean).

    A single is predicted by its own training mean change (the same formula with one term).
    A target never seen as a training single contributes zero (recorded in ``notes``).
    """

    name = "additive"

    def predict_change(self, condition: str) -> np.ndarray:
        self._check()
        return self._additive_sum(condition)


class AdditiveShrink(Additive):
    """Additive sum times one global factor ``c`` (``c_``), fitted by least squares on the
    training conditions with two or more targets whose singles were all seen in training:
    ``c = <a, o> / <a, a>`` over all their genes (a: additive sum, o: observed change).
    ``c = 1`` when there is no such double; clipped to [0, 2]. Singles are not shrunk.
    """

    name = "additive_shrink"

    def _fit_extra(self, L, conds):
        num = den = 0.0
        used = []
        for c, obs_change in self.train_changes_.items():
            targets = parse_condition(c)
            if len(targets) < 2 or any(t not in self.single_changes_ for t in targets):
                continue
            a = sum(self.single_changes_[t] for t in targets)
            num += float(a @ obs_change)
            den += float(a @ a)
            used.append(c)
        self.shrink_doubles_ = used
        self.c_ = float(np.clip(num / den, 0.0, 2.0)) if used and den > 0 else 1.0

    def predict_change(self, condition: str) -> np.ndarray:
        self._check()
        a = self._additive_sum(condition)
        return a * self.c_ if len(parse_condition(_canon(condition))) >= 2 else a


class Linear(Baseline):
    """Linear baseline in the spirit of Ahlmann-Eltze et al. 2024 (Nat Methods 2025):
    ``Y ~ G W P^T + b``.

    * ``G`` (genes x k): PCA gene loadings of the centred training log-normalised cells (at most
      ``max_cells`` cells, subsampled), orthonormal columns.
    * ``P`` (perturbations x k): for a target gene among the measured genes, its row of ``G``;
      otherwise, if the target has a training single, that single's mean change projected on
      the PCA basis, ``G^T delta``; else zero (recorded in ``notes``). A condition with several
      targets uses the sum of its targets' embeddings.
    * ``Y`` (genes x conditions): mean changes of the training perturbation conditions (singles
      and any training doubles); ``b`` = their mean over conditions.
    * ``W = (G^T G + l I)^-1 G^T (Y - b) P (P^T P + l I)^-1`` (the closed form used by
      Ahlmann-Eltze et al.), ridge ``l`` = ``ridge`` (default 0.1).
    """

    name = "linear"

    def __init__(self, n_components: int = 10, ridge: float = 0.1, max_cells: int = 10000,
                 seed: int = 0):
        super().__init__()
        self.n_components = n_components
        self.ridge = ridge
        self.max_cells = max_cells
        self.seed = seed

    def _fit_extra(self, L, conds):
        rng = np.random.default_rng(self.seed)
        rows = np.arange(L.shape[0])
        if len(rows) > self.max_cells:
            rows = np.sort(rng.choice(rows, self.max_cells, replace=False))
        X = to_dense(L[rows], np.float32)
        X = X - X.mean(axis=0, keepdims=True, dtype=np.float64)
        k = int(min(self.n_components, X.shape[0] - 1, X.shape[1]))
        if k < 1:
            raise DataError("too few training cells or genes for the linear baseline's PCA")
        if min(X.shape) <= 500:
            _, _, vt = np.linalg.svd(X.astype(np.float64), full_matrices=False)
        else:  # large data: randomized SVD (Halko et al.), seeded
            from sklearn.utils.extmath import randomized_svd
            _, _, vt = randomized_svd(X, k, n_iter=7, random_state=self.seed)
        self.G_ = np.asarray(vt[:k], dtype=np.float64).T  # genes x k
        gene_pos = {g: i for i, g in enumerate(self.gene_names)}
        self._gene_pos = gene_pos

        conds_fit, P_rows = [], []
        for c in self.train_changes_:
            e = self._embed(c, record=False)
            if e is not None:
                conds_fit.append(c)
                P_rows.append(e)
        if not conds_fit:
            raise DataError("no training perturbation condition has an embedding")
        Y = np.stack([self.train_changes_[c] for c in conds_fit], axis=1)  # genes x n
        P = np.stack(P_rows, axis=0)  # n x k
        self.b_ = Y.mean(axis=1)
        G, lam = self.G_, self.ridge
        left = np.linalg.solve(G.T @ G + lam * np.eye(k), G.T @ (Y - self.b_[:, None]))
        self.W_ = left @ P @ np.linalg.inv(P.T @ P + lam * np.eye(k))
        self.fit_conditions_ = conds_fit

    def _target_embedding(self, t: str) -> np.ndarray | None:
        if t in self._gene_pos:
            return self.G_[self._gene_pos[t]].copy()
        if t in self.single_changes_:
            return self.G_.T @ self.single_changes_[t]
        return None

    def _embed(self, condition: str, record: bool = True) -> np.ndarray | None:
        targets = parse_condition(condition)
        embs = [self._target_embedding(t) for t in targets]
        missing = [t for t, e in zip(targets, embs) if e is None]
        if not record:
            return None if missing else np.sum(embs, axis=0)
        if missing:
            self.notes[condition] = (
                f"{self.name}: target(s) {', '.join(missing)} neither measured nor a training "
                "single; zero embedding")
        return np.sum([e for e in embs if e is not None] or [np.zeros(self.G_.shape[1])], axis=0)

    def predict_change(self, condition: str) -> np.ndarray:
        self._check()
        c = _canon(condition)
        if c == CONTROL:
            return np.zeros(len(self.gene_names))
        return self.G_ @ self.W_ @ self._embed(c) + self.b_


BASELINES = {cls.name: cls for cls in (ControlMean, Additive, AdditiveShrink, Linear)}


def make_baseline(name: str, **kwargs) -> Baseline:
    """Baseline by its results name (``control_mean``, ``additive``, ``additive_shrink``,
    ``linear``)."""
    try:
        return BASELINES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
