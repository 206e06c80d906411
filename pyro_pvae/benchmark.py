"""``python -m pyro_pvae.benchmark --config NAME [key=value ...]``: PerturbedVAE vs baselines.

Fits the model, its two ablations and the baselines on the config's split, evaluates every
metric on the held-out conditions and writes a run directory
(``runs/<config>-benchmark-<time>`` or ``output.run_dir``) with

* ``config.yaml``: the resolved config;
* ``results.csv``: long form, columns ``method, condition, group, metric, value, seed, note``
  (one row per method x held-out condition x metric x seed; an undefined metric has
  ``value`` NaN and its reason in ``note``);
* ``summary.md``: method x metric tables (mean ± sd over seeds of the per-seed average over
  conditions) for each group (single / seen0 / seen1 / seen2) and per condition; published
  numbers only for the ``norman`` / ``replogle`` configs, in a separate table labelled
  "published, different data version";
* ``timings.csv`` (seconds per method and seed) and PNG plots.

Methods (``benchmark.methods``): ``PerturbedVAE``, ``PerturbedVAE_no_alignment``
(``model.alpha=0``), ``PerturbedVAE_dense_prior`` (``model.effect_prior=dense``),
``control_mean``, ``additive``, ``additive_shrink``, ``linear`` (see :mod:`pyro_pvae.baselines`).
``benchmark.seeds=S`` repeats every fit with ``train.seed = 0..S-1`` (the split stays the one
of ``split.seed``); baselines are deterministic given the split: their point metrics do not
vary over seeds, their distribution metrics only by the random control cells their predicted
cells start from.

Two scoring modes
-----------------
*Cells* (every config but norman_effects). All expression is ``log1p(counts / total * 1e4)``
recomputed from the counts (``data.lognormalize``), the scale the model predicts on, for the
observed cells and for the baselines alike.

Protocol (cells mode). Every split holds out a share of the control cells
(``split.kwargs.control_test_fraction``, default 0.5: 50 of the 100 controls of the shipped
Norman subset; see ``pyro_pvae/data/splits.py``); no method ever trains on them.

* Observed change of a held-out condition c = mean(scored cells of c) - mean(held-out
  controls). Subtracting the *training* control mean instead shares that mean's noise with
  every method that subtracts it too: a constant vector (the mean change of the training
  singles) then correlates with every observed change although it knows nothing of c.
* Predicted change = mean(the method's predicted cells of c) - mean(its own control
  prediction): for the model its predicted control cells (the same reference cells as
  starting points, moved to control; ``model.prediction_start``). The model's point prediction is its posterior predictive mean
  (:meth:`PerturbedVAE.predict_mean`): ``benchmark.n_mean_cells`` predicted cells of the
  condition and as many predicted controls, spread over ``benchmark.n_change_draws`` posterior
  draws of the global sites (one draw for all cells adds the posterior's spread to the point
  prediction as noise; a few hundred cells add their sampling noise). A baseline's point
  prediction is exact: the mean of the training controls it was fitted on plus its change
  (``predict_change``), and its change is measured from those controls. ``benchmark.n_pred_cells``
  predicted cells per condition feed the distribution metrics (energy distance, MMD); a
  baseline's are training control cells drawn with replacement plus its change. For an external
  file the means of its cells and of its ``'control'`` cells, else of the training controls
  (noted).
* Top-20 DE genes of c (scanpy t-test, :func:`metrics.top_de_genes`, vs the training
  controls) are chosen on cells the ``*_top20de`` metrics do not score: the training cells of
  c when it has at least ``MIN_SELECT_CELLS`` of them (held-out singles; the top-20 metrics
  then score all held-out cells), else a seeded half (``split.seed``) of its held-out cells,
  the top-20 metrics scoring the other half (held-out doubles). Genes chosen on the scored
  cells are those whose observed change is extreme by chance, so scores on them are biased (a
  perfect predictive distribution covers them well under 90%); chosen on independent cells
  they are not. Using the training cells where they exist keeps every held-out cell for
  scoring. The genes are chosen once per condition and used by every method and seed. The
  all-gene and cell metrics involve no gene selection and score all held-out cells of c.
* ``coverage90_all`` and ``coverage90_top20de`` (model rows): share of all genes / of the
  top-20 DE genes whose observed change lies in the central 90% of
  :meth:`PerturbedVAE.predict_change_samples`, drawn with ``n_cells`` = the number of cells
  that observed change was measured on. With ``benchmark.calibrate_intervals=cross_fit``
  (default; ``in_sample``: faster, optimistic; ``off``) the draws are first stretched by
  :meth:`PerturbedVAE.calibrate_intervals`, fitted on training doubles a refitted copy of
  the model never saw (no held-out cell is used); ``coverage90_*_uncalibrated`` keep the raw
  draws' coverage. ``width90_all`` / ``width90_top20de`` (and ``_uncalibrated``): the mean width
  of those intervals, what their coverage costs.

External predictions: ``benchmark.external=[NAME=path/pred.h5ad, ...]`` adds one row NAME
per file: predicted cells with ``obs['condition']`` in canonical labels and counts in ``X``
or ``layers['counts']`` (log-normalised like everything else; already log-normalised values,
``log1p(counts/total*1e4)`` in ``X`` or ``layers['lognorm']``, are used as they are). Scored
exactly like the built-in methods, once (seed 0). A held-out condition without predicted
cells is reported as missing (value NaN and a note in results.csv, a line in summary.md). A
file that is missing, unreadable, without ``obs['condition']`` or without the data's genes
stops the benchmark before any fit.

*Effects* (data.source=norman_effects, the semi-synthetic cells whose effects are the real
Norman 2019 pseudobulk changes, :func:`simulate.simulate_norman_effects`). Held-out
conditions are scored against the REAL changes in ``uns['truth']['true_delta_log1p_cpm']``,
which are changes of log1p(CPM) of pseudobulk means (per-million normalisation, log of the
mean). So every method's change is computed on that scale here:

* the model: pseudobulk log1p(CPM) of its predicted *counts* for the condition minus that of
  its predicted control cells (``benchmark.n_mean_cells`` cells each, :meth:`PerturbedVAE.predict_mean`);
* the baselines: fitted on the pseudobulk log1p(CPM) profile of each training condition and
  of the training controls (one row each; so ``additive`` is exactly the sum of the two
  training singles' pseudobulk log1p(CPM) changes and ``additive_shrink`` one global factor
  fitted on the training doubles).

Metrics: ``delta_rmse_all`` (RMSE over genes of predicted vs real change),
``pearson_delta_all`` and ``pearson_delta_top20de`` (the condition's 20 genes with the largest
``|observed change|`` of its held-out simulated cells, from the held-out controls: chosen on data,
never on the real change they are scored against, since genes picked by the size of the
scored value are those where it lies furthest out, which biases coverage low: the preset's
coverage90_top20de over three seeds is 0.13 with the genes picked on the truth, 0.38 on the
held-out cells; README.md); for the model also
``coverage90_all`` / ``coverage90_top20de``: each of ``benchmark.n_change_draws`` draws is one
posterior draw of the globals and the pseudobulk change of as many predicted cells (and as
many predicted control cells) as the condition has held-out cells, so the intervals include
that cell-sampling noise; ``coverage90_all_observed`` scores the same draws against the
held-out simulated cells' own change (from the held-out controls): the calibration for the
data the model was given, which the real change adds the simulator's closure gap to. The
interval calibration is fitted as in cells mode, on this scale (:func:`effects_calibration`). An external file's change is computed from its counts like the
model's. The noise floor is measured from the held-out controls.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

PROG = "pyro_pvae.benchmark"
log = logging.getLogger("pyro_pvae.benchmark")

MODEL_VARIANTS: dict[str, dict] = {
    "PerturbedVAE": {},
    "PerturbedVAE_no_alignment": {"alpha": 0.0},
    "PerturbedVAE_dense_prior": {"effect_prior": "dense"},
}
BASELINE_METHODS = ("control_mean", "additive", "additive_shrink", "linear")
ALL_METHODS = tuple(MODEL_VARIANTS) + BASELINE_METHODS
CELL_METRICS = ("nrmse", "r2_mean", "mmd", "pearson_delta_all", "pearson_delta_top20de",
                "pseudobulk_rmse_all", "pseudobulk_rmse_top20de", "delta_rmse_all", "l2_mean_all",
                "energy_distance", "direction_acc_top20de", "coverage90_all", "coverage90_top20de",
                "coverage90_all_uncalibrated", "coverage90_top20de_uncalibrated", "width90_all", "width90_top20de",
                "width90_all_uncalibrated", "width90_top20de_uncalibrated")
EFFECT_METRICS = ("delta_rmse_all", "pearson_delta_all", "pearson_delta_top20de", "coverage90_all",
                  "coverage90_top20de", "coverage90_all_observed", "coverage90_all_uncalibrated",
                  "coverage90_top20de_uncalibrated", "coverage90_all_observed_uncalibrated", "width90_all",
                  "width90_top20de", "width90_all_uncalibrated", "width90_top20de_uncalibrated")
GROUPS = ("single", "seen0", "seen1", "seen2")
RESULT_COLUMNS = ["method", "condition", "group", "metric", "value", "seed", "note"]
N_TOP = 20

# Published numbers (all computed by the PerturbedVAE authors, arXiv
# 2605.19343) on the full data sets and their protocols. Shown only as a separate reference
# table for the norman / replogle configs; never mixed with measured rows.
_SRC = "PerturbedVAE paper (arXiv 2605.19343)"
REFERENCE_ROWS: dict[str, list[dict]] = {
    "norman": [
        *[{"method": m, "metric": "nrmse", "value": v, "setting": f"Norman 2019 full data, {g} held out, latent 105"}
          for m, s, d in (("Discrepancy-VAE", 0.5558, 0.6082), ("SENA", 0.5837, 0.8483),
                          ("sVAE+", 0.5002, 0.5664), ("SAMS-VAE", 0.4123, 0.4629),
                          ("PerturbedVAE, no alignment", 0.4155, 0.4623), ("PerturbedVAE", 0.3995, 0.4474))
          for g, v in (("single", s), ("double", d))],
        *[{"method": m, "metric": met, "value": v, "setting": "Norman 2019 full data, double held out, all genes"}
          for m, vals in (("additive", (2.5407, 0.9076, 0.0887)), ("GEARS", (4.6797, 0.4631, 0.1514)),
                          ("PerturbedVAE", (3.7238, 0.6869, 0.1285)))
          for met, v in zip(("l2_mean_all", "pearson_delta_all", "pseudobulk_rmse_all"), vals)],
    ],
    "replogle": [
        {"method": m, "metric": met, "value": v, "setting": "Replogle 2022 K562 essential, single, 80/20 cells"}
        for m, vals in (("SENA", (10.916, 0.057, 0.6761)), ("Discrepancy-VAE", (10.862, 0.056, 0.6731)),
                        ("sVAE+", (10.608, 0.136, 0.4905)), ("SAMS-VAE", (8.489, 0.157, 0.4818)),
                        ("PerturbedVAE", (8.296, 0.192, 0.4815)))
        for met, v in zip(("l2_mean_all", "pearson_delta_all", "nrmse"), vals)],
}


class BenchmarkError(ValueError):
    """An inconsistent benchmark setting (unknown method, no held-out conditions, ...)."""


# ----------------------------------------------------------------------------- config
def hydra_overrides(overrides: Sequence[str]) -> list[str]:
    """``benchmark.train.KEY=V`` -> ``++benchmark.train.KEY=V`` (the group is an open dict,
    empty by default, so Hydra needs the add-or-override form); ``benchmark.external=[A=a.h5ad,
    B=b.h5ad]`` (or one unbracketed entry) -> its entries quoted, since Hydra reads no bare
    ``=`` inside a value."""
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if key.lstrip("+") == "benchmark.external" and sep and "=" in value:
            items = value.strip()
            items = items[1:-1] if items.startswith("[") and items.endswith("]") else items
            quoted = [x.strip().strip("'\"") for x in items.split(",") if x.strip()]
            ov = key + "=[" + ",".join("'" + x.replace("'", "\\'") + "'" for x in quoted) + "]"
        out.append("++" + ov if ov.startswith("benchmark.train.") else ov)
    return out


def parse_methods(methods) -> list[str]:
    if methods is None:
        return list(ALL_METHODS)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.strip("[]").split(",") if m.strip()]
    methods = [str(m) for m in methods]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise BenchmarkError(f"unknown method(s) {bad} in benchmark.methods; choose from {', '.join(ALL_METHODS)}")
    if not methods:
        raise BenchmarkError("benchmark.methods is empty; choose from " + ", ".join(ALL_METHODS))
    return list(dict.fromkeys(methods))


def train_settings(cfg, overrides: Sequence[str]) -> dict:
    """``cfg.train`` updated by ``benchmark.train``, except keys given explicitly as
    ``train.KEY=...`` on the command line (those win)."""
    from omegaconf import OmegaConf

    train = OmegaConf.to_container(cfg.train, resolve=True)
    explicit = {ov.lstrip("+~").split("=", 1)[0].split(".", 1)[1] for ov in overrides
                if ov.lstrip("+~").startswith("train.")}
    b = cfg.get("benchmark")
    bt = b.get("train") if b is not None else None
    bt = OmegaConf.to_container(bt, resolve=True) if OmegaConf.is_config(bt) else dict(bt or {})
    for k, v in bt.items():
        if k not in explicit:
            train[k] = v
    train["progress"] = False
    return train


# ----------------------------------------------------------------------------- helpers
def _dense(X) -> np.ndarray:
    from .utils import to_dense

    return to_dense(X, np.float64)


def _conditions(adata) -> np.ndarray:
    from .data import condition_labels

    return condition_labels(adata)


def pseudobulk_log1p_cpm(X) -> np.ndarray:
    """``log1p(1e6 * summed counts / total)`` per gene (pseudobulk of a set of cells)."""
    from .utils import lognormalize

    return lognormalize(np.asarray(X.sum(axis=0), dtype=np.float64).ravel(), 1e6, np.float64)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True, mininterval=1.0)


def _fit_model(adata, split, model_cfg: dict, train_cfg: dict, variant: str, seed: int):
    from .api import PerturbedVAE

    m = dict(model_cfg)
    m.update(MODEL_VARIANTS[variant])
    t = dict(train_cfg, seed=int(seed))
    return PerturbedVAE(adata, split=split, model=m, train=t).fit()


def _fit_baseline(name: str, adata, split, seed: int):
    from .baselines import make_baseline

    b = make_baseline(name, seed=seed) if name == "linear" else make_baseline(name)
    return b.fit(adata, split)


def _unknown_note(vocab: set[str], cond: str) -> str:
    from .data import parse_condition

    miss = [g for g in parse_condition(cond) if g not in vocab]
    return (f"target(s) {', '.join(miss)} not in the model's training vocabulary; contributed no effect"
            if miss else "")


# ----------------------------------------------------------------------------- cells mode
#: a condition's top-DE genes are chosen on its training cells when it has at least this many
MIN_SELECT_CELLS = 10


@dataclass
class CellReference:
    """What every method is scored against in cells mode (positions index ``adata``):
    ``control_idx`` the held-out reference controls, ``score_idx[c]`` all held-out cells of
    condition c (scored by the all-gene and cell metrics), ``select_idx[c]`` the cells its
    top-DE genes were chosen on (vs the training controls ``train_control_idx``),
    ``top_score_idx[c]`` the cells the ``*_top20de`` metrics are scored on (disjoint from
    ``select_idx[c]``), ``select_source[c]`` which cells were used, ``top_de[c]`` the gene
    names (None when too few cells), ``observed[c]`` / ``observed_top[c]`` / ``control`` /
    ``train_control`` dense log-normalised cells, ``obs_delta[c]`` the observed change."""

    genes: list
    groups: dict
    control_idx: np.ndarray
    train_control_idx: np.ndarray
    score_idx: dict
    top_score_idx: dict
    select_idx: dict
    select_source: dict
    top_de: dict
    control: np.ndarray
    train_control: np.ndarray
    observed: dict
    observed_top: dict
    obs_delta: dict


def observed_reference(adata, split, n_top: int = N_TOP, min_select_cells: int = MIN_SELECT_CELLS
                       ) -> CellReference:
    """The observed side of the cells-mode protocol (module docstring, *Protocol*).

    Observed change of c = mean(held-out cells of c) - mean(held-out controls). Top-DE genes of
    c (scanpy t-test vs the training controls): on the training cells of c when it has at least
    ``min_select_cells`` of them (the top-20 metrics then score all held-out cells), else on a
    seeded half (``split.seed``) of its held-out cells, the top-20 metrics scoring the other half.
    """
    from . import data as D
    from .data.splits import heldout_control_idx
    from .metrics import DataError, top_de_genes

    if "lognorm" not in adata.layers:
        D.lognormalize(adata)
    L = adata.layers["lognorm"]
    cond = _conditions(adata)
    genes = [str(g) for g in adata.var_names]
    train_idx = np.asarray(split.train_idx)
    train_ctrl = train_idx[cond[train_idx] == D.CONTROL]
    if len(train_ctrl) == 0:
        raise BenchmarkError("no control cells among the training cells")
    ref_ctrl = heldout_control_idx(split, adata)
    if len(ref_ctrl) < 2:
        raise BenchmarkError(
            f"split {split.name!r} holds out {len(ref_ctrl)} control cell(s); observed changes are measured "
            "from held-out controls: set split.kwargs.control_test_fraction > 0 (default 0.5)")
    test_idx = np.asarray(split.test_idx)
    groups = {c: g for c, g in split.test_groups.items() if c != D.CONTROL and np.any(cond[test_idx] == c)}
    if not groups:
        raise BenchmarkError(f"split {split.name!r} holds out no perturbation condition; nothing to evaluate")
    rng = np.random.default_rng([int(split.seed), 15485863])
    ctrl_train_L = _dense(L[train_ctrl])
    score, top_score, select, source, top = {}, {}, {}, {}, {}
    for c in sorted(groups):
        score[c] = held = test_idx[cond[test_idx] == c]
        trained = train_idx[cond[train_idx] == c]
        if len(trained) >= min_select_cells:
            select[c], top_score[c], source[c] = trained, held, "training cells"
        else:
            perm = rng.permutation(held)
            k = len(held) // 2
            select[c], top_score[c] = np.sort(perm[:k]), np.sort(perm[k:])
            source[c] = "half of the held-out cells"
        try:
            top[c] = top_de_genes(_dense(L[select[c]]), ctrl_train_L, genes, n=n_top)
        except DataError as e:
            log.warning("condition %s: no top-DE genes (%s)", c, e)
            top[c] = None
    control = _dense(L[ref_ctrl])
    observed = {c: _dense(L[score[c]]) for c in groups}
    observed_top = {c: observed[c] if top_score[c] is score[c] else _dense(L[top_score[c]]) for c in groups}
    return CellReference(genes=genes, groups=groups, control_idx=ref_ctrl, train_control_idx=train_ctrl,
                         score_idx=score, top_score_idx=top_score, select_idx=select, select_source=source,
                         top_de=top, control=control, train_control=ctrl_train_L, observed=observed,
                         observed_top=observed_top,
                         obs_delta={c: observed[c].mean(0) - control.mean(0) for c in groups})


@dataclass
class ExternalPrediction:
    """Predicted cells of another tool (``benchmark.external`` entry ``name=path``):
    canonical ``condition`` per cell, ``genes`` (the file's), ``counts`` (None when the file
    holds only log-normalised values) and ``lognorm`` cells; ``expected_counts`` when the
    counts are not whole numbers (e.g. a model's NB means instead of sampled cells).
    :meth:`on_genes` puts them on the data's genes."""

    name: str
    path: str
    condition: np.ndarray
    genes: pd.Index
    counts: object | None
    lognorm: object | None
    expected_counts: bool = False

    def on_genes(self, genes) -> "ExternalPrediction":
        """The same predictions on ``genes`` (in that order), ``lognorm`` computed from the
        counts when there are counts; BenchmarkError when a gene is missing."""
        import scipy.sparse as sp

        from .utils import lognormalize

        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in self.genes]
        if missing:
            raise BenchmarkError(f"benchmark.external {self.name}: {len(missing)} of the data's {len(genes)} genes "
                                 f"are not in {self.path!r} var_names (e.g. {', '.join(missing[:5])})")
        cols = self.genes.get_indexer(genes)
        pick = lambda X: None if X is None else (sp.csr_matrix(X)[:, cols] if sp.issparse(X)  # noqa: E731
                                                  else np.asarray(X)[:, cols])
        counts = pick(self.counts)
        lognorm = lognormalize(counts) if counts is not None else pick(self.lognorm)
        return ExternalPrediction(self.name, self.path, self.condition, pd.Index(genes), counts, lognorm,
                                  self.expected_counts)

    def cells(self, condition: str, counts: bool = False):
        """This condition's predicted cells (log-normalised, or counts); None if it has none."""
        rows = np.flatnonzero(self.condition == condition)
        X = self.counts if counts else self.lognorm
        return None if X is None or not len(rows) else X[rows]


