"""Ground-truth simulator of Perturb-seq data of exactly the kind PerturbedVAE assumes.

Generative process, per cell n (see docs/ARCHITECTURE.md for the canonical AnnData form):

* invariant latents ``z_inv ~ N(0, I_D)``. Dims 0 and 1 drive a cell-cycle-like program: a
  module of genes loads on them with loadings ``amp_g * (cos phi_g, sin phi_g)``, so along the
  phase ``atan2(z_1, z_0)`` each such gene peaks at its own phase ``phi_g`` (a travelling wave
  round the circle); the other dims are sparse low-rank cell-state programs;
* perturbation latents ``z_pert = (I - W_c)^-1 (eps + shift_c)``, ``eps ~ N(0, I_K)``, ``W``
  strictly lower triangular (a DAG over the K latents), ``shift_c = sum_p u[c, p] delta[p]``
  (+ an interaction vector for some doubles), ``delta[p, k] = gate[p, k] * slab[p, k]``.
  ``W_c`` is ``W`` with the rows of hard-intervened latents zeroed (a hard intervention on a
  latent cuts its parent edges for the cells that carry that perturbation);
* gene proportions ``rho = softmax(baseline_logit + f([z_inv, z_pert]))`` with
  ``f(x) = A x + B (tanh(C x + b) - tanh(b))`` (``decoder="nonlinear"``) or ``f(x) = A x``
  (``decoder="linear"``); mean ``mu = library * rho``, ``log library ~ N(log library_median +
  sum_p u[c, p] library_effect[p], library_log_sd^2)`` (``library_effect_sd`` > 0: perturbations
  change the depth, as on real Perturb-seq panels; 0 by default);
* counts ``~ NegativeBinomial(mean mu, inverse dispersion theta_g)``.

Public API: :func:`simulate`, :data:`PRESETS`, :func:`true_condition_means`,
:func:`cached_simulation`, :func:`simulate_norman_effects`, :func:`calibrate_from_files`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.sparse as sp
from scipy.linalg import solve_triangular

from .data import CONTROL, format_condition, parse_condition
from .utils import atomic_write, lognormalize, to_dense

__all__ = [
    "PRESETS",
    "CALIBRATION",
    "simulate",
    "true_condition_means",
    "cached_simulation",
    "simulate_norman_effects",
    "calibrate_from_files",
]

_DATA_DIR = Path(__file__).resolve().parent / "datasets"
_SUBSET_FILE = _DATA_DIR / "norman19_subset.h5ad"
_EFFECTS_FILE = _DATA_DIR / "norman19_pseudobulk_effects.npz"

# ---------------------------------------------------------------------------------------------
# Calibration constants, measured on the real Norman 2019 files shipped in pyro_pvae/datasets
# (recompute with calibrate_from_files(); values below are rounded outputs of that function).
#
# * library_median_full / library_log_sd: obs['ncounts'] (whole-transcriptome UMIs per cell) of
#   norman19_subset.h5ad: median over all 3,375 cells 13,523; sd of log(ncounts) over the 100
#   control cells 0.37.  The simulator's library is the count over the *simulated panel*; we
#   assume a 5,000-HVG panel holds ~30% of a cell's UMIs (an assumption, not measured: the
#   shipped subset only has 500 genes), i.e. ~0.81 UMIs per panel gene per cell
#   (umis_per_gene = 13,523 * 0.30 / 5,000), so the default library median is
#   umis_per_gene * n_genes (~4,060 for 5,000 genes; median UMIs in the thousands; norman_like
#   control cells then have ~75% zeros and 80% of genes with mean < 1 count).
# * baseline_log_sd: sd over genes of log mean proportion (counts / ncounts, averaged over all
#   cells) for the genes of the subset detected in >= 1% of cells: 1.71.  Baseline gene
#   proportions are lognormal with this spread -> most genes have mean well under one count.
# * theta (NB inverse dispersion): method-of-moments theta = m^2 / (v - m) on the genes with
#   mean > 0.05 of the subset: median ~1.4 (control cells) to 1.8 (all cells), log-sd ~1.7
#   (largely estimation noise on so few cells).  Part of the real overdispersion comes from
#   cell-state variation, which the simulator produces through the latents, so the
#   NB theta is drawn lognormal with median 8.0 and log-sd 1.0, chosen so that the naive moment
#   estimates on simulated norman_like control cells (median ~1.1) land near the real ones
#   (1.4-1.8); the tests check the range 0.5-4.
# * single effects: lfc_s of norman19_pseudobulk_effects.npz (log1p CPM change, 2,000 HVGs):
#   per-single RMS over genes has median 0.34 (IQR 0.26-0.45; the 10% quantile 0.21 is mostly
#   the pseudobulk noise floor), so the noiseless signal is ~0.25-0.3 RMS; median 1,449 of
#   2,000 genes change by > 0.1.  Decoder scales (pert_scale = inv_scale = 0.12 logit per latent
#   unit) and effect_size = 1.5 are set so that the noiseless simulated single effects
#   (log1p CPM of the expected pseudobulk, norman_like, seed 0) have median RMS 0.32
#   (10%-90%: 0.20-0.51) with 67% of genes moving by > 0.1 -- comparable to the real values.
# ---------------------------------------------------------------------------------------------
CALIBRATION: dict[str, float] = {
    "library_median_full": 13523.0,
    "library_log_sd": 0.37,
    "panel_fraction_5000": 0.30,  # assumption, see above
    "umis_per_gene": 13523.0 * 0.30 / 5000.0,
    "baseline_log_sd": 1.71,
    "theta_naive_median": 1.6,
    "theta_median": 8.0,
    "theta_log_sd": 1.0,
    "single_effect_rms_median": 0.34,
    "single_effect_n_gt_0p1_frac": 1449.0 / 2000.0,
}


def calibrate_from_files(subset_path: str | os.PathLike | None = None,
                         effects_path: str | os.PathLike | None = None) -> dict[str, float]:
    """Recompute the calibration statistics from the shipped real Norman 2019 files."""
    import anndata as ad

    a = ad.read_h5ad(subset_path or _SUBSET_FILE)
    X = to_dense(a.X, np.float64)
    nc = a.obs["ncounts"].to_numpy(dtype=np.float64)
    ctrl = (a.obs["condition"] == CONTROL).to_numpy()
    out: dict[str, float] = {}
    out["library_median_full"] = float(np.median(nc))
    out["library_log_sd"] = float(np.log(nc[ctrl]).std())
    out["subset_umis_median_control"] = float(np.median(X[ctrl].sum(1)))
    out["subset_zero_fraction_control"] = float((X[ctrl] == 0).mean())
    det = (X > 0).mean(0)
    prop = (X / nc[:, None]).mean(0)
    out["baseline_log_sd"] = float(np.log(prop[det >= 0.01]).std())

    def _theta(M):
        m, v = M.mean(0), M.var(0)
        ok = (m > 0.05) & (v > m)
        th = m[ok] ** 2 / (v[ok] - m[ok])
        return th

    out["theta_naive_median_control"] = float(np.median(_theta(X[ctrl])))
    th_all = _theta(X)
    out["theta_naive_median_all"] = float(np.median(th_all))
    out["theta_naive_log_sd_all"] = float(np.log(th_all).std())
    e = np.load(effects_path or _EFFECTS_FILE, allow_pickle=True)
    L = np.asarray(e["lfc_s"], dtype=np.float64)
    rms = np.sqrt((L ** 2).mean(1))
    out["single_effect_rms_median"] = float(np.median(rms))
    out["single_effect_rms_q10"] = float(np.quantile(rms, 0.1))
    out["single_effect_rms_q90"] = float(np.quantile(rms, 0.9))
    out["single_effect_n_gt_0p1_frac"] = float(np.median((np.abs(L) > 0.1).sum(1)) / L.shape[1])
    return out


# ---------------------------------------------------------------------------------------------
# Presets / config
# ---------------------------------------------------------------------------------------------
_DEFAULTS: dict[str, Any] = dict(
    n_genes=200,
    n_inv_latents=4,          # D
    n_pert_latents=4,         # K
    n_singles=12,             # P
    n_doubles=10,
    cells_per_single=60,
    cells_per_double=60,
    n_control=300,
    gate_prob=0.3,
    effect_size=1.5,
    effect_noise=0.1,
    edge_prob=0.4,
    intervention_coverage=True,
    interaction_fraction=0.3,
    interaction_size=1.0,
    decoder="nonlinear",
    n_hidden=32,
    pert_scale=0.12,          # RMS over genes of the logit change per unit of a z_pert coordinate
    inv_scale=0.12,           # same for z_inv coordinates (non-cell-cycle programs)
    cell_cycle_fraction=0.1,
    cell_cycle_amplitude=0.5,
    nonlinear_ratio=1.0,      # Jacobian RMS of the tanh part relative to the linear part
    hidden_gain=1.5,
    library_median=None,      # None -> CALIBRATION['umis_per_gene'] * n_genes
    library_log_sd=CALIBRATION["library_log_sd"],
    library_effect_sd=0.0,    # sd of each perturbation's effect lambda_p on the log library size (0: depth
                              # does not depend on the condition; doubles add their singles' lambda)
    baseline_log_sd=CALIBRATION["baseline_log_sd"],
    theta_median=CALIBRATION["theta_median"],
    theta_log_sd=CALIBRATION["theta_log_sd"],
    chunk_size=4000,
    n_threads=2,              # conditions drawn in parallel threads (numpy releases the GIL)
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_DEFAULTS),
    "norman_like": dict(
        _DEFAULTS,
        n_genes=5000,
        n_inv_latents=10,
        n_pert_latents=10,
        n_singles=100,
        n_doubles=130,
        cells_per_single=300,
        cells_per_double=150,
        n_control=10000,
        edge_prob=0.25,
        n_hidden=64,
    ),
}


def _config(preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset])
    bad = sorted(set(overrides) - set(cfg))
    if bad:
        raise ValueError(f"unknown override key(s) {bad}; valid keys: {sorted(cfg)}")
    cfg.update(overrides)
    if cfg["decoder"] not in ("linear", "nonlinear"):
        raise ValueError(f"decoder must be 'linear' or 'nonlinear', got {cfg['decoder']!r}")
    if not cfg["library_effect_sd"] >= 0:
        raise ValueError(f"library_effect_sd must be >= 0 (0: depth independent of the condition), "
                         f"got {cfg['library_effect_sd']!r}")
    if cfg["n_doubles"] > cfg["n_singles"] * (cfg["n_singles"] - 1) // 2:
        raise ValueError("n_doubles exceeds the number of distinct pairs of singles")
    if cfg["library_median"] is None:
        cfg["library_median"] = CALIBRATION["umis_per_gene"] * cfg["n_genes"]
    return cfg


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------
def _sample_nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray,
               hi_threshold: float = 4.0) -> sp.csr_matrix:
    """Exact NB(mean mu, inverse dispersion theta) draws, returned as CSR float32.

    The NB is the Gamma-Poisson mixture ``Poisson(Gamma(theta, mu / theta))``.  Entries with
    ``mu > hi_threshold`` (a few highly expressed genes) are drawn exactly that way with numpy;
    the many low-mean entries, mostly zeros, are drawn faster by inverse CDF: one uniform ``u``
    per entry is compared with ``P(0) = (theta / (theta + mu))^theta`` and the few non-zero
    ones are resolved by the pmf recursion ``P(k) = P(k-1) (k-1+theta)/k mu/(theta+mu)``
    (the count is the smallest ``k`` with ``CDF(k) >= u``).  Both are exact NB draws.
    """
    n, g = mu.shape
    mu = np.asarray(mu, dtype=np.float32)
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), (g,))
    th32 = theta.astype(np.float32)
    u = rng.random((n, g), dtype=np.float32)
    lp0 = np.log1p(mu / th32)
    lp0 *= -th32                                  # log P(0)
    hi = mu > hi_threshold
    nz = np.log(np.maximum(u, 1e-30)) > lp0
    nz &= ~hi
    r, c = np.nonzero(nz)
    m = mu[r, c].astype(np.float64)
    th = theta[c]
    uu = u[r, c].astype(np.float64)
    pk = np.exp(-th * np.log1p(m / th))
    cdf = pk.copy()
    ratio = m / (th + m)
    k = np.zeros(r.size, dtype=np.float32)
    idx = np.arange(r.size)
    kk = 0
    while idx.size:
        kk += 1
        pk = pk * ((kk - 1 + th) / kk) * ratio
        cdf += pk
        # (the cap only matters if rounding leaves the CDF a hair below u far in the tail)
        done = (cdf >= uu) | (kk >= 20 * (m + 10))
        k[idx[done]] = kk
        keep = ~done
        idx, pk, cdf, th, ratio, uu, m = (a[keep] for a in (idx, pk, cdf, th, ratio, uu, m))
    rh, ch = np.nonzero(hi)
    if rh.size:
        mh = mu[rh, ch].astype(np.float64)
        kh = rng.poisson(rng.gamma(theta[ch], mh / theta[ch])).astype(np.float32)
        r = np.concatenate([r, rh])
        c = np.concatenate([c, ch])
        k = np.concatenate([k, kh])
    out = sp.csr_matrix((k, (r, c)), shape=(n, g), dtype=np.float32)
    out.eliminate_zeros()  # (Gamma-Poisson draws of the high-mean entries can be 0)
    return out


# ---------------------------------------------------------------------------------------------
# Truth construction
# ---------------------------------------------------------------------------------------------
def _heavy(rng: np.random.Generator, shape) -> np.ndarray:
    """Heavy-tailed loadings: normal times a lognormal scale (real effects are heavy tailed)."""
    return rng.normal(size=shape) * np.exp(rng.normal(0.0, 0.75, size=shape))


def _col_rms_normalise(M: np.ndarray, target: float) -> np.ndarray:
    rms = np.sqrt((M ** 2).mean(0, keepdims=True))
    return M * (target / np.where(rms > 0, rms, 1.0))


def _make_truth(cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    G, D, K, P = cfg["n_genes"], cfg["n_inv_latents"], cfg["n_pert_latents"], cfg["n_singles"]
    if P > G:
        raise ValueError("n_singles must not exceed n_genes (perturbations target panel genes)")
    genes = np.array([f"G{i + 1:04d}" for i in range(G)])
    perts = genes[:P].copy()  # targeted genes are measured (like CRISPRa targets in the panel)

    # --- sparse effects: gates and slabs
    gates = rng.random((P, K)) < cfg["gate_prob"]
    for p in np.flatnonzero(~gates.any(1)):
        gates[p, rng.integers(K)] = True
    slab = cfg["effect_size"] * (1.0 + cfg["effect_noise"] * rng.normal(size=(P, K)))
    slab *= rng.choice([-1.0, 1.0], size=(P, K))
    # --- hard interventions (cut parent edges of the latents listed in hard_targets)
    hard_targets = np.zeros((P, K), dtype=bool)
    if cfg["intervention_coverage"]:
        order = rng.permutation(P)
        for k in range(K):
            p = order[k % P]
            gates[p, k] = True
            hard_targets[p, k] = True
    delta = np.where(gates, slab, 0.0)
    # --- DAG over the K latents
    W = np.zeros((K, K))
    low = np.tril(np.ones((K, K), dtype=bool), -1)
    edges = low & (rng.random((K, K)) < cfg["edge_prob"])
    W[edges] = rng.uniform(0.5, 1.0, size=edges.sum()) * rng.choice([-1.0, 1.0], size=edges.sum())
    # --- doubles, with optional non-additive interactions
    nd = cfg["n_doubles"]
    pairs_all = np.array([(i, j) for i in range(P) for j in range(i + 1, P)], dtype=np.int64)
    pairs = pairs_all[np.sort(rng.choice(len(pairs_all), size=nd, replace=False))] if nd else \
        np.zeros((0, 2), dtype=np.int64)
    has_int = rng.random(nd) < cfg["interaction_fraction"]
    inter = np.zeros((nd, K))
    if has_int.any():
        v = rng.normal(size=(int(has_int.sum()), K))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        inter[has_int] = cfg["interaction_size"] * v
    doubles = [format_condition((perts[i], perts[j])) for i, j in pairs]

    # --- decoder
    Din = D + K
    A = np.zeros((G, Din))
    if D >= 2:
        cc = rng.random(G) < cfg["cell_cycle_fraction"]
        phase = rng.uniform(0, 2 * np.pi, size=G)
        amp = cfg["cell_cycle_amplitude"] * np.exp(0.3 * rng.normal(size=G))
        A[cc, 0] = amp[cc] * np.cos(phase[cc])
        A[cc, 1] = amp[cc] * np.sin(phase[cc])
        n_cc_dims = 2
    else:
        cc = np.zeros(G, dtype=bool)
        phase = np.zeros(G)
        n_cc_dims = 0
    if D > n_cc_dims:
        Ainv = _heavy(rng, (G, D - n_cc_dims)) * (rng.random((G, D - n_cc_dims)) < 0.3)
        A[:, n_cc_dims:D] = _col_rms_normalise(Ainv, cfg["inv_scale"])
    A[:, D:] = _col_rms_normalise(_heavy(rng, (G, K)), cfg["pert_scale"])
    H = cfg["n_hidden"]
    if cfg["decoder"] == "nonlinear":
        C = rng.normal(size=(H, Din)) * cfg["hidden_gain"] / np.sqrt(Din)
        b = rng.normal(0.0, 0.5, size=H)
        B = _heavy(rng, (G, H))
        J = B @ ((1 - np.tanh(b) ** 2)[:, None] * C)      # Jacobian of the tanh part at 0
        lin_rms = np.sqrt((A ** 2).mean())
        nl_rms = np.sqrt((J ** 2).mean())
        B *= cfg["nonlinear_ratio"] * lin_rms / nl_rms
    else:
        C = np.zeros((H, Din))
        b = np.zeros(H)
        B = np.zeros((G, H))
    base = rng.normal(0.0, cfg["baseline_log_sd"], size=G)
    base -= np.log(np.exp(base - base.max()).sum()) + base.max()   # log-proportions at z = 0
    theta = np.exp(np.log(cfg["theta_median"]) + cfg["theta_log_sd"] * rng.normal(size=G))
    # drawn last, and only when asked for: the other draws (and so every earlier simulation) are unchanged
    library_effect = rng.normal(0.0, cfg["library_effect_sd"], size=P) if cfg["library_effect_sd"] > 0 \
        else np.zeros(P)

    return {
        "genes": genes,
        "perturbations": perts,
        "gates": gates,
        "delta": delta,
        "W": W,
        "hard_targets": hard_targets,
        "hard_interventions": hard_targets.any(1),
        "doubles": np.array(doubles, dtype=object).astype(str) if nd else np.array([], dtype=str),
        "double_pairs": pairs,
        "interaction": inter,
        "has_interaction": has_int,
        "decoder_kind": cfg["decoder"],
        "decoder_A": A,
        "decoder_B": B,
        "decoder_C": C,
        "decoder_b": b,
        "baseline_logit": base,
        "theta": theta,
        "cell_cycle_genes": cc,
        "cell_cycle_phase": phase,
        "library_median": float(cfg["library_median"]),
        "library_log_sd": float(cfg["library_log_sd"]),
        "library_effect": library_effect,
        "n_inv_latents": int(D),
        "n_pert_latents": int(K),
    }


def _target_rows(truth: Mapping[str, Any], label: str) -> list[int]:
    """Rows of the truth's perturbation arrays for the targets of a canonical condition label."""
    idx = {str(p): i for i, p in enumerate(np.asarray(truth["perturbations"]))}
    rows = []
    for t in parse_condition(label):
        if t not in idx:
            raise KeyError(f"condition {label!r}: {t!r} is not a simulated perturbation")
        rows.append(idx[t])
    return rows


