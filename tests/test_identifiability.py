"""Recovery scores on constructed cases, and one tiny end-to-end study cell."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyro_pvae import identifiability as idf

REPO = Path(__file__).resolve().parents[1]


def _analysis(name: str):
    """The script analyses/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", REPO / "analyses" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _study():
    return _analysis("identifiability")


# ---------------------------------------------------------------------------- MCC
def test_mcc_permuted_rescaled_copy_is_one():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 4))
    perm = np.array([2, 0, 3, 1])
    z_hat = z[:, perm] * np.array([3.0, -0.5, 2.0, -7.0]) + 5.0
    m = idf.mcc(z, z_hat)
    assert m.value == pytest.approx(1.0)
    # true k is matched with the inferred column that holds it
    np.testing.assert_array_equal(m.as_permutation(4), np.argsort(perm))
    np.testing.assert_array_equal(m.sign[np.argsort(m.true_idx)], np.sign([-0.5, -7.0, 3.0, 2.0]))


def test_mcc_independent_noise_near_zero():
    rng = np.random.default_rng(1)
    m = idf.mcc(rng.normal(size=(5000, 3)), rng.normal(size=(5000, 3)))
    assert m.value < 0.05


def test_mcc_rectangular_and_constant_column():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, 2))
    z_hat = np.column_stack([np.ones(300), z[:, 1], rng.normal(size=300), z[:, 0]])
    m = idf.mcc(z, z_hat)
    assert m.value == pytest.approx(1.0)
    assert list(m.as_permutation(2)) == [3, 1]


# ---------------------------------------------------------------------------- R^2
def test_linear_r2_recovers_linear_map_and_detects_independence():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2000, 3))
    A = rng.normal(size=(3, 3))
    assert idf.linear_r2(z @ A + 1.0, z) == pytest.approx(1.0, abs=1e-8)
    assert abs(idf.linear_r2(rng.normal(size=(2000, 3)), z)) < 0.02
    # half the variance explained
    y = z[:, :1] + rng.normal(size=(2000, 1))
    assert idf.linear_r2(z[:, :1], y) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("score", ["linear_r2", "nonlinear_r2"])
def test_r2_scores_refuse_mismatched_or_too_few_rows(score):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="row counts differ: 50 vs 40"):
        getattr(idf, score)(rng.normal(size=(50, 2)), rng.normal(size=(40, 2)))
    with pytest.raises(ValueError, match="need at least 4 rows"):
        getattr(idf, score)(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)))