def _whole_numbers(X) -> bool:
    """True when every stored value of ``X`` (dense or sparse) is a whole number."""
    import scipy.sparse as sp

    v = X.data if sp.issparse(X) else np.asarray(X)
    return bool(np.all(v == np.round(v)))


def _looks_lognormalised(X) -> bool:
    """True when ``X`` holds non-integer values whose cells are ``log1p(counts/total*1e4)``
    (expm1 of every checked cell sums to 1e4)."""
    if min(X.shape) == 0 or _whole_numbers(X):
        return False
    rows = _dense(X[: min(X.shape[0], 100)])
    return bool(np.allclose(np.expm1(rows).sum(1), 1e4, rtol=1e-3))


def read_external(entries: Sequence[str] | None) -> list[ExternalPrediction]:
    """Parse and read ``benchmark.external`` (``NAME=path.h5ad`` each) before anything is fitted;
    BenchmarkError (one line) for a bad entry, a missing or unreadable file, no
    ``obs['condition']`` or no usable expression.

    Expression: ``layers['counts']``, else ``X``, as counts (log-normalised like every method);
    values that are already ``log1p(counts/total*1e4)`` (in ``X`` or ``layers['lognorm']``,
    e.g. the baselines' predictions) are used as they are.
    """
    import anndata as ad
    import scipy.sparse as sp

    from .data import format_condition, parse_condition

    out, names = [], set()
    for entry in entries or []:
        name, sep, path = str(entry).partition("=")
        name, path = name.strip(), path.strip()
        where = f"benchmark.external entry {str(entry)!r}"
        if not sep or not name or not path:
            raise BenchmarkError(f"{where}: expected NAME=path/pred.h5ad")
        if name in ALL_METHODS or name in names:
            raise BenchmarkError(f"{where}: method name {name!r} is already taken; choose another NAME")
        names.add(name)
        if not Path(path).is_file():
            raise BenchmarkError(f"{where}: file {path!r} does not exist")
        try:
            a = ad.read_h5ad(path)
        except Exception as e:  # any reader failure is the same problem for the user
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BenchmarkError(f"{where}: cannot read {path!r} as an .h5ad AnnData ({first})") from None
        if "condition" not in a.obs:
            raise BenchmarkError(f"{where}: {path!r} has no obs['condition'] column (columns: "
                                 f"{', '.join(map(str, a.obs.columns)) or 'none'}); expected canonical labels "
                                 "such as 'control', 'KLF1', 'KLF1+MAP2K6'")
        try:
            cond = np.array([format_condition(parse_condition(str(c))) for c in a.obs["condition"]])
        except Exception as e:
            raise BenchmarkError(f"{where}: unreadable condition label in {path!r} ({e})") from None
        counts = a.layers["counts"] if "counts" in a.layers else a.X
        lognorm = a.layers["lognorm"] if "lognorm" in a.layers else None
        if counts is not None and _looks_lognormalised(counts):
            counts, lognorm = None, counts
        if counts is not None:
            vals = counts.data if sp.issparse(counts) else np.asarray(counts)
            if not np.all(np.isfinite(vals)) or np.any(vals < 0):
                if lognorm is None:
                    raise BenchmarkError(f"{where}: {path!r} holds negative or non-finite values; expected "
                                         "counts in X or layers['counts'] (or layers['lognorm'])")
                counts = None
        if counts is None and lognorm is None:
            raise BenchmarkError(f"{where}: {path!r} has no expression (X is empty, no layers['counts'] "
                                 "or layers['lognorm'])")
        expected = counts is not None and not _whole_numbers(counts)
        if expected:
            log.warning("external %s: %s holds non-integer counts (expected values rather than sampled cells?): "
                        "its changes and Pearson deltas are comparable, its level and distribution metrics "
                        "(pseudobulk RMSE, energy distance, MMD) are not; give sampled counts for those",
                        name, path)
        log.info("external %s: %d predicted cells, %d conditions, %s, from %s", name, a.n_obs,
                 len(set(cond.tolist())), "counts" if counts is not None else "log-normalised values", path)
        out.append(ExternalPrediction(name, path, cond, pd.Index(a.var_names.astype(str)), counts, lognorm, expected))
    return out