def condition_library_shift(truth: Mapping[str, Any], label: str) -> float:
    """The condition's shift of the log library size: the sum of its targets' ``library_effect``."""
    effect = truth.get("library_effect")
    if effect is None:  # a truth simulated before library effects existed
        return 0.0
    return float(np.asarray(effect, dtype=np.float64)[_target_rows(truth, label)].sum())


def condition_spec(truth: Mapping[str, Any], label: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift vector, W_c) of a canonical condition label under the truth."""
    W = np.asarray(truth["W"], dtype=np.float64)
    K = W.shape[0]
    rows = _target_rows(truth, label)
    shift = np.zeros(K)
    Wc = W.copy()
    delta = np.asarray(truth["delta"], dtype=np.float64)
    hard = np.asarray(truth["hard_targets"], dtype=bool)
    for r in rows:
        shift += delta[r]
        Wc[hard[r], :] = 0.0
    if len(rows) == 2:
        dbl = [str(d) for d in np.asarray(truth["doubles"])]
        if label in dbl:
            shift += np.asarray(truth["interaction"], dtype=np.float64)[dbl.index(label)]
    elif len(rows) > 2:
        raise ValueError(f"only singles and doubles are simulated, got {label!r}")
    return shift, Wc


def _decode_logits(truth: Mapping[str, Any], z: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Gene logits ``baseline_logit + f(z)`` for latents ``z = [z_inv, z_pert]`` (n x (D+K))."""
    A = np.asarray(truth["decoder_A"])
    feats, mats = [z], [A]
    if str(truth["decoder_kind"]) == "nonlinear":
        C, b, B = (np.asarray(truth[k]) for k in ("decoder_C", "decoder_b", "decoder_B"))
        feats.append(np.tanh(z @ C.T + b) - np.tanh(b))
        mats.append(B)
    F = np.hstack(feats).astype(dtype)
    M = np.hstack(mats).astype(dtype)
    out = F @ M.T
    out += np.asarray(truth["baseline_logit"]).astype(dtype)
    return out


