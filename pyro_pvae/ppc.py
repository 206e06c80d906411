"""Posterior-predictive checks (PPC) and ArviZ export.

Replicated data sets come from the Pyro program itself
(:meth:`PerturbedVAEModule.sample_cells`: :meth:`~PerturbedVAEModule.model` with its observed
site ``"x"`` released) and the guide (global draws from :func:`pyro_pvae.model.sample_globals`). One replicate = one draw of the global sites
(``pi, gate, slab, W, theta``) shared by all checked cells, the local latents of each cell
drawn from the amortised guide ``q(z_inv, eps | x, u)`` (``local_latents="posterior"``, the
usual in-sample check) or from their prior (``"prior"``, a stricter check of the
generative model), and NB (or Poisson) counts. Each cell keeps its observed library size,
as in the model. Cells are processed in blocks so memory stays bounded.

Statistics compared with the observed data:

* per gene: mean, variance and fraction of zeros of the counts;
* per cell: library size (total counts);
* per (condition, top-DE gene) pair: the condition's mean change from control of
  log-normalised expression (``log1p(x / total * 1e4)``), for the genes with the largest
  observed absolute change;
* aggregate (one number per data set): mean zero fraction, median overdispersion
  ``(var - mean) / mean^2`` over genes, the slope of the log-variance on log-mean relation,
  the sd of log library sizes.

Numbers: for every unit (gene, cell, pair) a posterior-predictive p-value
``P(T_rep > T_obs) + P(T_rep = T_obs) / 2`` and whether ``T_obs`` lies in the central 50%
and 90% intervals of ``T_rep`` (coverage = fraction of units inside); for aggregates the
p-value. A check passes when coverage is not far below nominal and the aggregate p-values
are not extreme (thresholds in :data:`DEFAULT_THRESHOLDS`). Posterior-predictive p-values
are conservative (coverage above nominal is expected and is not a failure).

Public functions: :func:`posterior_predictive` (draws + statistics, a :class:`PPCResult`),
:func:`summarize`, :func:`plot_ppc_figures`, :func:`ppc` (one call: writes ``ppc/`` with
``ppc_summary.json`` and PNG figures), :func:`sample_globals`, :func:`to_inference_data`,
:func:`load_fitted` (a run directory's model with its data and split).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import pyro.util
import torch

from . import data as D
from .model import GLOBAL_SITES, sample_globals
from .utils import atomic_write, lognormalize

log = logging.getLogger(__name__)

# statistic -> (kind, unit dimension name)
UNIT_STATISTICS = {
    "gene_mean": "gene",
    "gene_var": "gene",
    "gene_zero_fraction": "gene",
    "library_size": "cell",
    "mean_change": "de_pair",
}
AGGREGATE_STATISTICS = ("total_zero_fraction", "overdispersion", "mv_slope", "library_log_sd")

# check name -> statistics it looks at
CHECKS = {
    "mean": ("gene_mean",),
    "variance": ("gene_var", "overdispersion", "mv_slope"),
    "zero_fraction": ("gene_zero_fraction", "total_zero_fraction"),
    "library_size": ("library_size",),
    "mean_change": ("mean_change",),
}
# Reported with a p-value but not part of any check: the model conditions on each cell's
# observed library size (the NB means sum to it), so replicated totals scatter around the
# observed ones and their spread is wider by construction.
INFORMATIONAL = ("library_log_sd",)

DEFAULT_THRESHOLDS = {
    "min_coverage_90": 0.75,  # per-unit statistics: at least this share inside the 90% interval
    "min_coverage_50": 0.30,  # ... and inside the 50% interval
    "min_two_sided_p": 0.01,  # aggregate statistics: 2 * min(p, 1 - p) at least this
}


# ---------------------------------------------------------------------------------------------
# Resolving the model and the data
# ---------------------------------------------------------------------------------------------

def load_fitted(run_dir, adata=None, device: str = "cpu"):
    """``api.load_run`` plus the run's data (re-read from ``config.yaml`` unless ``adata`` is
    given) and its split (``split.json``; ``PerturbedVAE.load`` does not restore it yet)."""
    from .api import load_run

    run_dir = Path(run_dir)
    if adata is None and not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml to re-read its data from; pass adata=")
    vae = load_run(run_dir, device=device, with_data=adata is None)
    if adata is not None:
        vae.adata = adata
    if vae.split is None and (run_dir / "split.json").exists():
        vae.split = D.Split.from_json(run_dir / "split.json")
    return vae


def _resolve(run_or_model, adata=None, device: str = "cpu"):
    """(PerturbedVAE, AnnData, run_dir or None) from a run directory or a fitted model."""
    from .api import PerturbedVAE

    run_dir = None
    if isinstance(run_or_model, (str, os.PathLike)):
        run_dir = Path(run_or_model)
        vae = load_fitted(run_dir, adata, device)
    elif isinstance(run_or_model, PerturbedVAE):
        vae = run_or_model
    else:
        raise TypeError(f"expected a run directory or a PerturbedVAE, got {type(run_or_model).__name__}")
    if vae.module is None:
        raise ValueError("the PerturbedVAE has no fitted modules; call fit() first")
    adata = adata if adata is not None else vae.adata
    if adata is None:
        raise ValueError("no data: pass adata= (the model holds none)")
    genes = [str(g) for g in adata.var_names]
    if genes != list(vae.gene_names):
        raise D.DataError(f"the data's {len(genes)} genes differ from the model's {len(vae.gene_names)} genes "
                          "(same genes in the same order are needed)")
    return vae, adata, run_dir


def select_cells(vae, adata, cells="train", max_cells: int | None = 4000, seed: int = 0) -> np.ndarray:
    """Positions of the cells to check: ``"train"``, ``"val"``, ``"test"`` (from the model's
    split), ``"all"`` or an array of positions; at most ``max_cells`` (random, sorted), and
    only cells whose targets are all in the model's vocabulary."""
    if isinstance(cells, str):
        if cells == "all":
            idx = np.arange(adata.n_obs)
        elif cells in ("train", "val", "test"):
            if vae.split is None:
                raise ValueError(f"cells={cells!r} needs the model's split; the model has none (use cells='all')")
            idx = np.asarray(getattr(vae.split, f"{cells}_idx"))
        else:
            raise ValueError(f"cells must be 'train', 'val', 'test', 'all' or positions, got {cells!r}")
    else:
        idx = np.asarray(cells, dtype=np.int64).ravel()
    known = set(vae.vocabulary)
    cond = adata.obs["condition"].astype(str).to_numpy()
    ok = np.array([all(t in known for t in D.parse_condition(c)) for c in cond[idx]], dtype=bool)
    if (~ok).any():
        log.info("ppc: %d cells with perturbations unknown to the model are skipped", int((~ok).sum()))
    idx = idx[ok]
    if len(idx) == 0:
        raise ValueError("no cells to check")
    if max_cells is not None and len(idx) > max_cells:
        idx = np.random.default_rng(seed).choice(idx, size=max_cells, replace=False)
    return np.sort(idx)