def _missing_metrics(metrics: Sequence[str], reason: str) -> dict:
    from .metrics import MetricNote

    return {k: MetricNote(reason) for k in metrics}


def score_cells(method: str, pred: Mapping[str, np.ndarray | None], pred_control: np.ndarray,
                ref: CellReference, seed: int, notes: Mapping[str, str] | None = None,
                change_samples: Mapping[str, np.ndarray] | None = None, deltas: dict | None = None,
                on_condition=None, pred_means: Mapping[str, np.ndarray] | None = None,
                calibration=None) -> list[dict]:
    """Result rows of one method: for every held-out condition c, its predicted cells
    ``pred[c]`` (log-normalised; None: missing) against ``ref`` (module docstring,
    *Protocol*), its predicted change measured from ``pred_control`` (its own control
    prediction). ``change_samples[c]``: (draws of the change for ``ref.observed[c]``'s number
    of cells, draws for ``ref.observed_top[c]``'s) for the coverage metrics. ``pred_means[c]``
    (optional): the method's point prediction of c's mean profile when it is known better than
    from ``pred[c]`` (the model's posterior predictive mean, a baseline's exact mean);
    ``pred_control`` may then be that of the controls (one row). ``deltas`` (optional) receives the predicted changes.
    ``calibration``: the method's :class:`~pyro_pvae.metrics.IntervalCalibration` of its change samples."""
    from .metrics import evaluate_condition

    notes = dict(notes or {})
    ctrl_mean = pred_control.mean(0)
    rows = []
    for c in ref.groups:
        p = pred.get(c)
        if p is None or p.shape[0] == 0:
            metrics = _missing_metrics([m for m in CELL_METRICS if m not in INTERVAL_METRICS],
                                       f"{method}: no predicted cells for {c} (missing)")
        else:
            p = _dense(p)
            samples, top_samples = (change_samples or {}).get(c, (None, None))
            mean = None if pred_means is None else pred_means[c]
            m = evaluate_condition(p, ref.observed[c], ref.control, ref.genes, top_de=ref.top_de[c] or [],
                                   pred_change_samples=samples, seed=seed, pred_ctrl_mean=ctrl_mean,
                                   obs_top_lognorm=ref.observed_top[c], top_change_samples=top_samples,
                                   pred_mean=mean, calibration=calibration)
            metrics = {k: m[k] for k in CELL_METRICS if k in m}
            if deltas is not None:
                deltas[(method, c)] = (p.mean(0) if mean is None else mean) - ctrl_mean
        rows.append({"method": method, "condition": c, "group": ref.groups[c], "seed": seed,
                     "note": notes.get(c, ""), "metrics": metrics})
        if on_condition:
            on_condition()
    return rows