def _draw_cells(truth: Mapping[str, Any], label: str, n: int, rng: np.random.Generator,
                chunk_size: int = 4000):
    """Draw n cells of one condition: returns (counts CSR, z_inv, z_pert, eps, library)."""
    D, K = int(truth["n_inv_latents"]), int(truth["n_pert_latents"])
    shift, Wc = condition_spec(truth, label)
    IminusW = np.eye(K) - Wc
    theta = np.asarray(truth["theta"], dtype=np.float64)
    log_library = np.log(truth["library_median"]) + condition_library_shift(truth, label)
    mats, zi, zp, ep, libs = [], [], [], [], []
    for s in range(0, n, chunk_size):
        m = min(chunk_size, n - s)
        z_inv = rng.normal(size=(m, D))
        eps = rng.normal(size=(m, K))
        z_pert = solve_triangular(IminusW, (eps + shift).T, lower=True).T
        logits = _decode_logits(truth, np.hstack([z_inv, z_pert]), np.float32)
        logits -= logits.max(1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(1, keepdims=True)
        lib = np.exp(log_library + truth["library_log_sd"] * rng.normal(size=m))
        mu = logits * lib[:, None].astype(np.float32)
        mats.append(_sample_nb(rng, mu, theta))
        zi.append(z_inv)
        zp.append(z_pert)
        ep.append(eps)
        libs.append(lib)
    return sp.vstack(mats, format="csr"), np.vstack(zi), np.vstack(zp), np.vstack(ep), np.concatenate(libs)


def _to_uns(d: Mapping[str, Any]) -> dict[str, Any]:
    """Make a dict h5ad-writable: numpy arrays, python scalars and strings only (no None)."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            out[k] = _to_uns(v)
        elif isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (list, tuple)):
            arr = np.asarray(v)
            out[k] = arr.astype(str) if arr.dtype.kind in "OU" else arr
        elif isinstance(v, np.ndarray) and v.dtype.kind == "O":
            out[k] = v.astype(str)
        else:
            out[k] = v
    return out


def simulate(preset: str = "tiny", seed: int = 0, **overrides: Any):
    """Simulate a Perturb-seq data set from the PerturbedVAE generative model, keeping the truth.

    Parameters
    ----------
    preset : ``"tiny"`` (tests; < 2 s) or ``"norman_like"`` (Norman 2019 sized).
    seed : random seed; the output is a deterministic function of (preset, seed, overrides).
    **overrides : any key of ``PRESETS[preset]`` (sizes, ``gate_prob``, ``effect_size``,
        ``edge_prob``, ``intervention_coverage``, ``interaction_fraction``,
        ``interaction_size``, ``decoder`` in {"linear", "nonlinear"}, ...).  Unknown keys
        raise ``ValueError`` listing the valid keys.

    Returns
    -------
    AnnData in canonical form (CSR float32 counts, gene names ``G0001``..., obs['condition'],
    obs['n_targets']) with ``uns['truth']`` (perturbations, delta, gates, W, hard_targets,
    hard_interventions, doubles, double_pairs, interaction, decoder params, theta,
    baseline_logit, ...), ``uns['simulation']`` (preset, seed, all sizes) and
    ``obsm['z_inv_true']``, ``obsm['z_pert_true']``, ``obsm['eps_true']``; obs also holds
    ``library_true`` (the library size used for the NB mean).
    """
    import anndata as ad
    import pandas as pd

    cfg = _config(preset, overrides)
    rng = np.random.default_rng(seed)
    truth = _make_truth(cfg, rng)
    conds = [CONTROL] * 1 + [str(p) for p in truth["perturbations"]] + list(truth["doubles"])
    sizes = [cfg["n_control"]] + [cfg["cells_per_single"]] * cfg["n_singles"] + \
        [cfg["cells_per_double"]] * cfg["n_doubles"]
    todo = [(i, label, n) for i, (label, n) in enumerate(zip(conds, sizes)) if n > 0]

    def _one(item):
        i, label, n = item
        # one independent stream per condition: deterministic whatever the thread schedule
        return _draw_cells(truth, label, n, np.random.default_rng([seed, 1 + i]), cfg["chunk_size"])

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, int(cfg["n_threads"]))) as ex:
        results = list(ex.map(_one, todo))
    labels = [label for _, label, _ in todo]
    mats, zi, zp, ep, libs = (list(x) for x in zip(*results))
    X = sp.vstack(mats, format="csr").astype(np.float32)
    obs_cond = np.repeat(labels, [m.shape[0] for m in mats])
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(obs_cond, categories=labels),
            "n_targets": np.array([len(parse_condition(c)) for c in obs_cond], dtype=np.int64),
            "library_true": np.concatenate(libs),
        },
        index=[f"cell{i}" for i in range(X.shape[0])],
    )
    var = pd.DataFrame(index=pd.Index(truth["genes"], name=None))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["z_inv_true"] = np.vstack(zi)
    adata.obsm["z_pert_true"] = np.vstack(zp)
    adata.obsm["eps_true"] = np.vstack(ep)
    tr = dict(truth)
    tr.pop("genes")
    adata.uns["truth"] = _to_uns(tr)
    sim = {k: v for k, v in cfg.items()}
    sim.update(preset=preset, seed=int(seed))
    adata.uns["simulation"] = _to_uns(sim)
    return adata


# ---------------------------------------------------------------------------------------------
# Truth-derived targets
# ---------------------------------------------------------------------------------------------
def true_condition_means(adata_or_truth, conditions: Iterable[str], n_cells: int = 2000,
                         seed: int = 0, mode: str = "counts") -> dict[str, np.ndarray]:
    """Expected log-normalised mean expression of each condition under the true model.

    ``mode="counts"`` (default): draw ``n_cells`` cells of the condition from the generative
    process (fresh z_inv, eps, library sizes, NB counts) and average
    ``log1p(counts / total * 1e4)`` -- the same transform as ``layers['lognorm']`` of observed
    data, so it is the target a perfect predictor of observed cells would hit.
    ``mode="expected"``: average ``log1p(1e4 * rho)`` over the cells (no count noise).
    Works for the output of :func:`simulate` (or its ``uns['truth']`` dict).  For
    :func:`simulate_norman_effects` data use ``uns['truth']['true_delta_log1p_cpm']``.
    """
    truth = adata_or_truth.uns["truth"] if hasattr(adata_or_truth, "uns") else adata_or_truth
    if "decoder_A" not in truth:
        raise ValueError("true_condition_means needs the truth of simulate()")
    out = {}
    for i, label in enumerate(conditions):
        rng = np.random.default_rng([seed, 7919, i])
        if mode == "counts":
            X, *_ = _draw_cells(truth, label, n_cells, rng)
            out[label] = np.asarray(lognormalize(X, dtype=np.float64).mean(0)).ravel()
        elif mode == "expected":
            out[label] = np.log1p(1e4 * _noiseless_proportions(truth, label, n_cells, rng)).mean(0)
        else:
            raise ValueError("mode must be 'counts' or 'expected'")
    return out


def _noiseless_proportions(truth, label, n_cells, rng) -> np.ndarray:
    """Gene proportions rho (n_cells x G) of fresh latent draws of a condition (no count noise)."""
    D, K = int(truth["n_inv_latents"]), int(truth["n_pert_latents"])
    shift, Wc = condition_spec(truth, label)
    z_inv = rng.normal(size=(n_cells, D))
    eps = rng.normal(size=(n_cells, K))
    z_pert = solve_triangular(np.eye(K) - Wc, (eps + shift).T, lower=True).T
    lg = _decode_logits(truth, np.hstack([z_inv, z_pert]))
    lg -= lg.max(1, keepdims=True)
    rho = np.exp(lg)
    return rho / rho.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
# the cache key includes a hash of this file, so a changed simulator never serves stale data
_CACHE_VERSION = "simulate-v1-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def cached_simulation(preset: str = "tiny", seed: int = 0, cache_dir: str | os.PathLike | None = None,
                      **overrides: Any):
    """:func:`simulate` with an on-disk h5ad cache keyed by a hash of the arguments.

    ``cache_dir`` defaults to ``$PYRO_PVAE_CACHE`` or ``~/.cache/pyro_pvae``.  Writes are atomic
    (``utils.atomic_write``: unique temporary file in the same folder, then ``os.replace``).
    """
    import anndata as ad

    _config(preset, overrides)  # validate early
    if cache_dir is None:
        cache_dir = os.environ.get("PYRO_PVAE_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "pyro_pvae")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = json.dumps({"v": _CACHE_VERSION, "preset": preset, "seed": int(seed),
                      "overrides": {k: overrides[k] for k in sorted(overrides)}},
                     sort_keys=True, default=str)
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir / f"sim_{preset}_{seed}_{h}.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    adata = simulate(preset, seed, **overrides)
    atomic_write(path, adata.write_h5ad)
    return adata


# ---------------------------------------------------------------------------------------------
# Semi-synthetic data with the real Norman 2019 effects
# ---------------------------------------------------------------------------------------------
def simulate_norman_effects(seed: int = 0, n_cells_per_condition: int = 50, n_control: int = 1000,
                            n_genes: int | None = None, tiny: bool = False,
                            conditions: Iterable[str] | None = None, include_doubles: bool = True,
                            n_inv_latents: int = 4, inv_scale: float = 0.12,
                            library_median: float | None = None,
                            library_log_sd: float = CALIBRATION["library_log_sd"],
                            baseline_log_sd: float = CALIBRATION["baseline_log_sd"],
                            theta_median: float = CALIBRATION["theta_median"],
                            theta_log_sd: float = CALIBRATION["theta_log_sd"],
                            effects_path: str | os.PathLike | None = None):
    """Cell-level data whose perturbation effects are the REAL Norman 2019 pseudobulk changes.

    Source: ``norman19_pseudobulk_effects.npz`` (``lfc_s`` 104 singles, ``lfc_d`` 130 doubles,
    over 2,000 HVGs).  Its values are differences of log1p(CPM) of pseudobulk means:
    ``lfc[c, g] = log1p(CPM_c[g]) - log1p(CPM_ctrl[g])``.

    Construction:

    1. Baseline: per-gene control proportions drawn lognormal (``baseline_log_sd``, calibrated
       on the real cells, see :data:`CALIBRATION`) and scaled to ``CPM_ctrl`` (sum 1e6 over the
       panel).  For consistency with the file, each gene's baseline is raised where needed so
       that ``log1p(CPM_ctrl[g]) >= max_c(-lfc[c, g]) + 0.05`` (no condition would need a
       negative CPM), and rescaled to sum 1e6 (iterated to a fixed point).
    2. Each condition: ``CPM_c = clip(expm1(log1p(CPM_ctrl) + lfc_c), 0)``, then
       ``rho_c = CPM_c / sum(CPM_c)`` (renormalised proportions; the renormalisation changes the
       realised change by one global log factor per condition, small in practice;
       ``uns['truth']['realized_delta_log1p_cpm']`` holds the exact realised targets).
    3. Cells: invariant cell-state variation ``z_inv ~ N(0, I_D)`` through sparse gene loadings
       (mean-preserving: ``log rho_cell = log rho_c + A z - 0.5 sum_d A^2``, renormalised),
       lognormal library sizes (median ``library_median``, default
       ``CALIBRATION['umis_per_gene'] * n_genes``), NB counts with lognormal ``theta_g``.

    Conditions: all 104 singles and the doubles with ``comp_ok`` (both singles present; 126),
    labels canonical (pair names sorted).  ``tiny=True``: 300 genes (unless ``n_genes`` is
    given) and six complete doubles with their singles.  ``conditions`` restricts to a list of
    canonical labels.  ``n_genes``: a random (seeded) subset of the 2,000 genes.

    ``uns['truth']``: ``conditions`` (labels, rows of the arrays), ``true_delta_log1p_cpm``
    (the file's values, the targets to score against), ``realized_delta_log1p_cpm``,
    ``singles``, ``doubles``, ``comp_ok`` (for the doubles included: all True),
    ``file_doubles`` / ``file_comp_ok`` (the whole file), ``baseline_cpm``, ``theta``,
    ``inv_loadings``.
    """
    import anndata as ad
    import pandas as pd

    e = np.load(effects_path or _EFFECTS_FILE, allow_pickle=True)
    genes_all = np.asarray(e["genes_hvg"]).astype(str)
    sing = [format_condition(parse_condition(str(s))) for s in e["sing_labels"]]
    doub_file = [format_condition(str(d).split("+")) for d in e["doub_labels"]]
    comp_ok = np.asarray(e["comp_ok"], dtype=bool)
    lfc_s = np.asarray(e["lfc_s"], dtype=np.float64)
    lfc_d = np.asarray(e["lfc_d"], dtype=np.float64)
    rng = np.random.default_rng([seed, 31337])

    labels = list(sing)
    effects = list(lfc_s)
    if include_doubles:
        for d, ok, row in zip(doub_file, comp_ok, lfc_d):
            if ok:
                labels.append(d)
                effects.append(row)
    effects = np.vstack(effects)
    if conditions is not None:
        want = [format_condition(parse_condition(c)) for c in conditions]
        miss = [c for c in want if c not in labels]
        if miss:
            raise ValueError(f"conditions not in the effects file (or not complete doubles): {miss}")
        keep = [labels.index(c) for c in want]
    elif tiny:
        dbl = [i for i, c in enumerate(labels) if len(parse_condition(c)) == 2][:6]
        sgl = sorted({labels.index(s) for i in dbl for s in parse_condition(labels[i])})
        keep = sgl + dbl
    else:
        keep = list(range(len(labels)))
    labels = [labels[i] for i in keep]
    effects = effects[keep]
    if tiny and n_genes is None:
        n_genes = 300
    G_all = len(genes_all)
    gidx = np.arange(G_all) if n_genes is None else np.sort(rng.choice(G_all, size=int(n_genes), replace=False))
    genes = genes_all[gidx]
    effects = effects[:, gidx]
    G = len(genes)

    # 1. baseline CPM, consistent with the largest decreases in the file
    floor = np.expm1(np.maximum(0.0, -effects.min(0)) + 0.05)
    cpm0 = np.exp(rng.normal(0.0, baseline_log_sd, size=G))
    cpm0 *= 1e6 / cpm0.sum()
    for _ in range(100):
        cpm0 = np.maximum(cpm0, floor)
        cpm0 *= 1e6 / cpm0.sum()
        if np.all(cpm0 >= floor * (1 - 1e-9)):
            break
    # 2. condition proportions
    rho = {CONTROL: cpm0 / cpm0.sum()}
    for lab, row in zip(labels, effects):
        cpm_c = np.clip(np.expm1(np.log1p(cpm0) + row), 0.0, None)
        rho[lab] = cpm_c / cpm_c.sum()
    realized = np.vstack([np.log1p(1e6 * rho[l]) - np.log1p(1e6 * rho[CONTROL]) for l in labels])
    # 3. cells
    D = int(n_inv_latents)
    A = _col_rms_normalise(_heavy(rng, (G, D)) * (rng.random((G, D)) < 0.3), inv_scale)
    corr = 0.5 * (A ** 2).sum(1)
    theta = np.exp(np.log(theta_median) + theta_log_sd * rng.normal(size=G))
    if library_median is None:
        library_median = CALIBRATION["umis_per_gene"] * G
    all_labels = [CONTROL] + labels
    sizes = [int(n_control)] + [int(n_cells_per_condition)] * len(labels)
    mats, zs, obs_cond = [], [], []
    for i, (lab, n) in enumerate(zip(all_labels, sizes)):
        if n <= 0:
            continue
        crng = np.random.default_rng([seed, 2, i])
        logr = np.log(np.maximum(rho[lab], 1e-300))
        for s in range(0, n, 4000):
            m = min(4000, n - s)
            z = crng.normal(size=(m, D))
            lg = (z @ A.T + (logr - corr)).astype(np.float32)
            lg -= lg.max(1, keepdims=True)
            np.exp(lg, out=lg)
            lg[:, rho[lab] == 0] = 0.0
            lg /= lg.sum(1, keepdims=True)
            lib = np.exp(np.log(library_median) + library_log_sd * crng.normal(size=m))
            mats.append(_sample_nb(crng, lg * lib[:, None].astype(np.float32), theta))
            zs.append(z)
            obs_cond += [lab] * m
    X = sp.vstack(mats, format="csr").astype(np.float32)
    present = [l for l, n in zip(all_labels, sizes) if n > 0]
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(obs_cond, categories=present),
            "n_targets": np.array([len(parse_condition(c)) for c in obs_cond], dtype=np.int64),
        },
        index=[f"cell{i}" for i in range(X.shape[0])],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["z_inv_true"] = np.vstack(zs)
    singles = [l for l in labels if len(parse_condition(l)) == 1]
    doubles = [l for l in labels if len(parse_condition(l)) == 2]
    adata.uns["truth"] = _to_uns({
        "conditions": labels,
        "true_delta_log1p_cpm": effects,
        "realized_delta_log1p_cpm": realized,
        "singles": singles,
        "doubles": doubles,
        "comp_ok": np.ones(len(doubles), dtype=bool),
        "file_doubles": doub_file,
        "file_comp_ok": comp_ok,
        "baseline_cpm": cpm0,
        "theta": theta,
        "inv_loadings": A,
    })
    adata.uns["simulation"] = _to_uns({
        "kind": "norman_effects", "seed": int(seed),
        "n_cells_per_condition": int(n_cells_per_condition), "n_control": int(n_control),
        "n_genes": int(G), "tiny": bool(tiny), "n_inv_latents": D, "inv_scale": float(inv_scale),
        "library_median": float(library_median), "library_log_sd": float(library_log_sd),
        "baseline_log_sd": float(baseline_log_sd), "theta_median": float(theta_median),
        "theta_log_sd": float(theta_log_sd), "include_doubles": bool(include_doubles),
    })
    return adata
