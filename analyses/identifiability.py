"""Identifiability study: simulate, fit PerturbedVAE, score recovery over a grid of conditions.

    python analyses/identifiability.py --grid small            # CPU, minutes
    python analyses/identifiability.py --grid full --jobs 16   # GPU box / many cores

The grid (``analyses/grids/<grid>.yaml``, or a path to a YAML file) holds a ``base``
condition (simulation overrides, model and train configs) and a list of conditions, each
changing one factor around the base (not a full factorial). Every condition is run for
``--seeds`` seeds (simulation seed = training seed).

Per fit (scores from :mod:`pyro_pvae.identifiability`):

* latents of the control and single-perturbation cells (the training distribution):
  ``mcc_pert`` (Hungarian-matched |Pearson| of z_pert), ``r2_pert`` (linear, inferred ->
  true z_pert), ``r2_inv`` (linear, inferred -> true z_inv), ``r2_inv_all`` (true z_inv from
  all inferred latents: information kept at all, wherever it sits), ``leak_inv_from_pert`` (true
  z_inv from inferred z_pert; should be low), ``leak_pert_from_inv`` (true z_pert from
  inferred z_inv; should be low). Linear maps are fitted on half the cells, scored on the
  other half. Inferred latents are posterior means (z_pert: the encoder's location).
  ``mcc_pert_refined``, ``r2_inv_refined``, ``leak_pert_from_inv_refined``: the same scores of the
  means of each cell's refined posterior (``PerturbedVAE.latents(refine_steps=REFINE_STEPS)``:
  semi-amortised inference, the encoders' output moved to a maximum of the cell's own ELBO under
  the fitted decoder; no amortisation gap, and no alignment penalty either).
  ``mcc_pert_exogenous``: the MCC against the true latents before the DAG propagates them,
  ``(I - W_c) z_pert = eps + shift`` (W_c: the condition's DAG, hard-intervened rows cut). With
  shift interventions the likelihood does not fix W (the decoder absorbs it; the sparse rotation
  leaves W = 0), so where the true DAG has edges these, not z_pert, are what the model can recover;
  ``mcc_exogenous_truth``: the MCC of those true exogenous latents against the true z_pert (no
  fit): what the model's z_pert would score were they exactly the exogenous latents (a reference,
  not a bound; 1 where the true DAG has no edge);
* effects: ``effect_mcc`` (matching of latents by the correlation of true delta columns
  with the posterior-mean effect columns), ``pip_f1`` / ``pip_auprc`` under that matching
  and ``pip_f1_zmatch`` under the latent (MCC) matching. For the dense prior there are no
  inclusion decisions: F1 is NaN and AUPRC ranks |posterior mean effect|;
* DAG: ``shd`` (latent matching) and ``shd_effmatch``; inferred edges ``|W| > dag_threshold``;
* information check: ``probe_inv_from_x`` / ``probe_pert_from_x`` = held-out R^2 of a ridge
  regression of the true latents on the cell's log-normalised expression (no model): roughly how
  much a linear read-out of one cell can recover at all;
* doubles (all held out; training sees controls and singles): ``rmse_double_model`` /
  ``rmse_double_additive`` = RMSE over genes of the predicted vs true change of mean
  log-normalised expression from control, averaged over the doubles; the truth is
  ``simulate.true_condition_means`` (fresh cells from the true generative process).

Outputs in ``--out`` (default ``analyses/results/identifiability_<grid>/``): ``results.csv``
(one row per condition x seed x score), ``summary.md`` (mean +- sd over seeds),
``recovery_vs_envs.png``, ``alignment.png``, ``prior.png``, ``rotation.png``,
``signal.png``, ``rows/`` (per-fit CSVs: a rerun
skips fits already done; ``--fresh`` ignores them).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "analyses" / "grids"

#: scores in table order (higher is better unless listed in LOWER_IS_BETTER)
SCORES = ["mcc_pert", "mcc_pert_exogenous", "mcc_exogenous_truth", "r2_pert", "r2_inv", "r2_inv_all", "leak_inv_from_pert", "leak_pert_from_inv",
          "mcc_pert_refined", "r2_inv_refined", "leak_pert_from_inv_refined",
          "effect_mcc", "pip_f1", "pip_auprc", "pip_f1_zmatch", "shd", "shd_effmatch",
          "rmse_double_model", "rmse_double_additive", "probe_inv_from_x", "probe_pert_from_x", "fit_seconds"]
#: optimisation steps of each cell's refined posterior (the *_refined scores); 100 already converge on the base
REFINE_STEPS = 300
LOWER_IS_BETTER = {"leak_inv_from_pert", "leak_pert_from_inv", "leak_pert_from_inv_refined", "shd", "shd_effmatch",
                   "rmse_double_model", "rmse_double_additive", "fit_seconds"}


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------
def load_grid(grid: str | os.PathLike | dict, _seen: tuple = ()) -> dict:
    """The grid as a dict: a name in analyses/grids/, a YAML path, or a dict.

    A grid may name another with ``extends: NAME``: it then takes that grid's ``base``,
    ``seeds`` and ``dag_threshold``; its own ``base`` parts (sim, model, train, split) update the
    inherited ones key by key, its own top-level keys win, and its ``conditions`` are its own."""
    if isinstance(grid, dict):
        g = copy.deepcopy(grid)
    else:
        p = Path(grid)
        if not p.suffix:
            p = CONFIG_DIR / f"{grid}.yaml"
        if not p.exists():
            avail = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"no grid {grid!r} ({p}); available: {avail}")
        g = yaml.safe_load(p.read_text())
    parent_name = g.pop("extends", None)
    if parent_name is None:
        return g
    if not isinstance(parent_name, str) or not parent_name:
        raise ValueError(f"extends: must name one grid (a name in analyses/grids/ or a YAML path), got {parent_name!r}")
    seen = _seen + (str(grid) if not isinstance(grid, dict) else "the given grid",)
    if str(parent_name) in seen:
        raise ValueError(f"grids extend each other in a cycle: {' -> '.join(seen + (str(parent_name),))}")
    parent = load_grid(parent_name, seen)
    parent_base, own_base = parent.get("base") or {}, g.get("base") or {}
    base = {part: _updated_part(parent_base, own_base, part) for part in {**parent_base, **own_base}}
    out = {k: v for k, v in parent.items() if k in ("seeds", "dag_threshold")}
    out.update({k: v for k, v in g.items() if k != "base"})
    out["base"] = base
    return out


def _updated_part(base: dict, override: dict, part: str) -> dict:
    """``base[part]`` updated key by key with ``override[part]`` (copies; a missing or empty part is {})."""
    return {**copy.deepcopy(base.get(part) or {}), **copy.deepcopy(override.get(part) or {})}


def resolve_conditions(grid: dict) -> list[dict]:
    """Each condition = base with its sim/model/train overrides applied."""
    base = grid["base"]
    out = []
    for name, spec in grid["conditions"].items():
        spec = spec or {}
        cond = {"name": name, "factor": str(spec.get("factor", name)), "level": str(spec.get("level", name)),
                "dag_threshold": float(grid.get("dag_threshold", 0.25))}
        for part in ("sim", "model", "train", "split"):
            cond[part] = _updated_part(base, spec, part)
        out.append(cond)
    return out


# --------------------------------------------------------------------------------------------
# One fit
# --------------------------------------------------------------------------------------------
def _exogenous(adata, idx) -> np.ndarray:
    """The true perturbation latents before propagation, (I - W_c) z_pert = eps + shift, of cells idx."""
    from pyro_pvae.simulate import condition_spec

    truth, zp = adata.uns["truth"], adata.obsm["z_pert_true"][idx]
    labels = adata.obs["condition"].astype(str).to_numpy()[idx]
    out = np.empty_like(zp)
    for c in np.unique(labels):
        rows = labels == c
        out[rows] = zp[rows] - zp[rows] @ condition_spec(truth, c)[1].T
    return out


def fit_and_score(cond: dict, seed: int, n_threads: int = 1, blas_threads: int = 1) -> list[dict]:
    """Simulate, fit and score one condition x seed; rows ``{condition, factor, level, seed,
    score, value}``. ``n_threads``: torch threads; ``blas_threads``: numpy's and scipy's BLAS
    threads (whatever OMP_NUM_THREADS says). The fit is chaotic: a change in the last bits of the
    simulated data (numpy's BLAS sums in another order with more threads) can end SVI in another
    optimum, so a result is reproducible bit for bit only at the same thread counts."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(blas_threads)), user_api="blas"):
        return _fit_and_score(cond, seed, n_threads)


def simulate_condition(cond: dict, seed: int):
    """The simulated data of one condition x seed, as the study draws them."""
    from pyro_pvae.simulate import simulate

    sim = dict(cond["sim"])
    return simulate(sim.pop("preset", "tiny"), seed, **sim)


def fit_condition(cond: dict, seed: int, adata):
    """The study's fit of one condition x seed on its simulated ``adata``: its split (every double
    held out) and its model and training settings, ``train.seed`` = ``seed``.

    The split is ``norman_discrepancy`` with its defaults unless the condition's ``split`` part
    says otherwise: 5% of the training cells validate, and half of the controls are held out as
    the benchmark's reference for observed changes, which the study's scores do not use (its
    doubles are scored against the simulator's true means); ``split: {control_test_fraction:
    0.0}`` trains on them (grid ``controls``)."""
    from pyro_pvae.api import PerturbedVAE
    from pyro_pvae.data import make_split

    split = make_split(adata, "norman_discrepancy", seed, heldout_singles=(), **cond.get("split", {}))
    return PerturbedVAE(adata, split=split, model=dict(cond["model"]),
                        train={**cond["train"], "seed": int(seed)}).fit()


def _fit_and_score(cond: dict, seed: int, n_threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(max(1, int(n_threads)))
    import logging
    logging.getLogger("pyro_pvae").setLevel(logging.WARNING)
    from pyro_pvae import identifiability as idf
    from pyro_pvae.baselines import make_baseline
    from pyro_pvae.simulate import true_condition_means

    adata = simulate_condition(cond, seed)
    truth = adata.uns["truth"]
    t0 = time.perf_counter()
    vae = fit_condition(cond, seed, adata)
    split = vae.split
    fit_s = time.perf_counter() - t0

    s: dict[str, float] = {"fit_seconds": fit_s}
    # ---- latents of the training distribution (controls and singles)
    idx = np.flatnonzero(adata.obs["n_targets"].to_numpy() <= 1)
    lat = vae.latents(adata, idx)
    zp_true, zi_true = adata.obsm["z_pert_true"][idx], adata.obsm["z_inv_true"][idx]
    m_z = idf.mcc(zp_true, lat["z_pert"])
    s["mcc_pert"] = m_z.value
    exogenous = _exogenous(adata, idx)
    s["mcc_pert_exogenous"] = idf.mcc(exogenous, lat["z_pert"]).value
    s["mcc_exogenous_truth"] = idf.mcc(zp_true, exogenous).value  # no fit: the true exogenous latents as the estimate
    s["r2_pert"] = idf.linear_r2(lat["z_pert"], zp_true, seed=seed)
    s["r2_inv"] = idf.linear_r2(lat["z_inv"], zi_true, seed=seed)
    # information kept anywhere in the latent space: true z_inv from ALL inferred latents.
    # r2_inv_all high but r2_inv low = the information is there but in the wrong block.
    s["r2_inv_all"] = idf.linear_r2(np.hstack([lat["z_inv"], lat["z_pert"]]), zi_true, seed=seed)
    s["leak_inv_from_pert"] = idf.linear_r2(lat["z_pert"], zi_true, seed=seed)
    s["leak_pert_from_inv"] = idf.linear_r2(lat["z_inv"], zp_true, seed=seed)
    # the same from each cell's refined posterior (semi-amortised: no amortisation gap, no alignment)
    ref = vae.latents(adata, idx, refine_steps=REFINE_STEPS)
    s["mcc_pert_refined"] = idf.mcc(zp_true, ref["z_pert"]).value
    s["r2_inv_refined"] = idf.linear_r2(ref["z_inv"], zi_true, seed=seed)
    s["leak_pert_from_inv_refined"] = idf.linear_r2(ref["z_inv"], zp_true, seed=seed)
    # information check: ridge regression from the cell's log-normalised expression (no model)
    xn = _lognorm(adata.X[idx])
    s["probe_inv_from_x"] = _ridge_r2(xn, zi_true, seed)
    s["probe_pert_from_x"] = _ridge_r2(xn, zp_true, seed)
    # ---- effects (rows reordered from the model's vocabulary to the truth's perturbations)
    perts = [str(p) for p in np.asarray(truth["perturbations"])]
    rows = [vae.vocabulary.index(p) for p in perts]
    gates = np.asarray(truth["gates"], dtype=bool)
    delta_true = np.asarray(truth["delta"], dtype=np.float64)
    eff_mean = vae.module.effect_mean().detach().cpu().numpy()[rows]
    dense = cond["model"].get("effect_prior", "spike_slab") == "dense"
    score = np.abs(eff_mean) if dense else vae.pip()[rows]
    m_e = idf.match_effects(delta_true, eff_mean)
    s["effect_mcc"] = m_e.value
    ps = idf.pip_scores(score, gates, m_e)
    s["pip_f1"] = np.nan if dense else ps["f1"]
    s["pip_auprc"] = ps["auprc"]
    s["pip_f1_zmatch"] = np.nan if dense else idf.pip_scores(score, gates, m_z)["f1"]
    # ---- DAG
    W_true, W_hat = np.asarray(truth["W"]), vae.dag()
    thr = cond["dag_threshold"]
    s["shd"] = idf.shd(W_true, idf.permute_dag(W_hat, m_z), threshold=thr)["shd"]
    s["shd_effmatch"] = idf.shd(W_true, idf.permute_dag(W_hat, m_e), threshold=thr)["shd"]
    # ---- held-out doubles vs the additive baseline
    doubles = [str(d) for d in np.asarray(truth["doubles"])]
    if doubles:
        tcm = true_condition_means(adata, ["control"] + doubles, n_cells=2000, seed=seed)
        add = make_baseline("additive").fit(adata, split)
        err_m, err_a = [], []
        for d in doubles:
            true_change = tcm[d] - tcm["control"]
            pred = vae.predict_change_samples(d, n_draws=8, n_cells=250, seed=seed).mean(0)
            err_m.append(idf.rmse(pred, true_change))
            err_a.append(idf.rmse(add.predict_change(d), true_change))
        s["rmse_double_model"] = float(np.mean(err_m))
        s["rmse_double_additive"] = float(np.mean(err_a))
    else:
        s["rmse_double_model"] = s["rmse_double_additive"] = np.nan
    return [{"condition": cond["name"], "factor": cond["factor"], "level": cond["level"], "seed": int(seed),
             "score": k, "value": float(v)} for k, v in s.items()]


def _lognorm(X) -> np.ndarray:
    import scipy.sparse as sp

    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1.0) * 1e4)