def cell_benchmark(adata, split, methods: Sequence[str], model_cfg: dict, train_cfg: dict,
                   seeds: int = 1, n_pred_cells: int = 200, n_change_draws: int = 50,
                   keep_deltas: bool = True, external: Sequence[ExternalPrediction] = (),
                   n_mean_cells: int = 4000, calibrate: str = "cross_fit"):
    """Cell-level benchmark (module docstring, *Protocol*). Returns (long results frame,
    extras) where extras holds ``timings`` (list of dicts), ``deltas`` {(method, condition):
    predicted change, seed 0}, ``obs_delta`` {condition: observed change}, ``top_de``
    {condition: gene positions}, ``reference`` (the :class:`CellReference`), ``missing``
    {external name: conditions it lacks}."""
    from . import data as D
    from .metrics import results_frame

    D.lognormalize(adata)  # the scale the model predicts on; recomputed from counts
    external = [e.on_genes(adata.var_names) for e in external]
    ref = observed_reference(adata, split)
    conds = list(ref.groups)
    rows, timings, deltas, shrink, calibrations = [], [], {}, None, []
    bar = _progress((seeds * len(methods) + len(external)) * len(conds), "benchmark")
    for seed in range(seeds):
        for method in methods:
            bar.set_description(f"seed {seed} {method}: fit")
            t0 = time.perf_counter()
            samples = means = calibration = None
            if method in MODEL_VARIANTS:
                vae = _fit_model(adata, split, model_cfg, train_cfg, method, seed)
                t_fit = time.perf_counter() - t0
                vocab = set(vae.vocabulary)
                # cells for the distribution metrics; the point prediction (posterior predictive
                # mean, of the conditions and of the controls) from n_mean_cells cells each
                pred = vae.predict(conds, n_cells=n_pred_cells, seed=seed, unknown="ignore", n_draws=n_change_draws)
                profiles = vae.predict_mean(conds + [D.CONTROL], n_cells=n_mean_cells, n_draws=n_change_draws,
                                            seed=seed + 7777, unknown="ignore")
                pred_control = profiles.loc[[D.CONTROL]].to_numpy()
                means = {c: profiles.loc[c].to_numpy() for c in conds}
                notes = {c: _unknown_note(vocab, c) for c in conds}
                # observed change = mean of n held-out cells - mean of the held-out controls (one
                # reference for every condition): draws with both sampling noises, one predicted
                # control block per draw shared by the conditions like the reference
                sizes = {c: list(dict.fromkeys([len(ref.observed[c]), len(ref.observed_top[c])])) for c in conds}
                draws = vae.predict_change_draws(sizes, n_draws=n_change_draws, seed=seed * 100003, unknown="ignore",
                                                 n_control_cells=len(ref.control))
                samples = {c: (draws[c][0], draws[c][-1]) for c in conds}
                if calibrate != "off" and n_change_draws >= 2:
                    calibration = vae.calibrate_intervals(n_draws=n_change_draws, seed=seed * 100003 + 1,
                                                          cross_fit=calibrate == "cross_fit")
                    calibrations.append({"seed": seed, "mode": calibrate,
                                         **(calibration.to_dict() if calibration else {})})
            else:
                b = _fit_baseline(method, adata, split, seed)
                t_fit = time.perf_counter() - t0
                if method == "additive_shrink":
                    shrink = (b.c_, len(b.shrink_doubles_))
                pred = b.predict(conds, n_cells=n_pred_cells, seed=seed)  # for the distribution metrics
                # the point prediction is exact: the mean of the training controls the baseline was
                # fitted on + its change (the mean of the resampled cells above would add the
                # resampling noise of n_pred_cells); score_cells subtracts that same row, so
                # control_mean's change is exactly 0
                pred_control = ref.train_control.mean(0, keepdims=True)
                means = {c: pred_control[0] + b.predict_change(c) for c in conds}
                notes = dict(b.notes)
            pcond = _conditions(pred)
            PL = pred.layers["lognorm"]
            bar.set_description(f"seed {seed} {method}: evaluate")
            rows += score_cells(method, {c: PL[pcond == c] for c in conds}, pred_control, ref, seed, notes,
                                samples, deltas if keep_deltas and seed == 0 else None, lambda: bar.update(1),
                                pred_means=means, calibration=calibration)
            timings.append({"method": method, "seed": seed, "fit_seconds": t_fit,
                            "total_seconds": time.perf_counter() - t0})
            log.info("seed %d %s: fit %.1f s, fit+evaluate %.1f s", seed, method, t_fit,
                     time.perf_counter() - t0)
    missing = {}
    for ext in external:
        bar.set_description(f"{ext.name}: evaluate")
        own = ext.cells(D.CONTROL)
        pred_control = ref.train_control if own is None else _dense(own)
        pred = {c: ext.cells(c) for c in conds}
        missing[ext.name] = [c for c in conds if pred[c] is None]
        note = "" if own is not None else f"{ext.name}: no 'control' cells in the file; change measured from the training controls"
        rows += score_cells(ext.name, pred, pred_control, ref, 0, {c: note for c in conds}, None,
                            deltas if keep_deltas else None, lambda: bar.update(1))
    bar.close()
    df = results_frame(rows)
    gpos = {g: i for i, g in enumerate(ref.genes)}
    de_pos = {c: ([gpos[g] for g in ref.top_de[c]] if ref.top_de[c] else []) for c in conds}
    return df, {"timings": timings, "deltas": deltas, "obs_delta": ref.obs_delta, "top_de": de_pos,
                "n_obs": {c: len(ref.observed[c]) for c in conds}, "n_control": len(ref.control_idx),
                "n_train_control": len(ref.train_control_idx), "shrink": shrink, "reference": ref,
                "missing": missing, "external": {e.name: e.path for e in external},
                "protocol": protocol_lines(ref, external), "calibrations": calibrations}