def test_nonlinear_r2_tells_a_smooth_warp_from_lost_information():
    """Latents that are a smooth invertible warp of the truth (a cube, then mixed) lose linear
    R^2 (0.82) but keep most of it nonlinearly (0.95; the kernel regression cannot invert the
    sparse tails exactly); independent latents score about 0 either way; half the variance lost
    to noise reads about 0.5 for both."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(1200, 3))
    warped = (z + 0.4 * z ** 3) @ rng.normal(size=(3, 3))
    linear, nonlinear = idf.linear_r2(warped, z), idf.nonlinear_r2(warped, z)
    assert linear < 0.85 and nonlinear > 0.93
    assert abs(idf.nonlinear_r2(rng.normal(size=(1200, 3)), z)) < 0.05
    y = z[:, :1] + rng.normal(size=(1200, 1))
    assert idf.nonlinear_r2(z[:, :1], y) == pytest.approx(0.5, abs=0.06)

# ---------------------------------------------------------------------------- PIPs
def test_pip_scores_constructed():
    gates = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    # perfect PIPs, but the inferred latents are permuted: inferred column j = true perm[j]
    inferred = gates[:, [2, 0, 1]].astype(float)
    m = idf.match_effects(gates * 1.5, inferred * 1.2)
    s = idf.pip_scores(inferred, gates, m)
    assert s["f1"] == 1.0 and s["auprc"] == pytest.approx(1.0)
    # without matching it is wrong
    assert idf.pip_scores(inferred, gates)["f1"] < 0.5
    # hand-computed case: 5 true of 12; predict 4 with 3 right -> P=3/4, R=3/5, F1=2*3/(6+1+2)
    pip = np.where(gates, 0.9, 0.1)
    pip[3, 2] = 0.2            # one missed
    pip[0, 1] = 0.7            # one false positive
    s = idf.pip_scores(pip, gates)
    assert s["precision"] == pytest.approx(4 / 5) and s["recall"] == pytest.approx(4 / 5)
    assert s["f1"] == pytest.approx(0.8)


def test_average_precision_matches_hand_value_and_sklearn():
    y = np.array([1, 0, 1, 0, 0, 1])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # precisions at the positives: 1/1, 2/3, 3/6
    assert idf.average_precision(y, score) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200), 1)  # with ties
    assert idf.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s))
    assert np.isnan(idf.average_precision(np.zeros(5), np.arange(5)))


# ---------------------------------------------------------------------------- DAG
def test_shd_known_pair():
    # true: 0 -> 1, 0 -> 2, 1 -> 3   (W[child, parent])
    T = np.zeros((4, 4))
    T[1, 0] = T[2, 0] = T[3, 1] = 0.8
    E = np.zeros((4, 4))
    E[1, 0] = 0.7           # kept
    E[0, 2] = -0.6          # 0 -> 2 reversed into 2 -> 0
    E[3, 2] = 0.5           # added 2 -> 3 ; 1 -> 3 deleted
    E[3, 0] = 0.05          # below threshold: no edge
    s = idf.shd(T, E, threshold=0.1)
    assert (s["additions"], s["deletions"], s["reversals"], s["shd"]) == (1, 1, 1, 3)
    assert idf.shd(T, T)["shd"] == 0


def test_permute_dag_undoes_relabelling():
    rng = np.random.default_rng(0)
    K = 5
    T = np.tril(rng.normal(size=(K, K)), -1) * (rng.random((K, K)) < 0.5)
    perm = rng.permutation(K)            # inferred latent perm[k] is true latent k
    W_hat = np.zeros((K, K))
    W_hat[np.ix_(perm, perm)] = T        # relabelled: no longer lower triangular in general
    z = rng.normal(size=(100, K))
    m = idf.mcc(z, z[:, np.argsort(perm)])
    np.testing.assert_array_equal(m.as_permutation(), perm)
    np.testing.assert_allclose(idf.permute_dag(W_hat, m), T)
    assert idf.shd(T, idf.permute_dag(W_hat, m), threshold=0.0)["shd"] == 0


def test_rmse():
    assert idf.rmse([1.0, 2.0], [1.0, 4.0]) == pytest.approx(np.sqrt(2.0))


# ---------------------------------------------------------------------------- end to end
TINY_GRID = {
    "seeds": 1,
    "dag_threshold": 0.25,
    "base": {
        "sim": {"preset": "tiny", "n_genes": 60, "n_singles": 5, "n_doubles": 2, "cells_per_single": 20,
                "cells_per_double": 10, "n_control": 60, "n_inv_latents": 2, "n_pert_latents": 2},
        # sparse rotation (tested in test_model) off: this checks the study's plumbing, quickly
        "model": {"latent_inv": 2, "latent_pert": 2, "hidden": 16, "alpha": 1.0, "sparse_rotation": False},
        "train": {"epochs": 2, "batch_size": 64, "early_stopping_patience": 100, "progress": False,
                  "device": "cpu"},
    },
    "conditions": {"base": {"factor": "base", "level": "base"},
                   "dense_prior": {"factor": "prior", "level": "dense", "model": {"effect_prior": "dense"}}},
}


def test_tiny_study_end_to_end(tmp_path):
    study = _study()
    df = study.run_study(TINY_GRID, out=tmp_path, progress=False, only=["base"])
    assert list(df.columns) == ["condition", "factor", "level", "seed", "score", "value"]
    assert set(df.score) == set(study.SCORES)
    assert np.isfinite(df.value.to_numpy()).all()
    assert (tmp_path / "results.csv").exists() and (tmp_path / "summary.md").exists()
    assert (tmp_path / "recovery_vs_envs.png").exists()
    back = pd.read_csv(tmp_path / "results.csv")
    assert len(back) == len(df)
    assert "| base |" in (tmp_path / "summary.md").read_text()


def test_grids_resolve():
    study = _study()
    for name in ("small", "full", "capacity", "training", "decoder", "controls"):
        g = study.load_grid(name)
        conds = study.resolve_conditions(g)
        assert conds[0]["name"] == "base"
        for c in conds:
            from pyro_pvae.simulate import _config
            sim = dict(c["sim"])
            _config(sim.pop("preset"), sim)  # valid simulator keys
            from pyro_pvae.config import ModelConfig, TrainConfig
            ModelConfig.from_dict(c["model"]), TrainConfig.from_dict(c["train"])


def test_a_grid_extends_another_grids_base(tmp_path):
    """extends: the parent's base, seeds and dag_threshold; the child's base parts update the
    parent's key by key, its own keys win, its conditions are its own; a cycle is refused."""
    study = _study()
    small = study.load_grid("small")
    assert study.load_grid("capacity")["base"] == small["base"]  # the grids that repeat small's base
    child = tmp_path / "child.yaml"
    child.write_text("extends: small\nseeds: 5\nbase:\n  sim: {n_genes: 50}\n"
                     "conditions:\n  base: {}\n  wide: {model: {hidden: 128}}\n")
    g = study.load_grid(str(child))
    assert g["seeds"] == 5 and g["dag_threshold"] == small["dag_threshold"]
    assert g["base"]["sim"] == {**small["base"]["sim"], "n_genes": 50}
    assert g["base"]["model"] == small["base"]["model"]
    conds = {c["name"]: c for c in study.resolve_conditions(g)}
    assert set(conds) == {"base", "wide"}
    assert conds["wide"]["model"]["hidden"] == 128 and conds["wide"]["sim"]["n_genes"] == 50
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\nconditions: {{base: {{}}}}\n")
    b.write_text(f"extends: {a}\nconditions: {{base: {{}}}}\n")
    with pytest.raises(ValueError, match="cycle"):
        study.load_grid(str(a))
    with pytest.raises(ValueError, match="extends: must name one grid"):
        study.load_grid({"extends": ["small"], "conditions": {"base": {}}})