def _ridge_r2(X, Y, seed: int) -> float:
    """Held-out R^2 (half / half split) of a ridge regression (penalty chosen by inner CV)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[: len(X) // 2], perm[len(X) // 2:]
    fit = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(X[tr], Y[tr])
    return float(r2_score(Y[te], fit.predict(X[te]), multioutput="variance_weighted"))


def _job(cond, seed, n_threads, rows_dir, blas_threads=1):
    rows = fit_and_score(cond, seed, n_threads, blas_threads)
    if rows_dir is not None:
        pd.DataFrame(rows).to_csv(Path(rows_dir) / f"{cond['name']}__{seed}.csv", index=False)
    return rows


# --------------------------------------------------------------------------------------------
# Study
# --------------------------------------------------------------------------------------------
def run_study(grid="small", seeds: int | None = None, out: str | os.PathLike | None = None,
              jobs: int = 1, threads: int = 1, only: list[str] | None = None, fresh: bool = False,
              figures: bool = True, progress: bool = True, blas_threads: int = 1) -> pd.DataFrame:
    """Run the grid; write results.csv, summary.md and figures into ``out``; return the rows.
    ``threads`` / ``blas_threads``: torch / BLAS threads per fit (:func:`fit_and_score`)."""
    from tqdm.auto import tqdm

    g = load_grid(grid)
    gname = grid if isinstance(grid, str) and not Path(grid).suffix else "custom"
    n_seeds = int(seeds if seeds is not None else g.get("seeds", 2))
    out = Path(out) if out is not None else REPO / "analyses" / "results" / f"identifiability_{gname}"
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    conds = resolve_conditions(g)
    if only:
        conds = [c for c in conds if c["name"] in only]
    (out / "grid.json").write_text(json.dumps({"grid": g, "seeds": n_seeds, "conditions": conds}, indent=1, default=str))
    tasks, rows = [], []
    for c in conds:
        for seed in range(n_seeds):
            f = rows_dir / f"{c['name']}__{seed}.csv"
            if f.exists() and not fresh:
                rows += pd.read_csv(f).to_dict("records")
            else:
                tasks.append((c, seed))
    bar = tqdm(total=len(tasks), desc="identifiability fits", unit="fit", disable=not progress)
    if jobs <= 1:
        for c, seed in tasks:
            bar.set_postfix_str(f"{c['name']} seed {seed}")
            rows += _job(c, seed, threads, rows_dir, blas_threads)
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_job, c, seed, threads, str(rows_dir), blas_threads): (c["name"], seed)
                    for c, seed in tasks}
            for fut in as_completed(futs):
                rows += fut.result()
                bar.set_postfix_str("%s seed %d" % futs[fut])
                bar.update()
    bar.close()
    df = pd.DataFrame(rows, columns=["condition", "factor", "level", "seed", "score", "value"])
    order = {c["name"]: i for i, c in enumerate(conds)}
    df = df.sort_values(["condition", "seed", "score"], key=lambda s: s.map(order) if s.name == "condition" else s)
    df.to_csv(out / "results.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(df, conds, g, n_seeds))
    if figures:
        make_figures(df, conds, g, out)
    return df


def summary_table(df: pd.DataFrame, conds: list[dict] | None = None) -> pd.DataFrame:
    """condition x score table of 'mean ± sd' strings over seeds."""
    agg = df.groupby(["condition", "score"])["value"].agg(["mean", "std", "count"]).reset_index()
    agg["cell"] = [f"{m:.3f} ± {s:.3f}" if c > 1 and np.isfinite(s) else (f"{m:.3f}" if np.isfinite(m) else "–")
                   for m, s, c in zip(agg["mean"], agg["std"], agg["count"])]
    tab = agg.pivot(index="condition", columns="score", values="cell")
    names = [c["name"] for c in conds] if conds else list(tab.index)
    tab = tab.reindex([n for n in names if n in tab.index])
    return tab[[s for s in SCORES if s in tab.columns]]


def summary_markdown(df: pd.DataFrame, conds: list[dict], grid: dict, n_seeds: int) -> str:
    tab = summary_table(df, conds)
    meta = {c["name"]: c for c in conds}
    lines = ["# Identifiability study", "",
             f"Mean ± sd over {n_seeds} seed(s). Higher is better except "
             f"{', '.join(sorted(LOWER_IS_BETTER - {'fit_seconds'}))}. "
             "Training: controls + singles (split `norman_discrepancy`: 5% of them validate, and half of the "
             "controls are held out unless a condition's `split` says otherwise); doubles held out. "
             f"Base simulation: `{json.dumps(grid['base'].get('sim', {}))}`; "
             f"model: `{json.dumps(grid['base'].get('model', {}))}`; "
             f"train: `{json.dumps(grid['base'].get('train', {}))}`.", ""]
    cols = list(tab.columns)
    lines.append("| condition | factor | level | " + " | ".join(cols) + " |")
    lines.append("|---|---|---|" + "---|" * len(cols))
    for name, r in tab.iterrows():
        m = meta.get(name, {"factor": "", "level": ""})
        lines.append(f"| {name} | {m['factor']} | {m['level']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    lines += ["", "Paper (without -> with alignment): MCC 0.81 -> 0.86, R^2(z_pert) 0.93 -> 0.95, "
              "R^2(z_inv) 0.66 -> 0.97.", ""]
    return "\n".join(lines)


def _means(df, score):
    g = df[df.score == score].groupby("condition")["value"]
    return g.mean(), g.std()


def make_figures(df: pd.DataFrame, conds: list[dict], grid: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    meta = {c["name"]: c for c in conds}
    K = int(grid["base"].get("sim", {}).get("n_pert_latents", 4))
    # 1. recovery vs number of environments
    env = [(int(c["sim"].get("n_singles", 12)), c["name"]) for c in conds if c["factor"] in ("n_envs", "base")]
    env = sorted(env)
    if env:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for score in ("mcc_pert", "r2_pert", "r2_inv", "pip_f1", "leak_inv_from_pert"):
            m, s = _means(df, score)
            xs = [x for x, n in env if n in m.index]
            if not xs:
                continue
            ax.errorbar(xs, [m[n] for x, n in env if n in m.index], yerr=[np.nan_to_num(s[n]) for x, n in env if n in m.index],
                        marker="o", capsize=3, label=score)
        ax.axvline(2 * K, color="grey", ls="--", lw=1, label="2 x dim(z_pert)")
        ax.set_xlabel("perturbation environments (single perturbations)")
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "recovery_vs_envs.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    def bars(names, scores, fname, title):
        names = [n for n in names if n in set(df.condition)]
        if len(names) < 1:
            return
        fig, ax = plt.subplots(figsize=(8.5, 3.5))
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            ms = [df[(df.condition == n) & (df.score == sc)]["value"].mean() for sc in scores]
            ss = [df[(df.condition == n) & (df.score == sc)]["value"].std() for sc in scores]
            ax.bar(np.arange(len(scores)) + i * w, ms, w, yerr=np.nan_to_num(ss), capsize=2,
                   label=f"{n} ({meta[n]['level']})" if n in meta else n)
        ax.set_xticks(np.arange(len(scores)) + 0.4 - w / 2, scores, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    align = ["base"] + [c["name"] for c in conds if c["factor"] == "alignment"]
    bars(align, ["mcc_pert", "r2_pert", "r2_inv", "leak_inv_from_pert", "leak_pert_from_inv"], "alignment.png",
         "with (base) / without alignment")
    prior = ["base"] + [c["name"] for c in conds if c["factor"] == "prior"]
    bars(prior, ["mcc_pert", "effect_mcc", "pip_auprc", "pip_f1", "rmse_double_model"], "prior.png",
         "spike-and-slab (base) vs dense prior")
    rotation = ["base"] + [c["name"] for c in conds if c["factor"] in ("rotation", "dag")]
    bars(rotation, ["mcc_pert", "r2_pert", "effect_mcc", "pip_auprc", "pip_f1"], "rotation.png",
         "sparse rotation (base) vs as fitted; true DAG without edges")
    signal = ["base"] + [c["name"] for c in conds if c["factor"] in ("signal", "model_capacity", "training")]
    bars(signal, ["mcc_pert", "r2_inv", "r2_inv_all", "leak_inv_from_pert", "leak_pert_from_inv"], "signal.png",
         "signal strength, z_inv capacity and training length")
    return paths


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (thread and job counts)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="small", help="small | full | path to a grid YAML")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per condition (default: the grid's)")
    ap.add_argument("--out", default=None, help="output folder (default analyses/results/identifiability_<grid>/)")
    ap.add_argument("--jobs", type=_positive_int, default=1, help="fits in parallel processes")
    ap.add_argument("--threads", type=_positive_int, default=1, help="torch threads per fit")
    ap.add_argument("--blas-threads", type=_positive_int, default=1,
                    help="numpy/scipy BLAS threads per fit (results are bitwise reproducible at equal thread counts)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these conditions")
    ap.add_argument("--fresh", action="store_true", help="ignore per-fit results of earlier runs")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    df = run_study(args.grid, args.seeds, args.out, jobs=args.jobs, threads=args.threads, only=args.only,
                   fresh=args.fresh, figures=not args.no_figures, blas_threads=args.blas_threads)
    conds = resolve_conditions(load_grid(args.grid))
    print(summary_table(df, conds).to_string())
    print(f"wall time {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