def protocol_lines(ref: CellReference, external: Sequence[ExternalPrediction] = ()) -> list[str]:
    """The cells-mode protocol in words, with this run's numbers (for summary.md)."""
    src = pd.Series(ref.select_source).value_counts()
    n_score = [len(v) for v in ref.observed.values()]
    lines = [
        f"- Observed change of a held-out condition = mean of its held-out cells - mean of the {len(ref.control_idx)} "
        f"held-out control cells (never used in training; {len(ref.train_control_idx)} training controls).",
        "- Predicted change = the method's point prediction of the condition's mean - that of its own control "
        "prediction: the model's posterior predictive means of the condition and of its predicted control cells "
        "(same reference cells as starting points, moved to control); a baseline's exact change from the training "
        "controls it was fitted on; an external file's mean of its cells minus that of its 'control' cells (else "
        "the training controls). No control mean is shared between the observed and any predicted change.",
        f"- Top-{N_TOP} DE genes (t-test vs the training controls) on cells the top-{N_TOP} metrics do not score: "
        + "; ".join(f"{n} condition(s) on {s}" for s, n in src.items())
        + f" (training cells when a condition has >= {MIN_SELECT_CELLS}; otherwise a seeded half of its held-out "
        f"cells, the *_top20de metrics scoring the other half). The all-gene and cell metrics score all held-out "
        f"cells: {min(n_score)}-{max(n_score)} per condition.",
        "- coverage90_all / coverage90_top20de: share of genes (all / top-DE) whose observed change lies in the "
        "central 90% of the model's posterior-predictive draws of the change, each draw of as many cells as "
        "the observed change it is compared with.",
    ]
    for e in external:
        lines.append(f"- external `{e.name}`: predicted cells from `{e.path}`, scored like the built-in methods "
                     "(seed 0 only)." + (" Its counts are not whole numbers (expected values, not sampled cells): "
                                         "its changes are comparable, its pseudobulk and distribution metrics "
                                         "(pseudobulk RMSE, energy distance, MMD) are not." if e.expected_counts else ""))
    return lines


INTERVAL_METRICS = ("coverage90_all", "coverage90_top20de", "coverage90_all_uncalibrated",
                    "coverage90_top20de_uncalibrated", "width90_all", "width90_top20de",
                    "width90_all_uncalibrated", "width90_top20de_uncalibrated")


# ----------------------------------------------------------------------------- effects mode
def score_effects(pred_change, true_change, n_top: int = N_TOP, change_samples=None, observed_change=None,
                  select_change=None, calibration=None) -> dict:
    """Scores of one condition's predicted change against the real change (log1p-CPM scale):
    ``delta_rmse_all``, ``pearson_delta_all``, ``pearson_delta_top20de`` (the ``n_top`` genes
    with the largest ``|select_change|``: the benchmark passes the held-out simulated cells'
    observed change, so the genes are not chosen on the scored target; default ``true_change``);
    with ``change_samples`` (draws x genes) also ``coverage90_all`` and ``coverage90_top20de``
    (and the mean widths of those intervals, ``width90_*``),
    and with ``observed_change`` (the held-out simulated cells' own change)
    ``coverage90_all_observed``: the calibration of the predictive draws for the data they
    predict, without the simulator's closure gap. ``calibration``: an
    :class:`~pyro_pvae.metrics.IntervalCalibration` applied to the draws first (the raw draws'
    coverage is then reported as ``coverage90_*_uncalibrated``)."""
    from .metrics import coverage, interval_width, pearson, rmse

    p, t = np.asarray(pred_change, float).ravel(), np.asarray(true_change, float).ravel()
    top = top_genes(t if select_change is None else select_change, n_top)
    out = {"delta_rmse_all": rmse(p, t), "pearson_delta_all": pearson(p, t),
           "pearson_delta_top20de": pearson(p[top], t[top])}
    if change_samples is not None:
        raw = np.asarray(change_samples, float)
        versions = {"": raw} if calibration is None else {"": calibration.apply(raw), "_uncalibrated": raw}
        for suffix, draws in versions.items():
            out["coverage90_all" + suffix] = coverage(draws, t, 0.9)
            out["coverage90_top20de" + suffix] = coverage(draws[:, top], t[top], 0.9)
            out["width90_all" + suffix] = interval_width(draws, 0.9)
            out["width90_top20de" + suffix] = interval_width(draws[:, top], 0.9)
            if observed_change is not None:
                out["coverage90_all_observed" + suffix] = coverage(draws, np.asarray(observed_change, float).ravel(),
                                                                   0.9)
    return out


def top_genes(change, n_top: int = N_TOP) -> np.ndarray:
    """The ``n_top`` genes with the largest ``|change|`` (ties: the first)."""
    return np.argsort(-np.abs(np.asarray(change, float).ravel()), kind="stable")[:n_top]


def model_changes(vae, conds, n_cells: int, n_draws: int, seed: int) -> dict[str, np.ndarray]:
    """The model's point prediction of each condition's pseudobulk log1p(CPM) change: the
    pseudobulk of its predicted cells minus that of its own predicted control cells
    (:meth:`PerturbedVAE.predict_mean`, ``n_cells`` of each spread over ``n_draws`` posterior
    draws, the same starting cells for all)."""
    from . import data as D

    prof = vae.predict_mean(list(conds) + [D.CONTROL], n_cells=n_cells, n_draws=n_draws, seed=seed + 7777,
                            unknown="ignore", scale="pseudobulk")
    return {c: prof.loc[c].to_numpy(np.float64) - prof.loc[D.CONTROL].to_numpy(np.float64) for c in conds}


def effects_change_draws(vae, condition: str, n_draws: int, n_cells: int, seed: int) -> np.ndarray:
    """``n_draws`` x genes posterior-predictive draws of the pseudobulk log1p(CPM) change of
    ``n_cells`` predicted cells of ``condition`` from as many predicted control cells; each
    draw is one posterior draw of the globals (``predict`` draws one per listed condition) and
    the same seed for both calls, so the condition and control blocks start alike."""
    from . import data as D

    pc = vae.predict([condition] * n_draws, n_cells=n_cells, seed=seed, unknown="ignore").X
    p0 = vae.predict([D.CONTROL] * n_draws, n_cells=n_cells, seed=seed).X
    blocks = [slice(k * n_cells, (k + 1) * n_cells) for k in range(n_draws)]
    return np.stack([pseudobulk_log1p_cpm(pc[b]) - pseudobulk_log1p_cpm(p0[b]) for b in blocks])


def effects_calibration(vae, n_draws: int, seed: int, min_cells: int = 20, cross_fit: bool = True):
    """:meth:`PerturbedVAE.calibrate_intervals` on the effects scale: each training double
    (at least ``min_cells`` training cells; with ``cross_fit`` those a refitted copy never saw)
    predicted as unseen by :func:`effects_change_draws` and scored as there
    (:meth:`PerturbedVAE.calibrate_on_pairs`), on the pseudobulk log1p(CPM) change from the
    training controls. None without such doubles."""
    if n_draws < 2:
        return None
    X = vae.adata.X

    def changes(groups):
        ctrl = pseudobulk_log1p_cpm(X[np.sort(vae.control_idx)])
        return [pseudobulk_log1p_cpm(X[np.sort(g)]) - ctrl for g in groups]

    def draws(source, cells):
        return [effects_change_draws(source, c, n_draws, n, seed + i) for i, (c, n) in enumerate(cells.items())]

    return vae.calibrate_on_pairs(changes, draws, seed, min_cells=min_cells, cross_fit=cross_fit)


def pseudobulk_adata(adata, idx) -> "object":
    """One row per condition among cells ``idx``: ``layers['lognorm']`` = pseudobulk
    log1p(CPM) of the condition's summed counts (the scale of the Norman effects file)."""
    import anndata as ad

    cond = _conditions(adata)[np.asarray(idx)]
    labels = list(dict.fromkeys(cond.tolist()))
    Xs = adata.X[np.asarray(idx)]
    prof = np.vstack([pseudobulk_log1p_cpm(Xs[np.flatnonzero(cond == c)]) for c in labels]).astype(np.float64)
    out = ad.AnnData(obs=pd.DataFrame({"condition": labels}, index=[f"pb{i}" for i in range(len(labels))]),
                     var=pd.DataFrame(index=adata.var_names.astype(str)))
    out.layers["lognorm"] = prof
    return out