def test_a_conditions_split_decides_which_controls_the_study_trains_on(monkeypatch):
    """By default the study's split holds out half of the controls (the benchmark's reference);
    grid `controls`' all_controls condition trains on every control. Doubles are always held out."""
    import pyro_pvae.api

    study = _study()
    seen = {}

    class Capture:
        def __init__(self, adata, split, model, train):
            seen["split"] = split

        def fit(self):
            return self

    monkeypatch.setattr(pyro_pvae.api, "PerturbedVAE", Capture)
    conds = {c["name"]: c for c in study.resolve_conditions(study.load_grid("controls"))}
    base = conds["base"]
    adata = study.simulate_condition({**base, "sim": {**base["sim"], "n_genes": 40}}, 0)
    labels = adata.obs["condition"].astype(str).to_numpy()
    n_ctrl = int((labels == "control").sum())
    for name, held in (("base", n_ctrl // 2), ("all_controls", 0)):
        study.fit_condition(conds[name], 0, adata)
        test = labels[np.asarray(seen["split"].test_idx)]
        assert (test == "control").sum() == held
        assert (adata.obs["n_targets"].to_numpy()[np.asarray(seen["split"].test_idx)] == 2).sum() == \
            (adata.obs["n_targets"].to_numpy() == 2).sum()


def test_oracle_bounds_known_answers():
    """analyses/inv_recovery_bound.py: with deep sequencing the joint oracle (true globals,
    z_inv and eps inferred) recovers both blocks; the exogenous latents equal z_pert exactly when
    the DAG has no edge and not when it has; the by-group R^2s average to the study's linear_r2."""
    from pyro_pvae.simulate import simulate

    bounds = _analysis("inv_recovery_bound")
    study = _study()
    small = dict(n_genes=120, n_inv_latents=2, n_pert_latents=3, n_singles=6, n_doubles=0, cells_per_single=25,
                 n_control=60, library_median=20000, inv_scale=0.4, pert_scale=0.4, effect_size=2.0)
    for edge_prob, exogenous_mcc in ((0.0, 1.0), (1.0, None)):
        adata = simulate("tiny", 0, edge_prob=edge_prob, **small)
        idx = np.arange(adata.n_obs)
        zp = adata.obsm["z_pert_true"]
        mcc_exo = idf.mcc(zp, study._exogenous(adata, idx)).value
        if exogenous_mcc is not None:
            assert mcc_exo == pytest.approx(exogenous_mcc)
        else:
            assert mcc_exo < 0.97  # every edge present: the exogenous latents are mixed
    zi_hat, zp_hat = bounds.oracle_latents(adata, idx, joint=True)
    assert idf.mcc(zp, zp_hat).value > 0.95
    perturbed = adata.obs["n_targets"].to_numpy() > 0
    r2 = bounds.group_r2(zi_hat, adata.obsm["z_inv_true"], perturbed, seed=3)
    assert r2["all"] > 0.9
    # the held-out half of linear_r2's split: the groups' values average to the whole
    test = np.random.default_rng(3).permutation(len(idx))[int(round(0.5 * len(idx))):]
    share = perturbed[test].mean()
    assert share * r2["perturbed"] + (1 - share) * r2["controls"] == pytest.approx(r2["all"], abs=1e-9)


def test_fit_and_score_fixes_blas_threads(monkeypatch):
    """The study's fits run with the BLAS threads it is given, whatever the environment (numpy's
    BLAS sums in another order with more threads, and SVI carries the rounding to other optima)."""
    from threadpoolctl import threadpool_info

    study = _study()
    seen = {}

    def inside(cond, seed, n_threads):
        seen["blas"] = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
        return []

    monkeypatch.setattr(study, "_fit_and_score", inside)
    study.fit_and_score({}, 0, n_threads=1, blas_threads=1)
    assert seen["blas"] == {1}


@pytest.mark.parametrize("flag", ["--blas-threads", "--threads", "--jobs"])
@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "two"])
def test_study_cli_rejects_bad_thread_counts(flag, bad, capsys):
    study = _study()
    with pytest.raises(SystemExit) as exc:
        study.main(["--grid", "small", flag, bad])
    assert exc.value.code == 2
    assert f"expected a whole number >= 1, got {bad!r}" in capsys.readouterr().err