# ---------------------------------------------------------------------------------------------
# Draws
# ---------------------------------------------------------------------------------------------

def _block_size(n_draws: int, n_genes: int, max_elements: float) -> int:
    return int(max(1, min(4096, max_elements // max(1, n_draws * n_genes))))


@dataclass
class PPCResult:
    """Observed and replicated statistics (replicated: leading draw axis)."""

    observed: dict[str, np.ndarray]
    replicated: dict[str, np.ndarray]
    genes: list[str]
    cell_idx: np.ndarray
    cell_names: list[str]
    cell_condition: list[str]
    de_pairs: list[tuple[str, str]]  # (condition, gene)
    globals: dict[str, np.ndarray]
    settings: dict = field(default_factory=dict)
    counts_observed: np.ndarray | None = None   # optional: cells x genes of a few cells
    counts_replicated: np.ndarray | None = None  # draws x cells x genes
    counts_rows: np.ndarray | None = None        # their rows in cell_idx

    @property
    def n_draws(self) -> int:
        return int(next(iter(self.replicated.values())).shape[0])

    def unit_labels(self, stat: str) -> list[str]:
        dim = UNIT_STATISTICS[stat]
        if dim == "gene":
            return list(self.genes)
        if dim == "cell":
            return list(self.cell_names)
        return [f"{c}|{g}" for c, g in self.de_pairs]


def posterior_predictive(run_or_model, adata=None, *, cells="train", max_cells: int | None = 4000,
                         n_draws: int = 100, local_latents: str = "posterior", n_top_de: int = 10,
                         max_conditions: int = 20, min_cells: int = 10, n_count_cells: int = 0,
                         seed: int = 0, max_elements: float = 2e7, device: str = "cpu",
                         globals_draws: dict | None = None) -> PPCResult:
    """Replicated data sets for the chosen cells and their statistics (see module docstring).

    ``cells``/``max_cells``: which cells (see :func:`select_cells`); ``n_draws``: replicates;
    ``local_latents``: ``"posterior"`` (amortised guide) or ``"prior"``; ``n_top_de`` genes
    with the largest observed absolute mean change for each of up to ``max_conditions``
    conditions with at least ``min_cells`` cells (most cells first); ``n_count_cells``: keep
    the raw replicated counts of that many cells (for plots / ArviZ); ``max_elements``
    bounds draws x cells x genes held at once. The global RNG state is restored afterwards.
    """
    if local_latents not in ("posterior", "prior"):
        raise ValueError(f"local_latents must be 'posterior' or 'prior', got {local_latents!r}")
    vae, adata, _ = _resolve(run_or_model, adata, device)
    idx = select_cells(vae, adata, cells, max_cells, seed)
    N, G = len(idx), adata.n_vars
    cond = adata.obs["condition"].astype(str).to_numpy()[idx]

    # conditions tracked for the mean change (code 0 = control, 1..C, -1 = not tracked)
    labels, counts = np.unique(cond, return_counts=True)
    n_ctrl = int(counts[labels == D.CONTROL].sum())
    cands = [(int(n), str(c)) for c, n in zip(labels, counts) if c != D.CONTROL and n >= min_cells]
    cands.sort(key=lambda t: (-t[0], t[1]))
    tracked = [c for _, c in cands[:max_conditions]] if n_ctrl >= min_cells else []
    code_of = {D.CONTROL: 0, **{c: i + 1 for i, c in enumerate(tracked)}}
    code = np.array([code_of.get(c, -1) for c in cond], dtype=np.int64)
    n_groups = len(tracked) + 1

    state = pyro.util.get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        vae.module.eval()
        glob = globals_draws if globals_draws is not None else sample_globals(vae.module, n_draws)
        glob = {k: v.to(vae.device) for k, v in glob.items()}
        S = int(glob["slab"].shape[0])
        draws = [{k: v[s] for k, v in glob.items() if k in GLOBAL_SITES} for s in range(S)]

        control_idx = np.asarray(getattr(vae, "control_idx", None) if getattr(vae, "control_idx", None) is not None
                                 else idx[cond == D.CONTROL] if (cond == D.CONTROL).any() else idx[:1])
        batcher = D.make_batcher(adata, cell_idx=idx, vocabulary=vae.vocabulary, control_idx=control_idx,
                                 batch_size=_block_size(S, G, max_elements), device=vae.device, seed=seed,
                                 shuffle=False, drop_last=False)
        pos_of = {int(p): i for i, p in enumerate(idx)}
        o_sum = np.zeros(G); o_sq = np.zeros(G); o_zero = np.zeros(G); o_lib = np.zeros(N)
        r_sum = np.zeros((S, G)); r_sq = np.zeros((S, G)); r_zero = np.zeros((S, G)); r_lib = np.zeros((S, N))
        o_grp = np.zeros((n_groups, G)); r_grp = np.zeros((S, n_groups, G))
        keep = np.sort(np.random.default_rng(seed + 1).choice(N, size=min(n_count_cells, N), replace=False)) \
            if n_count_cells else np.array([], dtype=np.int64)
        keep_set = {int(k): j for j, k in enumerate(keep)}
        c_obs = np.zeros((len(keep), G), dtype=np.float32)
        c_rep = np.zeros((S, len(keep), G), dtype=np.float32)
        with torch.no_grad():
            for batch in batcher:
                rows = np.array([pos_of[int(p)] for p in batch.idx.cpu().numpy()])
                x_rep = torch.stack([vae.module.sample_cells(batch.x, batch.u, draw, local_latents)
                                     for draw in draws])  # (S, B, G)
                xo = batch.x.double().cpu().numpy()
                xr = x_rep.double().cpu().numpy()
                o_sum += xo.sum(0); o_sq += (xo ** 2).sum(0); o_zero += (xo == 0).sum(0)
                o_lib[rows] = xo.sum(1)
                r_sum += xr.sum(1); r_sq += (xr ** 2).sum(1); r_zero += (xr == 0).sum(1)
                r_lib[:, rows] = xr.sum(2)
                g = code[rows]
                m = g >= 0
                if m.any():
                    lo = lognormalize(batch.x[torch.as_tensor(m)]).double().cpu().numpy()
                    lr = lognormalize(x_rep[:, torch.as_tensor(m)]).double().cpu().numpy()
                    onehot = np.zeros((n_groups, int(m.sum())))
                    onehot[g[m], np.arange(int(m.sum()))] = 1.0
                    o_grp += onehot @ lo
                    r_grp += np.einsum("cb,sbg->scg", onehot, lr, optimize=True)
                for j, r in enumerate(rows):
                    if int(r) in keep_set:
                        k = keep_set[int(r)]
                        c_obs[k] = xo[j]
                        c_rep[:, k] = xr[:, j]
    finally:
        pyro.util.set_rng_state(state)

    def gene_stats(s, sq, z):
        mean = s / N
        var = (sq - N * mean ** 2) / max(N - 1, 1)
        return mean, np.maximum(var, 0.0), z / N

    obs, rep = {}, {}
    obs["gene_mean"], obs["gene_var"], obs["gene_zero_fraction"] = gene_stats(o_sum, o_sq, o_zero)
    rep["gene_mean"], rep["gene_var"], rep["gene_zero_fraction"] = gene_stats(r_sum, r_sq, r_zero)
    obs["library_size"], rep["library_size"] = o_lib, r_lib

    pairs: list[tuple[str, str]] = []
    if tracked:
        n_in = np.bincount(code[code >= 0], minlength=n_groups).astype(float)
        o_mean = o_grp / n_in[:, None]
        r_mean = r_grp / n_in[None, :, None]
        o_chg = o_mean[1:] - o_mean[:1]            # (C, G)
        r_chg = r_mean[:, 1:] - r_mean[:, :1]      # (S, C, G)
        sel = np.argsort(-np.abs(o_chg), axis=1, kind="stable")[:, :n_top_de]
        ci = np.repeat(np.arange(len(tracked)), sel.shape[1])
        gi = sel.ravel()
        pairs = [(tracked[c], str(adata.var_names[gg])) for c, gg in zip(ci, gi)]
        obs["mean_change"], rep["mean_change"] = o_chg[ci, gi], r_chg[:, ci, gi]
    else:
        obs["mean_change"], rep["mean_change"] = np.zeros(0), np.zeros((S, 0))

    for d, lib in ((obs, obs["library_size"]), (rep, rep["library_size"])):
        d.update(_aggregates(d["gene_mean"], d["gene_var"], d["gene_zero_fraction"], lib))

    settings = dict(cells=cells if isinstance(cells, str) else "positions", max_cells=max_cells, n_cells=N,
                    n_draws=S, local_latents=local_latents, n_top_de=n_top_de, max_conditions=max_conditions,
                    min_cells=min_cells, seed=seed, conditions=tracked, n_control_cells=n_ctrl,
                    likelihood=vae.model_config.likelihood)
    return PPCResult(observed=obs, replicated=rep, genes=[str(x) for x in adata.var_names], cell_idx=idx,
                     cell_names=[str(x) for x in adata.obs_names[idx]], cell_condition=[str(c) for c in cond],
                     de_pairs=pairs, globals={k: v.cpu().numpy() for k, v in glob.items()}, settings=settings,
                     counts_observed=c_obs if n_count_cells else None,
                     counts_replicated=c_rep if n_count_cells else None,
                     counts_rows=keep if n_count_cells else None)


def _aggregates(mean, var, zero, lib) -> dict[str, np.ndarray]:
    """Aggregate statistics; inputs (..., G) and (..., N); outputs (...)."""
    ok = mean > 1e-3
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(ok, (var - mean) / mean ** 2, np.nan)
        lm = np.where(ok & (var > 0), np.log(mean), np.nan)
        lv = np.where(ok & (var > 0), np.log(var), np.nan)
    lmc = lm - np.nanmean(lm, axis=-1, keepdims=True)
    lvc = lv - np.nanmean(lv, axis=-1, keepdims=True)
    slope = np.nansum(lmc * lvc, axis=-1) / np.nansum(lmc ** 2, axis=-1)
    return {
        "total_zero_fraction": zero.mean(-1),
        "overdispersion": np.nanmedian(phi, axis=-1),
        "mv_slope": slope,
        "library_log_sd": np.log(np.maximum(lib, 1.0)).std(-1),
    }


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

def ppp(replicated: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Posterior-predictive p-values P(T_rep > T_obs) + P(T_rep = T_obs) / 2 (draw axis 0)."""
    rep, obs = np.asarray(replicated, float), np.asarray(observed, float)
    return (rep > obs).mean(0) + 0.5 * (rep == obs).mean(0)


def interval_coverage(replicated: np.ndarray, observed: np.ndarray, level: float) -> float:
    """Share of units whose observed statistic lies in the central ``level`` interval."""
    rep, obs = np.asarray(replicated, float), np.asarray(observed, float)
    if obs.size == 0:
        return float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(rep, [a, 1.0 - a], axis=0)
    return float(np.mean((obs >= lo) & (obs <= hi)))


def summarize(result: PPCResult, thresholds: dict | None = None) -> dict:
    """The numbers of the checks: per-unit statistics (median p-value, share of units with a
    two-sided p < 0.05, 50%/90% coverage), aggregates (observed, replicated mean and 90%
    interval, p-value) and a pass/fail per check and statistic."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    stats = {}
    for name in UNIT_STATISTICS:
        o, r = result.observed[name], result.replicated[name]
        if o.size == 0:
            stats[name] = {"kind": "per_unit", "unit": UNIT_STATISTICS[name], "n_units": 0, "passed": None}
            continue
        p = ppp(r, o)
        c50, c90 = interval_coverage(r, o, 0.5), interval_coverage(r, o, 0.9)
        stats[name] = {
            "kind": "per_unit", "unit": UNIT_STATISTICS[name], "n_units": int(o.size),
            "ppp_median": float(np.median(p)), "ppp_mean": float(np.mean(p)),
            "frac_two_sided_p_below_0.05": float(np.mean(2 * np.minimum(p, 1 - p) < 0.05)),
            "coverage_50": c50, "coverage_90": c90,
            "passed": bool(c90 >= th["min_coverage_90"] and c50 >= th["min_coverage_50"]),
        }
    for name in AGGREGATE_STATISTICS:
        o, r = float(result.observed[name]), np.asarray(result.replicated[name], float)
        p = float(ppp(r, o))
        q05, q95 = np.nanquantile(r, [0.05, 0.95])
        stats[name] = {
            "kind": "aggregate", "observed": o, "replicated_mean": float(np.nanmean(r)),
            "replicated_q05": float(q05), "replicated_q95": float(q95), "ppp": p,
            "passed": bool(2 * min(p, 1 - p) >= th["min_two_sided_p"]),
        }
    checks = {}
    for check, names in CHECKS.items():
        verdicts = [stats[n]["passed"] for n in names if stats[n]["passed"] is not None]
        checks[check] = {"statistics": list(names), "passed": bool(all(verdicts)) if verdicts else None}
    return {
        "draws": "variational (SVI guide) posterior predictive; p-values are posterior-predictive p-values",
        "settings": result.settings, "thresholds": th,
        "passed": bool(all(c["passed"] for c in checks.values() if c["passed"] is not None)),
        "checks": checks, "statistics": stats,
        "informational": {n: "not checked: replicated library sizes scatter around the observed ones the "
                             "model conditions on, so their spread is wider by construction" for n in INFORMATIONAL},
    }


# ---------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot state, any backend)
# ---------------------------------------------------------------------------------------------

def _figure(ncols: int = 1, nrows: int = 1, size=(4.2, 3.6)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _scatter_interval(ax, obs, rep, title, log=False):
    lo, mid, hi = np.quantile(rep, [0.05, 0.5, 0.95], axis=0)
    inside = (obs >= lo) & (obs <= hi)
    ax.errorbar(obs, mid, yerr=[mid - lo, hi - mid], fmt="none", ecolor="0.7", lw=0.6, zorder=1)
    ax.scatter(obs[inside], mid[inside], s=6, c="C0", label="observed in 90% interval", zorder=2)
    ax.scatter(obs[~inside], mid[~inside], s=8, c="C3", label="outside", zorder=3)
    finite = np.concatenate([obs, lo, hi])
    finite = finite[np.isfinite(finite) & ((finite > 0) if log else True)]
    if finite.size:
        a, b = finite.min(), finite.max()
        ax.plot([a, b], [a, b], "k--", lw=0.8)
    if log:
        ax.set_xscale("log"), ax.set_yscale("log")
    cov = np.mean(inside) if obs.size else float("nan")
    ax.set_title(f"{title}\n90% coverage {cov:.2f}", fontsize=9)
    ax.set_xlabel("observed"), ax.set_ylabel("replicated (median, 90% interval)")


def plot_ppc_figures(result: PPCResult, summary: dict | None = None) -> dict[str, object]:
    """Figures by name: ``gene_statistics``, ``mean_variance``, ``library_size``,
    ``mean_change``, ``aggregates``, ``ppp_histograms`` (matplotlib Figures)."""
    summary = summary or summarize(result)
    o, r = result.observed, result.replicated
    figs = {}

    fig, ax = _figure(3)
    pos = o["gene_mean"] > 0
    _scatter_interval(ax[0], o["gene_mean"][pos], r["gene_mean"][:, pos], "per-gene mean", log=True)
    posv = o["gene_var"] > 0
    _scatter_interval(ax[1], o["gene_var"][posv], r["gene_var"][:, posv], "per-gene variance", log=True)
    _scatter_interval(ax[2], o["gene_zero_fraction"], r["gene_zero_fraction"], "per-gene zero fraction")
    ax[2].legend(fontsize=7, loc="upper left")
    figs["gene_statistics"] = fig

    fig, ax = _figure(1, size=(5, 4.2))
    a = ax[0]
    for s in range(min(20, result.n_draws)):
        a.scatter(r["gene_mean"][s], r["gene_var"][s], s=2, c="C1", alpha=0.15,
                  label="replicated (20 draws)" if s == 0 else None)
    a.scatter(o["gene_mean"], o["gene_var"], s=5, c="k", label="observed")
    m = o["gene_mean"][o["gene_mean"] > 0]
    if m.size:
        grid = np.geomspace(m.min(), m.max(), 50)
        a.plot(grid, grid, "b--", lw=0.8, label="Poisson: var = mean")
    a.set_xscale("log"), a.set_yscale("log")
    a.set_xlabel("gene mean"), a.set_ylabel("gene variance")
    st = summary["statistics"]
    a.set_title(f"mean-variance: slope obs {st['mv_slope']['observed']:.2f}, rep "
                f"{st['mv_slope']['replicated_mean']:.2f}; overdispersion p={st['overdispersion']['ppp']:.2f}",
                fontsize=8)
    a.legend(fontsize=7)
    figs["mean_variance"] = fig

    fig, ax = _figure(2)
    lo_ = np.log10(np.maximum(o["library_size"], 1))
    lr_ = np.log10(np.maximum(r["library_size"], 1))
    bins = np.linspace(min(lo_.min(), lr_.min()), max(lo_.max(), lr_.max()), 40)
    for s in range(min(20, result.n_draws)):
        ax[0].hist(lr_[s], bins=bins, histtype="step", color="C1", alpha=0.3, density=True)
    ax[0].hist(lo_, bins=bins, histtype="step", color="k", lw=1.5, density=True, label="observed")
    ax[0].set_xlabel("log10 library size"), ax[0].set_title("library sizes (orange: replicates)", fontsize=9)
    ax[0].legend(fontsize=7)
    _scatter_interval(ax[1], o["library_size"], r["library_size"], "per-cell library size", log=True)
    figs["library_size"] = fig

    fig, ax = _figure(1, size=(5, 4.2))
    if o["mean_change"].size:
        _scatter_interval(ax[0], o["mean_change"], r["mean_change"],
                          f"mean change from control, top-{result.settings.get('n_top_de')} DE genes of "
                          f"{len(result.settings.get('conditions', []))} conditions")
    else:
        ax[0].text(0.5, 0.5, "no condition with enough cells", ha="center", transform=ax[0].transAxes)
    figs["mean_change"] = fig

    fig, ax = _figure(len(AGGREGATE_STATISTICS), size=(3.2, 3.0))
    for a, name in zip(ax, AGGREGATE_STATISTICS):
        rv = np.asarray(r[name], float)
        a.hist(rv[np.isfinite(rv)], bins=25, color="C1", alpha=0.7)
        a.axvline(float(o[name]), color="k", lw=2)
        a.set_title(f"{name}\np = {st[name]['ppp']:.2f}", fontsize=9)
    figs["aggregates"] = fig

    fig, ax = _figure(len(UNIT_STATISTICS), size=(3.0, 2.8))
    for a, name in zip(ax, UNIT_STATISTICS):
        if o[name].size:
            a.hist(ppp(r[name], o[name]), bins=np.linspace(0, 1, 21), color="C0")
        s_ = st[name]
        a.set_title(f"{name}: p-values\ncov50 {s_.get('coverage_50', float('nan')):.2f} "
                    f"cov90 {s_.get('coverage_90', float('nan')):.2f}", fontsize=8)
    figs["ppp_histograms"] = fig
    return figs


# ---------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------

def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def ppc(run_dir_or_model, adata=None, out_dir: str | os.PathLike | None = None, *, plots: bool = True,
        thresholds: dict | None = None, **kwargs) -> dict:
    """Run the posterior-predictive checks and write ``ppc/`` (``ppc_summary.json`` and PNG
    figures) into the run directory, or into ``out_dir`` when given (needed for a model
    object). ``kwargs`` go to :func:`posterior_predictive`. Returns the summary dict (its
    ``"out_dir"`` and ``"files"`` say what was written)."""
    if out_dir is None:
        if not isinstance(run_dir_or_model, (str, os.PathLike)):
            raise ValueError("pass out_dir= when checking a model object (a run directory gets run_dir/ppc)")
        out_dir = Path(run_dir_or_model) / "ppc"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = posterior_predictive(run_dir_or_model, adata, **kwargs)
    summary = summarize(result, thresholds)
    files = []
    if plots:
        for name, fig in plot_ppc_figures(result, summary).items():
            path = out_dir / f"{name}.png"
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
            files.append(path.name)
    summary["out_dir"] = str(out_dir)
    summary["files"] = files + ["ppc_summary.json"]
    text = json.dumps(summary, indent=2, default=_json_default, allow_nan=True)
    atomic_write(out_dir / "ppc_summary.json", lambda tmp: Path(tmp).write_text(text))
    return summary


# ---------------------------------------------------------------------------------------------
# ArviZ
# ---------------------------------------------------------------------------------------------

def to_inference_data(run_or_model, adata=None, n_draws: int = 200, *, result: PPCResult | None = None,
                      **ppc_kwargs):
    """An :class:`arviz.InferenceData` of the fitted model.

    Groups: ``posterior`` (``delta``, ``gate``, ``slab``, ``pi``, ``W``, ``theta``, and the sites of
    the options the model has, e.g. ``c2``, ``library_effect``; dims
    ``perturbation``, ``pert_latent``, ``pert_latent_parent``, ``gene``; one chain),
    ``posterior_predictive`` and ``observed_data`` (the PPC statistics of the checked cells:
    per-gene mean/variance/zero fraction, per-cell library size, per (condition, DE gene)
    mean change, aggregates; plus raw counts ``x`` when ``n_count_cells`` > 0), and
    ``constant_data`` (PIPs, mean DAG, the checked cells and their conditions, the split's
    train/test conditions). Attributes say that the draws are variational (SVI guide), not
    MCMC, so r_hat / ESS are not meaningful, and hold the model/train configs as JSON.

    ``result``: reuse a :class:`PPCResult` (its global draws become the posterior);
    otherwise ``ppc_kwargs`` go to :func:`posterior_predictive` with ``n_draws``.
    """
    import arviz as az
    import xarray as xr

    vae, adata, run_dir = _resolve(run_or_model, adata, ppc_kwargs.get("device", "cpu"))
    if result is None:
        result = posterior_predictive(vae, adata, n_draws=n_draws, **ppc_kwargs)
    K = vae.model_config.latent_pert
    coords = {
        "chain": [0], "draw": np.arange(result.n_draws),
        "perturbation": list(vae.vocabulary), "pert_latent": np.arange(K), "pert_latent_parent": np.arange(K),
        "gene": list(result.genes),
        "pair": [D.format_condition([vae.vocabulary[i], vae.vocabulary[j]]) for i, j in vae.training_pairs],
    }
    site_dims = {"delta": ["perturbation", "pert_latent"], "gate": ["perturbation", "pert_latent"],
                 "slab": ["perturbation", "pert_latent"], "W": ["pert_latent", "pert_latent_parent"],
                 "theta": ["gene"], "pi": [], "c2": [], "pair_pi": [], "pair_scale": [],
                 "pair_effect": ["pair", "pert_latent"], "gene_scale": [], "gene_effect": ["perturbation", "gene"],
                 "gene_pair_scale": [], "gene_pair_effect": ["pair", "gene"], "c_spread": [],
                 "pair_log_c": ["pair"], "library_effect": ["perturbation"]}
    post = {}
    for name, dims in site_dims.items():
        if name in result.globals:
            v = np.asarray(result.globals[name], dtype=np.float32)
            if name == "W":
                v = v * np.tril(np.ones((K, K), np.float32), -1)
            if name == "library_effect":  # (draws, P, 1): one effect on the log library size per perturbation
                v = v[..., 0]
            post[name] = xr.DataArray(v[None], dims=["chain", "draw", *dims],
                                      coords={d: coords[d] for d in ["chain", "draw", *dims]})
    unit_coords = {"gene": list(result.genes), "cell": list(result.cell_names),
                   "de_pair": result.unit_labels("mean_change")}
    pp, ob = {}, {}
    for name, dim in UNIT_STATISTICS.items():
        pp[name] = xr.DataArray(np.asarray(result.replicated[name], np.float64)[None], dims=["chain", "draw", dim],
                                coords={"chain": [0], "draw": coords["draw"], dim: unit_coords[dim]})
        ob[name] = xr.DataArray(np.asarray(result.observed[name], np.float64), dims=[dim],
                                coords={dim: unit_coords[dim]})
    for name in AGGREGATE_STATISTICS:
        pp[name] = xr.DataArray(np.asarray(result.replicated[name], np.float64)[None], dims=["chain", "draw"],
                                coords={"chain": [0], "draw": coords["draw"]})
        ob[name] = xr.DataArray(np.float64(result.observed[name]))
    if result.counts_replicated is not None:
        kept = [result.cell_names[i] for i in result.counts_rows]
        cc = {"count_cell": kept, "gene": list(result.genes)}
        pp["x"] = xr.DataArray(result.counts_replicated[None], dims=["chain", "draw", "count_cell", "gene"],
                               coords={"chain": [0], "draw": coords["draw"], **cc})
        ob["x"] = xr.DataArray(result.counts_observed, dims=["count_cell", "gene"], coords=cc)

    split = vae.split
    test_c = [str(c) for c in (split.test_conditions if split is not None else [])]
    train_c = [str(c) for c in (split.train_conditions if split is not None else [])]
    const = {
        "pip": xr.DataArray(vae.pip().astype(np.float32), dims=["perturbation", "pert_latent"],
                            coords={"perturbation": coords["perturbation"], "pert_latent": coords["pert_latent"]}),
        "W_mean": xr.DataArray(vae.dag().astype(np.float32), dims=["pert_latent", "pert_latent_parent"],
                               coords={"pert_latent": coords["pert_latent"],
                                       "pert_latent_parent": coords["pert_latent_parent"]}),
        "cell_position": xr.DataArray(np.asarray(result.cell_idx, np.int64), dims=["cell"],
                                      coords={"cell": unit_coords["cell"]}),
        "cell_condition": xr.DataArray(np.asarray(result.cell_condition, dtype=object).astype(str), dims=["cell"],
                                       coords={"cell": unit_coords["cell"]}),
        "de_condition": xr.DataArray(np.array([c for c, _ in result.de_pairs], dtype=str), dims=["de_pair"],
                                     coords={"de_pair": unit_coords["de_pair"]}),
        "de_gene": xr.DataArray(np.array([g for _, g in result.de_pairs], dtype=str), dims=["de_pair"],
                                coords={"de_pair": unit_coords["de_pair"]}),
        "test_conditions": xr.DataArray(np.array(test_c, dtype=str), dims=["test_condition"]),
        "train_conditions": xr.DataArray(np.array(train_c, dtype=str), dims=["train_condition"]),
        "composition_scale": xr.DataArray(np.float32(vae.module.composition_mean())),
    }
    attrs = {
        "inference_method": "variational (SVI, amortised / mean-field guide)",
        "draws_note": ("Draws are from the variational approximation q (the SVI guide), sampled "
                       "independently; they are NOT MCMC draws. r_hat and ESS are not meaningful, "
                       "and intervals inherit the guide's (typically too narrow) uncertainty."),
        "model_config": json.dumps(vae.model_config.to_dict(), default=_json_default),
        "train_config": json.dumps(asdict(vae.train_config), default=_json_default),
        "ppc_settings": json.dumps(result.settings, default=_json_default),
        "split_name": str(getattr(split, "name", "")) if split is not None else "",
        "split_seed": int(getattr(split, "seed", -1)) if split is not None else -1,
        "run_dir": str(run_dir) if run_dir is not None else "",
        "library": "pyro_pvae",
    }
    groups = {
        "posterior": xr.Dataset(post, attrs=attrs),
        "posterior_predictive": xr.Dataset(pp, attrs=attrs),
        "observed_data": xr.Dataset(ob, attrs=attrs),
        "constant_data": xr.Dataset(const, attrs=attrs),
    }
    return az.InferenceData(attrs=attrs, **groups)