def effects_benchmark(adata, split, methods: Sequence[str], model_cfg: dict | None = None,
                      train_cfg: dict | None = None, seeds: int = 1, n_mean_cells: int = 4000,
                      n_change_draws: int = 50, external: Sequence[ExternalPrediction] = (),
                      calibrate: str = "cross_fit"):
    """Semi-synthetic Norman-effects benchmark (see module docstring). Returns (frame, extras).
    ``n_mean_cells``: predicted cells (and as many predicted controls) behind the model's change.
    ``calibrate``: the model's change draws are stretched by :func:`effects_calibration`."""
    from . import data as D
    from .metrics import results_frame

    external = [e.on_genes(adata.var_names) for e in external]
    truth = adata.uns.get("truth", {})
    if "true_delta_log1p_cpm" not in truth:
        raise BenchmarkError("effects scoring needs uns['truth']['true_delta_log1p_cpm'] "
                             "(data from simulate.simulate_norman_effects, data.source=norman_effects)")
    labels = [str(c) for c in np.asarray(truth["conditions"])]
    true = np.asarray(truth["true_delta_log1p_cpm"], dtype=np.float64)
    true_of = {c: true[i] for i, c in enumerate(labels)}
    cond = _conditions(adata)
    groups = {c: g for c, g in split.test_groups.items() if c in true_of}
    conds = list(groups)
    if not conds:
        raise BenchmarkError("no held-out condition has a real change in the truth; check the split")
    train_idx = np.asarray(split.train_idx)
    if not np.any(cond[train_idx] == D.CONTROL):
        raise BenchmarkError("no control cells among the training cells")
    pb = pseudobulk_adata(adata, train_idx)
    # noise floor: the observed held-out cells' own pseudobulk change (from the held-out
    # controls, else the training ones) vs the real change
    from .data.splits import heldout_control_idx

    test_idx = np.asarray(split.test_idx)
    ref_ctrl = heldout_control_idx(split, adata)
    ctrl_pb = pseudobulk_log1p_cpm(adata.X[ref_ctrl if len(ref_ctrl) >= 2
                                           else train_idx[cond[train_idx] == D.CONTROL]])
    n_held = {c: int(np.sum(cond[test_idx] == c)) for c in conds}
    observed = {c: pseudobulk_log1p_cpm(adata.X[test_idx[cond[test_idx] == c]]) - ctrl_pb for c in conds}
    floor = {c: score_effects(observed[c], true_of[c])["delta_rmse_all"] for c in conds}
    # context: the plain sum of the REAL single changes (no sampling noise at all)
    from .data import parse_condition

    gap = {}
    if "realized_delta_log1p_cpm" in truth:
        real = np.asarray(truth["realized_delta_log1p_cpm"], dtype=np.float64)
        gap = {c: float(np.sqrt(np.mean((real[labels.index(c)] - true_of[c]) ** 2))) for c in conds}
    oracle = {c: score_effects(sum(true_of[t] for t in parse_condition(c)), true_of[c])["delta_rmse_all"]
              for c in conds if len(parse_condition(c)) >= 2 and all(t in true_of for t in parse_condition(c))}
    rows, timings, deltas, shrink, calibrations = [], [], {}, None, []
    bar = _progress(seeds * len(methods) * len(conds), "benchmark")
    for seed in range(seeds):
        for method in methods:
            bar.set_description(f"seed {seed} {method}: fit")
            t0 = time.perf_counter()
            draws, calibration = {}, None
            if method in MODEL_VARIANTS:
                vae = _fit_model(adata, split, model_cfg or {}, train_cfg or {}, method, seed)
                t_fit = time.perf_counter() - t0
                vocab = set(vae.vocabulary)
                notes = {c: _unknown_note(vocab, c) for c in conds}
                change = model_changes(vae, conds, n_mean_cells, n_change_draws, seed)
                if n_change_draws >= 2:
                    draws = {c: effects_change_draws(vae, c, n_change_draws, max(n_held[c], 2), seed * 100003 + i)
                             for i, c in enumerate(conds)}
                    if calibrate != "off":
                        calibration = effects_calibration(vae, n_change_draws, seed * 100003 + 50000,
                                                          cross_fit=calibrate == "cross_fit")
                        calibrations.append({"seed": seed, "mode": calibrate,
                                             **(calibration.to_dict() if calibration else {})})
            else:
                b = _fit_baseline(method, pb, None, seed)
                t_fit = time.perf_counter() - t0
                if method == "additive_shrink":
                    shrink = (b.c_, len(b.shrink_doubles_))
                change = {c: b.predict_change(c) for c in conds}
                notes = dict(b.notes)
            for c in conds:
                rows.append({"method": method, "condition": c, "group": groups[c], "seed": seed,
                             "note": notes.get(c, ""),
                             "metrics": score_effects(change[c], true_of[c], change_samples=draws.get(c),
                                                      observed_change=observed[c] if c in draws else None,
                                                      select_change=observed[c], calibration=calibration)})
                if seed == 0:
                    deltas[(method, c)] = change[c]
                bar.update(1)
            timings.append({"method": method, "seed": seed, "fit_seconds": t_fit,
                            "total_seconds": time.perf_counter() - t0})
            log.info("seed %d %s: fit %.1f s, total %.1f s", seed, method, t_fit, time.perf_counter() - t0)
    bar.close()
    missing = {}
    for ext in external:  # the model's recipe: pseudobulk of predicted counts minus predicted control
        own = ext.cells(D.CONTROL, counts=True)
        base = pseudobulk_log1p_cpm(own) if own is not None else pseudobulk_log1p_cpm(
            adata.X[train_idx[cond[train_idx] == D.CONTROL]])
        missing[ext.name] = [c for c in conds if ext.cells(c) is None]
        for c in conds:
            x = ext.cells(c, counts=True)
            if ext.counts is None:
                m = _missing_metrics(EFFECT_METRICS[:3], f"{ext.name}: effects scoring needs predicted counts; "
                                                     "the file holds log-normalised values only")
            elif x is None:
                m = _missing_metrics(EFFECT_METRICS[:3], f"{ext.name}: no predicted cells for {c} (missing)")
            else:
                m = score_effects(pseudobulk_log1p_cpm(x) - base, true_of[c], select_change=observed[c])
                deltas[(ext.name, c)] = pseudobulk_log1p_cpm(x) - base
            note = "" if own is not None else f"{ext.name}: no 'control' cells; change from the training controls"
            rows.append({"method": ext.name, "condition": c, "group": groups[c], "seed": 0, "note": note,
                         "metrics": m})
    df = results_frame(rows)
    top = {c: list(top_genes(observed[c])) for c in conds}
    return df, {"timings": timings, "deltas": deltas, "obs_delta": {c: true_of[c] for c in conds},
                "top_de": top, "noise_floor": floor, "shrink": shrink,
                "oracle_additive": oracle, "closure_gap": gap, "missing": missing,
                "external": {e.name: e.path for e in external}, "calibrations": calibrations}


# ----------------------------------------------------------------------------- summary
def _fmt(x, digits=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ms(mean, sd, digits=4) -> str:
    return _fmt(mean, digits) + ("" if sd is None or (isinstance(sd, float) and math.isnan(sd))
                                 else f" ± {_fmt(sd, digits)}")


def _table(df: pd.DataFrame, methods: Sequence[str], metrics: Sequence[str], digits=4) -> list[str]:
    from .metrics import summarize

    s = summarize(df)
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for m in methods:
        cells = []
        for met in metrics:
            r = s[(s["method"] == m) & (s["metric"] == met)]
            cells.append("" if r.empty else _ms(float(r["mean"].iloc[0]), float(r["sd"].iloc[0]), digits))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _per_condition_table(df: pd.DataFrame, methods, metric: str, conds, digits=4) -> list[str]:
    d = df[df["metric"] == metric]
    lines = ["| condition | group | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    skipped = 0
    for c in conds:
        dc = d[d["condition"] == c]
        if dc.empty:
            continue
        if dc["value"].notna().sum() == 0:
            skipped += 1
            continue
        cells = []
        for m in methods:
            v = dc[dc["method"] == m]["value"]
            if v.empty:
                cells.append("")
            elif v.notna().sum() == 0:
                cells.append("n/a")
            else:
                sd = float(v.std(ddof=1)) if v.notna().sum() > 1 else math.nan
                cells.append(_ms(float(v.mean()), sd, digits))
        lines.append(f"| {c} | {dc['group'].iloc[0]} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"({skipped} condition(s) left out: {metric} undefined for every method; reason in "
                      "the `note` column of results.csv.)"]
    return lines


def summary_text(df: pd.DataFrame, config_name: str, header: Sequence[str], mode: str,
                 extras: Mapping | None = None, max_condition_rows: int = 60) -> str:
    """summary.md: per-group tables, per-condition tables, reference rows (norman/replogle)."""
    extras = dict(extras or {})
    methods = list(dict.fromkeys(df["method"]))
    metric_order = CELL_METRICS if mode == "cells" else EFFECT_METRICS
    metrics = [m for m in metric_order if m in set(df["metric"])]
    n_seeds = df["seed"].nunique()
    lines = [f"# Benchmark: config `{config_name}`", "", *header, ""]
    if extras.get("protocol"):
        lines += ["## Protocol", "", *extras["protocol"], ""]
    for name, miss in (extras.get("missing") or {}).items():
        if miss:
            lines += [f"**Missing predictions**: `{name}` has no predicted cells for {len(miss)} of the "
                      f"{df['condition'].nunique()} held-out conditions ({', '.join(miss[:20])}"
                      f"{', ...' if len(miss) > 20 else ''}); its averages are over the other conditions "
                      "(a note on each of these rows in results.csv).", ""]
    cond_groups = df.drop_duplicates("condition").set_index("condition")["group"]
    counts = cond_groups.value_counts()
    small = [g for g in GROUPS if 0 < counts.get(g, 0) < 10]
    lines += ["Held-out conditions per group: " + ", ".join(f"{g} {counts.get(g, 0)}" for g in GROUPS
                                                          if counts.get(g, 0)) + ".",
              f"Values: mean ± sd over {n_seeds} seed(s) of the per-seed average over the group's conditions "
              "(sd blank with one seed). n/a: undefined for every condition (reason in the `note` column "
              "of results.csv)."]
    if small:
        lines += ["", f"**Small evaluation set**: group(s) {', '.join(small)} have fewer than 10 conditions, so "
                      "a group mean rests on a handful of conditions; read the per-condition tables and the "
                      "spread over seeds below, not just the means."]
    notes = df.loc[df["note"].astype(str) != "", ["method", "metric", "note"]]
    if not notes.empty:
        common = notes.groupby("note").size().sort_values(ascending=False).head(5)
        lines += ["", "Notes in results.csv (most frequent):"] + [f"- {n} ({k} rows)" for n, k in common.items()]
    for g in GROUPS:
        dg = df[df["group"] == g]
        if dg.empty:
            continue
        lines += ["", f"## Group `{g}` ({dg['condition'].nunique()} conditions)", ""]
        lines += _table(dg, methods, metrics)
    nd = df[df["group"] != "single"]
    if not nd.empty and nd["group"].nunique() > 1:
        lines += ["", f"## All held-out combinations ({nd['condition'].nunique()} conditions)", ""]
        lines += _table(nd, methods, metrics)
    cals = [c for c in extras.get("calibrations") or [] if "k" in c]
    if cals:
        how = ("by a copy of the model refitted without up to half of the training doubles (seeded, among those "
               "whose targets are also trained in another condition; one more fit per seed), on those, which it "
               "never saw" if cals[0].get("mode") == "cross_fit" else
               "on the training doubles predicted as if unseen (their own interaction drawn from the fitted prior; "
               "they also shaped the fit, so this is optimistic)")
        lines += ["", "Interval calibration (model rows): coverage90_* are the model's intervals stretched about "
                      "their mean by s_g = max(1, k sqrt(1 + (gamma |m_g| / h_g)^2)) (pyro_pvae.metrics.IntervalCalibration; "
                      f"only widened, never narrowed), fitted {how}, each pair scored on half of its training cells "
                      "with its top-20 DE genes chosen on the other half (the t-test the benchmark uses); "
                      "coverage90_*_uncalibrated are the raw "
                      "intervals. Per seed:", "",
                  "| seed | training pairs | k | gamma | their coverage, all genes (raw -> calibrated) | "
                  "top-20 genes (chosen on the other half of their cells) |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['seed']} | {c['n_conditions']} | {c['k']:.2f} | {c['gamma']:.2f} | "
                  f"{c['coverage_before']:.2f} -> {c['coverage_after']:.2f} | "
                  f"{c['coverage_top_before']:.2f} -> {c['coverage_top_after']:.2f} |" for c in cals]
    elif extras.get("calibrations"):
        lines += ["", "Interval calibration: no training double with enough cells; the model's intervals are raw."]
    if "noise_floor" in extras and extras["noise_floor"]:
        fl = np.array(list(extras["noise_floor"].values()), float)
        lines += ["", "Noise floor (not a method): the held-out *observed* cells' own pseudobulk change vs the real "
                      f"change, delta_rmse_all = {fl.mean():.4f} (mean over the held-out conditions): the sampling noise "
                      "of a pseudobulk log1p(CPM) change estimated from this many simulated cells at this depth. "
                      "Estimates from training cells (the singles the additive baseline sums) carry noise of the "
                      "same size; methods that shrink towards no change can score below it."]
    if extras.get("closure_gap"):
        g = np.array(list(extras["closure_gap"].values()), float)
        lines += ["", "Simulator closure gap (not a method): RMSE between the changes the simulated cells realise "
                      "(uns['truth']['realized_delta_log1p_cpm'], after renormalising each condition to 1e6 CPM over "
                      f"the panel) and the real changes: mean {g.mean():.4f}, max {g.max():.4f} over the held-out "
                      "conditions; part of every method's error comes from it."]
    if extras.get("oracle_additive"):
        o = np.array(list(extras["oracle_additive"].values()), float)
        lines += ["", "Context (not a method): the plain sum of the two REAL single changes (the file's values, no "
                      f"sampling noise) scores delta_rmse_all = {o.mean():.4f} on these {len(o)} held-out doubles "
                      "(0.448 on all 126 complete doubles). The additive baseline above uses the singles' changes "
                      "estimated from the simulated training cells instead, so it also carries their sampling noise."]
    if extras.get("shrink"):
        c, n = extras["shrink"]
        lines += ["", f"additive_shrink: global factor {c:.3f}, fitted on {n} training double(s) "
                      "(the sum of the singles' changes times this factor)."]
    conds = list(dict.fromkeys(df.sort_values(["group", "condition"])["condition"]))
    key_metrics = ([m for m in ("pearson_delta_all", "pseudobulk_rmse_all", "nrmse", "coverage90_all",
                                "coverage90_top20de") if m in metrics] if mode == "cells" else metrics)
    lines += ["", "## Per condition", ""]
    if len(conds) > max_condition_rows:
        lines += [f"{len(conds)} conditions: the per-condition values are in results.csv "
                  f"(tables below show the first {max_condition_rows})."]
        conds = conds[:max_condition_rows]
    for met in key_metrics:
        lines += ["", f"### {met}", ""] + _per_condition_table(df, methods, met, conds)
    tim = extras.get("timings")
    if tim:
        t = pd.DataFrame(tim).groupby("method", sort=False)[["fit_seconds", "total_seconds"]].mean()
        lines += ["", "## Wall time (seconds, mean over seeds)", "", "| method | fit | fit + evaluate |",
                  "|---|---|---|"] + [f"| {m} | {r.fit_seconds:.1f} | {r.total_seconds:.1f} |"
                                      for m, r in t.iterrows()]
    ref = REFERENCE_ROWS.get(config_name, [])
    if ref:
        lines += ["", "## Reference: published, different data version", "",
                  "Reported in the literature on the full data set and its own protocol and split; NOT measured "
                  "here and not directly comparable with the tables above.", "",
                  "| method | metric | value | setting | source |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['metric']} | {_fmt(float(r['value']))} | {r['setting']} | {_SRC} |"
                  for r in ref]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def make_plots(df: pd.DataFrame, extras: Mapping, run_dir: Path, mode: str, n_conditions: int = 4) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    methods = set(df["method"])
    ref = "additive" if "additive" in methods else None
    model = next((m for m in MODEL_VARIANTS if m in methods), None)
    colors = {"single": "tab:blue", "seen0": "tab:red", "seen1": "tab:orange", "seen2": "tab:green"}
    if model and ref:
        metrics = (("pearson_delta_all", "pseudobulk_rmse_all") if mode == "cells"
                   else ("pearson_delta_all", "delta_rmse_all"))
        per = df[df["metric"].isin(metrics)].groupby(["method", "condition", "group", "metric"],
                                                     as_index=False)["value"].mean()
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.6))
        for ax, met in zip(np.atleast_1d(axes), metrics):
            a = per[(per.metric == met) & (per.method == ref)].set_index("condition")
            b = per[(per.metric == met) & (per.method == model)].set_index("condition")
            common = a.index.intersection(b.index)
            for g in GROUPS:
                sel = [c for c in common if a.loc[c, "group"] == g]
                if sel:
                    ax.scatter(a.loc[sel, "value"], b.loc[sel, "value"], s=18, alpha=0.8,
                               color=colors[g], label=f"{g} ({len(sel)})")
            vals = np.concatenate([a.loc[common, "value"].to_numpy(float), b.loc[common, "value"].to_numpy(float)])
            vals = vals[np.isfinite(vals)]
            if len(vals):
                lo, hi = vals.min(), vals.max()
                pad = 0.05 * (hi - lo + 1e-9)
                ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
            if len(common) <= 12:
                for c in common:
                    ax.annotate(c, (a.loc[c, "value"], b.loc[c, "value"]), fontsize=6)
            ax.set_xlabel(f"{ref}: {met}")
            ax.set_ylabel(f"{model}: {met}")
            ax.set_title(f"{met} per held-out condition")
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = run_dir / "scatter_model_vs_additive.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        out.append(p)
    deltas, obs_delta, top = extras.get("deltas", {}), extras.get("obs_delta", {}), extras.get("top_de", {})
    conds = [c for c in obs_delta if len(top.get(c, []))]
    conds = sorted(conds, key=lambda c: (-c.count("+"), c))[:n_conditions]
    show = [m for m in (model, ref, "additive_shrink") if m and m in methods]
    if conds and show:
        fig, axes = plt.subplots(1, len(conds), figsize=(4.2 * len(conds), 4.0), squeeze=False)
        for ax, c in zip(axes[0], conds):
            idx = np.asarray(top[c], int)
            o = np.asarray(obs_delta[c])[idx]
            for m, mk in zip(show, ("o", "s", "^")):
                if (m, c) in deltas:
                    ax.scatter(o, np.asarray(deltas[(m, c)])[idx], s=16, marker=mk, alpha=0.8, label=m)
            lo, hi = float(o.min()), float(o.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.axhline(0, color="grey", lw=0.4)
            ax.axvline(0, color="grey", lw=0.4)
            ax.set_title(c, fontsize=9)
            ax.set_xlabel("observed change" if mode == "cells" else "real change (log1p CPM)")
            ax.set_ylabel("predicted change")
            ax.legend(fontsize=6)
        fig.suptitle(f"top-{N_TOP} DE genes, seed 0")
        fig.tight_layout()
        p = run_dir / "pred_vs_obs_top_genes.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        out.append(p)
    return out


# ----------------------------------------------------------------------------- command
def run(name: str, overrides: Sequence[str]):
    from omegaconf import OmegaConf

    from .config import compose, load_dataset, resolve_split
    from .rundir import claim_run_dir
    from .utils import atomic_write_csv, atomic_write_text

    t_start = time.perf_counter()
    overrides = list(overrides)
    cfg = compose(name, hydra_overrides(overrides))
    b = cfg.get("benchmark") or {}
    methods = parse_methods(b.get("methods"))
    seeds = int(b.get("seeds", 1))
    if seeds < 1:
        raise BenchmarkError(f"benchmark.seeds must be >= 1, got {seeds}")
    n_pred = int(b.get("n_pred_cells", 200))
    if n_pred < 2:
        raise BenchmarkError(f"benchmark.n_pred_cells must be >= 2, got {n_pred}")
    n_draws = int(b.get("n_change_draws", 50))
    n_mean = int(b.get("n_mean_cells", 4000))
    if n_mean < 2:
        raise BenchmarkError(f"benchmark.n_mean_cells must be >= 2, got {n_mean}")
    external = read_external(b.get("external"))  # a bad file fails here, before any fit
    threads = b.get("torch_threads")
    if threads:
        import torch

        # small models on a shared CPU: one intra-op thread is ~10x faster than thrashing
        # OpenMP threads against other processes (measured on the 2-core dev box)
        torch.set_num_threads(int(threads))
    if cfg.split.name == "none":
        raise BenchmarkError("split.name=none has no held-out conditions; the benchmark needs a split")
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    # claimed only once the data and split are known to load; a failure before results.csv
    # exists removes what the run wrote (pyro_pvae/rundir.py)
    with claim_run_dir(cfg, "benchmark") as run_dir_claim:
        run_dir = run_dir_claim.path
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        split.to_json(run_dir / "split.json")
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        train_cfg = train_settings(cfg, overrides)
        effects_mode = cfg.data.source == "norman_effects" and not cfg.data.path
        mode = "effects" if effects_mode else "cells"
        log.info("benchmark (%s mode): methods %s, %d seed(s), %d predicted cells per condition (model point "
                 "prediction from %d), %d epochs", mode, ", ".join(methods), seeds, n_pred, n_mean,
                 train_cfg.get("epochs", -1))
        if effects_mode:
            df, extras = effects_benchmark(adata, split, methods, model_cfg, train_cfg, seeds, n_mean, n_draws,
                                           external=external, calibrate=cfg.benchmark.calibrate_intervals)
        else:
            df, extras = cell_benchmark(adata, split, methods, model_cfg, train_cfg, seeds, n_pred, n_draws,
                                        external=external, n_mean_cells=n_mean,
                                        calibrate=cfg.benchmark.calibrate_intervals)
        df = df[RESULT_COLUMNS]
        atomic_write_csv(run_dir / "results.csv", df)
        if extras.get("timings"):
            atomic_write_csv(run_dir / "timings.csv", pd.DataFrame(extras["timings"]))
        if any("k" in c for c in extras.get("calibrations") or []):
            atomic_write_csv(run_dir / "calibration.csv", pd.DataFrame([c for c in extras["calibrations"] if "k" in c]))
        wall = time.perf_counter() - t_start
        data_desc = {
            "norman19_subset": "the shipped REAL Norman 2019 subset (3,375 K562 cells, 500 genes)",
            "simulation": f"SIMULATED data (preset {cfg.data.simulation.preset}, seed {cfg.data.simulation.seed})",
            "norman_effects": "SEMI-SYNTHETIC cells whose effects are the real Norman 2019 pseudobulk changes",
        }.get(cfg.data.source if not cfg.data.path else "file", f"file {cfg.data.path}")
        header = [f"- data: {data_desc}; {adata.n_obs} cells x {adata.n_vars} genes",
                  f"- split: `{split.name}` (seed {split.seed}, {split.params}), "
                  f"{len(split.train_idx)} training / {len(split.val_idx)} validation / {len(split.test_idx)} test cells",
                  f"- methods: {', '.join(methods)}; seeds 0..{seeds - 1} (train.seed; the split is fixed)",
                  (f"- the model's point prediction (posterior predictive mean): {n_mean} predicted cells per "
                   f"condition and as many predicted controls; total wall time {wall:.0f} s" if effects_mode else
                   f"- predicted cells per condition: {n_pred} (distribution metrics); the model's point prediction "
                   f"(posterior predictive mean) from {n_mean} cells per condition and as many predicted controls; "
                   f"total wall time {wall:.0f} s"),
                  f"- command: `python -m {PROG} --config {name} {' '.join(overrides)}`".rstrip()]
        if "PerturbedVAE" in methods:
            header.insert(3, f"- model training: {train_cfg.get('epochs')} epochs, batch {train_cfg.get('batch_size')}, "
                             f"lr {train_cfg.get('lr')}; model: latent_pert {model_cfg.get('latent_pert')}, latent_inv "
                             f"{model_cfg.get('latent_inv')}, hidden {model_cfg.get('hidden')}")
        if effects_mode:
            header += ["- scale: every change is of pseudobulk log1p(CPM) (counts per million, log of the mean), "
                       "the scale of the real effects file; the model from its predicted counts (condition minus its "
                       "predicted control), the baselines fitted on the training conditions' pseudobulk log1p(CPM) "
                       "profiles. Scored against the REAL changes in uns['truth']['true_delta_log1p_cpm']. The top-20 DE genes "
                       "of a condition are the 20 largest |observed change| of its held-out simulated cells (from the "
                       "held-out controls): chosen on data, not on the real change they are scored against."]
        else:
            header += ["- scale: log1p(counts / total * 1e4) recomputed from counts for observed cells and "
                       "baselines alike; changes and top-20 DE genes as in *Protocol* below"]
        atomic_write_text(run_dir / "summary.md", summary_text(df, name, header, mode, extras))
        make_plots(df, extras, run_dir, mode, int(b.get("n_plot_conditions", 4)))
    print(f"\nbenchmark of {', '.join(methods)} on {len(set(df.condition))} held-out conditions, "
          f"{seeds} seed(s), in {wall:.0f} s")
    print(f"outputs in {run_dir}/ : {' '.join(run_dir_claim.files())}")
    return df, run_dir


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from .config import cli_main

    extra = ("\n\nbenchmark keys: benchmark.seeds=N (fits with train.seed 0..N-1), "
             "benchmark.methods=[" + ",".join(ALL_METHODS) + "], benchmark.n_pred_cells=N, "
             "benchmark.n_mean_cells=N, benchmark.n_change_draws=N, benchmark.train.KEY=VALUE (train overrides for the "
             "benchmark's fits; explicit train.KEY=VALUE wins), "
             "benchmark.external=[NAME=path/pred.h5ad,...] (other tools' predicted cells, one row each)")
    return cli_main(run, argv, prog, extra, errors=(BenchmarkError,))


if __name__ == "__main__":
    sys.exit(main())
