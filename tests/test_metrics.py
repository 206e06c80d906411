"""Each metric against hand-computed values on tiny arrays."""
import math

import numpy as np
import pytest
import scipy.sparse as sp

from pyro_pvae import metrics as M
from pyro_pvae.data import DataError


def test_lognormalize_counts_dense_and_sparse():
    X = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    expected = np.array([[math.log1p(2500), math.log1p(7500)], [0, 0],
                         [math.log1p(5000), math.log1p(5000)]])
    np.testing.assert_allclose(M.lognormalize_counts(X), expected)
    out = M.lognormalize_counts(sp.csr_matrix(X))
    assert sp.issparse(out)
    np.testing.assert_allclose(out.toarray(), expected, rtol=1e-6)


def test_nrmse_hand_computed_and_zero_truth():
    y = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert M.nrmse(y, y) == 0.0
    assert M.nrmse(y + 1.0, y) == pytest.approx(math.sqrt(1.0 / 7.5))
    note = M.nrmse(y, np.zeros_like(y))
    assert isinstance(note, M.MetricNote) and "zero" in note


def test_r2_clipped_values_and_argument_order():
    from sklearn.metrics import r2_score
    a = np.array([1.0, 2.0, 3.0])
    assert M.r2_clipped(a, a) == 1.0
    assert M.r2_clipped(a, np.array([1.0, 2.0, 4.0])) == pytest.approx(0.5)
    assert M.r2_clipped(a, a[::-1]) == 0.0  # raw r2 is -3, clipped at 0
    b = np.array([0.5, 2.5, 2.0])
    assert M.r2_clipped(a, b) == pytest.approx(max(r2_score(a, b), 0))
    assert M.r2_clipped(a, b) != pytest.approx(max(r2_score(b, a), 0))
    assert isinstance(M.r2_clipped(np.ones(3), a), M.MetricNote)


def test_mmd_hand_value_symmetry_identity():
    x, y = np.array([[0.0]]), np.array([[1.0]])
    assert M.mmd(x, y, bandwidths=[1.0]) == pytest.approx(2 - 2 * math.exp(-1))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 5)), rng.normal(size=(25, 5)) + 2.0
    assert M.mmd(a, a) == pytest.approx(0.0, abs=1e-12)
    assert M.mmd(a, b) == pytest.approx(M.mmd(b, a))
    assert M.mmd(a, b) > 0.01
    assert M.mmd(a, b, "median") == pytest.approx(M.mmd(b, a, "median"))
    assert M.mmd(a, b, "median") > M.mmd(a, a, "median")
    # Discrepancy-VAE evaluation bandwidths: fix_sigma=1000, 10 kernels, multiplier 2
    assert M.DVAE_MMD_BANDWIDTHS[0] == 31.25 and M.DVAE_MMD_BANDWIDTHS[-1] == 16000.0


def test_batch_protocol_pairs_full_batches_and_hand_values():
    obs = np.tile([1.0, 2.0, 3.0], (70, 1))
    pred = obs[:1].repeat(100, axis=0) + 1.0
    pairs = M.batch_pairs(100, 70, 32, seed=0)
    assert len(pairs) == 2 and all(len(p) == len(o) == 32 for p, o in pairs)
    res = M.batch_protocol(pred, obs, seed=0)
    assert res["nrmse"] == pytest.approx(math.sqrt(1.0 / (14.0 / 3.0)))
    assert res["r2_mean"] == pytest.approx(max(1 - 3 / 2, 0))  # r2_score([2,3,4],[1,2,3]) < 0
    assert res["mmd"] > 0


def test_batch_protocol_too_few_cells_gives_reason():
    res = M.batch_protocol(np.ones((40, 3)), np.ones((31, 3)))
    for k in ("nrmse", "r2_mean", "mmd"):
        assert isinstance(res[k], str) and "32" in res[k]


def test_pearson_constructed_deltas():
    d = np.array([0.5, -1.0, 2.0, 0.0])
    assert M.pearson(2 * d + 1, d) == pytest.approx(1.0)
    assert M.pearson(-d, d) == pytest.approx(-1.0)
    assert M.pearson(np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])) == pytest.approx(-0.5)
    note = M.pearson(np.zeros(4), d)
    assert isinstance(note, M.MetricNote) and "predicted" in note


def test_rmse_l2():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0])
    assert M.rmse(a, b) == pytest.approx(1.0)
    assert M.l2(a, b) == pytest.approx(2.0)


def test_energy_distance():
    x = np.array([[0.0], [1.0]])
    assert M.energy_distance(x, x) == 0.0
    assert M.energy_distance(np.array([[0.0]]), np.array([[2.0]])) == pytest.approx(4.0)
    # x = {0, 1}, y = {0}: 2 * 0.5 - 0.5 - 0 = 0.5
    assert M.energy_distance(x, np.array([[0.0]])) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(600, 4))
    assert M.energy_distance(a, a + 1.0, max_cells=100) > 0.5


def test_direction_accuracy():
    assert M.direction_accuracy([1, -1, 2, -3], [1, 1, 2, 3]) == 0.5
    assert M.direction_accuracy([1, -1], [2, -5]) == 1.0


def test_coverage_known_samples():
    samples = np.tile(np.arange(101.0)[:, None], (1, 4))  # 5%, 95% quantiles: 5 and 95
    assert M.coverage(samples, np.array([50.0, 3.0, 96.0, 95.0])) == 0.5
    assert isinstance(M.coverage(samples[:1], np.zeros(4)), M.MetricNote)


def _toy_condition(n_obs=64, n_ctrl=80, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    ctrl = rng.normal(1.0, 0.1, size=(n_ctrl, n_genes))
    shift = np.zeros(n_genes)
    shift[:3] = [2.0, -0.8, 1.5]
    obs = rng.normal(1.0, 0.1, size=(n_obs, n_genes)) + shift
    genes = [f"g{i}" for i in range(n_genes)]
    return obs, ctrl, genes, shift


def test_top_de_genes_finds_shifted_genes_and_refuses_tiny_groups():
    obs, ctrl, genes, _ = _toy_condition()
    top = M.top_de_genes(obs, ctrl, genes, n=3)
    assert set(top) == {"g0", "g1", "g2"}  # includes the down-regulated g1
    with pytest.raises(DataError):
        M.top_de_genes(obs[:2], ctrl, genes)


def test_evaluate_condition_keys_and_values():
    obs, ctrl, genes, shift = _toy_condition()
    rng = np.random.default_rng(5)
    pred = ctrl[rng.integers(0, len(ctrl), 96)] + shift
    samples = shift[None, :] + rng.normal(0, 0.05, size=(200, len(genes)))
    res = M.evaluate_condition(pred, obs, ctrl, genes, pred_change_samples=samples)
    expected = {"nrmse", "r2_mean", "mmd", "pearson_delta_all", "pearson_delta_top20de",
                "pseudobulk_rmse_all", "pseudobulk_rmse_top20de", "l2_mean_all",
                "l2_mean_top20de", "energy_distance", "direction_acc_top20de",
                "coverage90_all", "coverage90_top20de", "delta_rmse_all", "width90_all", "width90_top20de"}
    assert set(res) == expected
    assert res["width90_all"] == pytest.approx(2 * 1.645 * 0.05, rel=0.05)  # normal draws, sd 0.05
    assert all(isinstance(v, float) and math.isfinite(v) for v in res.values())
    assert res["pearson_delta_all"] > 0.9
    # the 17 noise genes in the top 20 have ~0 true change, so only the 3 real ones are sure
    res3 = M.evaluate_condition(pred, obs, ctrl, genes, top_de=["g0", "g1", "g2"])
    assert res3["direction_acc_top20de"] == 1.0 and res3["pearson_delta_top20de"] > 0.99
    assert res["delta_rmse_all"] == pytest.approx(res["pseudobulk_rmse_all"])
    # pseudobulk numbers by hand
    diff = pred.mean(0) - obs.mean(0)
    assert res["pseudobulk_rmse_all"] == pytest.approx(np.sqrt(np.mean(diff ** 2)))
    assert res["l2_mean_all"] == pytest.approx(np.linalg.norm(diff))
    # a worse prediction (no change) scores worse
    res0 = M.evaluate_condition(ctrl[:64], obs, ctrl, genes, top_de=["g0", "g1", "g2"])
    assert "coverage90_top20de" not in res0
    assert res0["pseudobulk_rmse_top20de"] > res["pseudobulk_rmse_top20de"]


def test_evaluate_condition_ill_defined_gives_reasons_not_nan():
    obs, ctrl, genes, _ = _toy_condition(n_obs=2)
    res = M.evaluate_condition(ctrl[:50], obs, ctrl, genes)
    for k in ("nrmse", "r2_mean", "mmd", "pearson_delta_top20de", "direction_acc_top20de"):
        assert isinstance(res[k], str) and res[k], k
    assert not any(isinstance(v, float) and math.isnan(v) for v in res.values())
    df = M.results_frame([dict(method="m", condition="A", seed=0, metrics=res)])
    bad = df[df["value"].isna()]
    assert len(bad) >= 5 and (bad["note"].str.len() > 0).all()


def test_results_frame_long_form_and_notes():
    rows = [dict(method="m", condition="A", seed=0, group="single", nrmse=0.5,
                 mmd=M.MetricNote("too few cells"), r2_mean=float("nan"))]
    df = M.results_frame(rows)
    assert list(df.columns) == ["method", "condition", "group", "metric", "value", "seed", "note"]
    by = df.set_index("metric")
    assert by.loc["nrmse", "value"] == 0.5 and by.loc["nrmse", "note"] == ""
    assert math.isnan(by.loc["mmd", "value"]) and by.loc["mmd", "note"] == "too few cells"
    assert "no reason" in by.loc["r2_mean", "note"]
    with pytest.raises(DataError):
        M.results_frame([dict(method="m", nrmse=1.0)])


def test_summarize_mean_sd_over_seeds_of_condition_averages():
    rows = [dict(method="m", condition=c, seed=s, nrmse=v)
            for s, c, v in [(0, "A", 1.0), (0, "B", 3.0), (1, "A", 2.0), (1, "B", 4.0)]]
    rows.append(dict(method="m", condition="C", seed=1, nrmse=M.MetricNote("few cells")))
    s = M.summarize(M.results_frame(rows))
    r = s.iloc[0]
    assert r["mean"] == pytest.approx(2.5) and r["sd"] == pytest.approx(math.sqrt(0.5))
    assert r["n_seeds"] == 2 and r["n_undefined"] == 1


def test_summary_markdown_keeps_reference_rows_separate():
    rows = [dict(method="additive", condition="A+B", seed=s, nrmse=0.3 + 0.1 * s)
            for s in (0, 1)]
    ref = [dict(method="PerturbedVAE", metric="nrmse", value=0.4474,
                setting="Norman 2019 doubles", source="arXiv 2605.19343")]
    md = M.summary_markdown(M.results_frame(rows), reference_rows=ref)
    measured, _, published = md.partition("published, different data version")
    assert published, "reference table heading missing"
    assert "PerturbedVAE" not in measured and "0.4474" not in measured
    assert "PerturbedVAE" in published and "0.4474" in published
    assert "additive" in measured and "0.3500 ± 0.0707" in measured
    assert "additive" not in published
    assert "published" not in M.summary_markdown(M.results_frame(rows))


# ------------------------------------------------------------------ protocol: known answers
def _no_effect_cells(rng, mu, sd):
    return lambda n: mu + sd * rng.normal(size=(n, len(mu)))  # every condition = control


def test_constant_vector_scores_zero_against_disjoint_controls():
    """A method predicting one constant vector, the mean change of the training singles from
    the training controls, knows nothing of any condition. On data with no effect at all it
    correlates with every observed change measured from the SAME training controls (shared
    noise), and not at all with changes measured from held-out controls."""
    rng = np.random.default_rng(0)
    G = 300
    cells = _no_effect_cells(rng, rng.uniform(0.5, 2.0, G), rng.uniform(0.2, 1.0, G))
    genes = [f"g{i}" for i in range(G)]
    new, old = [], []
    for _ in range(20):
        train_ctrl, held_ctrl, obs = cells(48), cells(47), cells(100)
        const = cells(600).mean(0) - train_ctrl.mean(0)
        pred = train_ctrl[rng.integers(0, 48, 200)] + const
        kw = dict(top_de=[0, 1, 2], batch_size=200)  # one batch: keeps the cell metrics cheap
        new.append(M.evaluate_condition(pred, obs, held_ctrl, genes, pred_ctrl_lognorm=train_ctrl,
                                        **kw)["pearson_delta_all"])
        old.append(M.evaluate_condition(pred, obs, train_ctrl, genes, **kw)["pearson_delta_all"])
    assert abs(np.mean(new)) < 0.05 and np.max(np.abs(new)) < 0.25
    assert np.mean(old) > 0.5  # what the shared control mean hands it


def test_perfect_predictive_distribution_covers_90_percent_on_disjointly_chosen_genes():
    """Draws of the observed change from its true sampling distribution cover ~90% of all
    genes and of top-20 DE genes chosen on other cells; chosen on the scored cells, far fewer."""
    rng = np.random.default_rng(1)
    G, n = 200, 50
    sd = rng.uniform(0.3, 1.0, G)
    base = rng.uniform(0.5, 2.0, G)
    cov_all, cov_disjoint, cov_same = [], [], []
    for _ in range(30):
        effect = np.zeros(G)
        effect[rng.choice(G, 10, replace=False)] = rng.choice([-1, 1], 10) * rng.uniform(0.5, 1.5, 10)
        cond = _no_effect_cells(rng, base + effect, sd)
        ctrl = _no_effect_cells(rng, base, sd)
        select, scored, train_ctrl, held_ctrl = cond(n), cond(n), ctrl(n), ctrl(n)
        obs_delta = scored.mean(0) - held_ctrl.mean(0)
        draws = effect + sd * np.sqrt(2.0 / n) * rng.normal(size=(400, G))  # exact sampling distribution
        genes = [f"g{i}" for i in range(G)]
        top_disjoint = M._gene_index(M.top_de_genes(select, train_ctrl, genes), genes, G)
        top_same = M._gene_index(M.top_de_genes(scored, held_ctrl, genes), genes, G)
        res = M.evaluate_condition(scored, scored, held_ctrl, genes, top_de=top_disjoint,
                                   pred_change_samples=draws, batch_size=n)
        cov_all.append(res["coverage90_all"])
        cov_disjoint.append(res["coverage90_top20de"])
        cov_same.append(M.coverage(draws[:, top_same], obs_delta[top_same]))
    assert 0.87 < np.mean(cov_all) < 0.93
    assert 0.84 < np.mean(cov_disjoint) < 0.96
    assert np.mean(cov_same) < 0.75


def test_predicted_change_uses_the_methods_own_controls():
    obs, ctrl, genes, shift = _toy_condition()
    own = ctrl + 0.5  # the method's control prediction is off by 0.5 everywhere ...
    pred = own + shift  # ... and so is its prediction of the condition: the change is right
    res = M.evaluate_condition(pred, obs, ctrl, genes, top_de=[0, 1, 2], pred_ctrl_lognorm=own)
    want = (pred.mean(0) - own.mean(0)) - (obs.mean(0) - ctrl.mean(0))
    assert res["delta_rmse_all"] == pytest.approx(np.sqrt(np.mean(want ** 2)))
    assert res["delta_rmse_all"] < 0.05 and res["pearson_delta_all"] > 0.99
    assert res["pseudobulk_rmse_all"] > 0.45  # the means themselves are off by 0.5


def test_top20_metrics_score_the_cells_they_are_given():
    obs, ctrl, genes, shift = _toy_condition()
    pred = ctrl + shift
    other = obs[:20] + 1.0  # the cells the top-DE metrics score (disjoint from the selection)
    res = M.evaluate_condition(pred, obs, ctrl, genes, top_de=[0, 1, 2], obs_top_lognorm=other,
                               pred_change_samples=np.tile(shift, (50, 1)) + np.linspace(-0.05, 0.05, 50)[:, None],
                               top_change_samples=np.tile(shift + 1.0, (50, 1)) + np.linspace(-0.5, 0.5, 50)[:, None])
    top = [0, 1, 2]
    assert res["pseudobulk_rmse_top20de"] == pytest.approx(M.rmse(pred.mean(0)[top], other.mean(0)[top]))
    assert res["pseudobulk_rmse_all"] == pytest.approx(M.rmse(pred.mean(0), obs.mean(0)))
    assert res["coverage90_top20de"] == 1.0  # the top draws (around shift + 1) fit the top cells' change


def _calibration_data(rng, n_cond, n_genes, sd_draws, err_sd, n_draws=200):
    """Predictive draws N(m, sd_draws^2) per gene and observed changes m + N(0, err_sd(m)^2)."""
    draws, observed = [], []
    for _ in range(n_cond):
        m = rng.normal(0, 1, n_genes) * (rng.random(n_genes) < 0.1)  # sparse changes
        draws.append(m + sd_draws * rng.standard_normal((n_draws, n_genes)))
        observed.append(m + err_sd(m) * rng.standard_normal(n_genes))
    return draws, observed


def _coverage_of(cal, draws, observed, top=None):
    from pyro_pvae.metrics import coverage
    vals = []
    for d, o in zip(draws, observed):
        d2 = cal.apply(d)
        idx = np.argsort(-np.abs(d.mean(0)))[:top] if top else slice(None)
        vals.append(coverage(d2[:, idx], o[idx], 0.9))
    return float(np.mean(vals))


def test_interval_calibration_recovers_a_known_underdispersion_factor():
    """Draws with sd 0.1 for errors of sd 0.2: intervals half as wide as needed. The fit finds
    k = 2 (no magnitude term), and on fresh conditions the stretched intervals cover 90%;
    draws twice too wide are left as they are (never narrowed on the calibration pairs' evidence)."""
    from pyro_pvae.metrics import IntervalCalibration

    rng = np.random.default_rng(0)
    draws, observed = _calibration_data(rng, 20, 500, 0.1, lambda m: 0.2)
    cal = IntervalCalibration.fit(draws, observed)
    assert cal.k == pytest.approx(2.0, rel=0.08) and cal.gamma <= 0.1
    assert cal.coverage_before == pytest.approx(0.59, abs=0.03)  # P(|N(0, 4)| < 1.645)
    fresh = _calibration_data(rng, 20, 500, 0.1, lambda m: 0.2)
    assert _coverage_of(cal, *fresh) == pytest.approx(0.9, abs=0.02)
    wide_draws, wide_obs = _calibration_data(rng, 20, 500, 0.4, lambda m: 0.2)
    wide = IntervalCalibration.fit(wide_draws, wide_obs)
    assert wide.k < 1 and wide.coverage_before > 0.99
    np.testing.assert_allclose(wide.apply(wide_draws[0]), wide_draws[0])


def test_interval_calibration_widens_large_changes_more_when_errors_grow_with_them():
    """Errors of sd sqrt(0.1^2 + (0.5 m)^2): one global factor leaves the largest changes
    under-covered; the fitted magnitude term (gamma > 0) brings both all genes and each
    condition's 20 largest predicted changes to about 90% on fresh conditions."""
    from pyro_pvae.metrics import IntervalCalibration

    rng = np.random.default_rng(1)
    err = lambda m: np.sqrt(0.1 ** 2 + (0.5 * m) ** 2)  # noqa: E731
    draws, observed = _calibration_data(rng, 40, 500, 0.1, err)
    cal = IntervalCalibration.fit(draws, observed)
    flat = IntervalCalibration.fit(draws, observed, gammas=(0.0,))
    fresh = _calibration_data(rng, 40, 500, 0.1, err)
    assert cal.gamma > 0
    assert _coverage_of(flat, *fresh, top=20) < 0.8  # one factor: the large changes stay under-covered
    assert _coverage_of(cal, *fresh) == pytest.approx(0.9, abs=0.03)
    assert _coverage_of(cal, *fresh, top=20) == pytest.approx(0.9, abs=0.05)


def test_interval_calibration_refuses_mismatched_inputs():
    from pyro_pvae.metrics import IntervalCalibration

    with pytest.raises(ValueError, match="one observed change per set of draws"):
        IntervalCalibration.fit([np.zeros((5, 3))], [])
    with pytest.raises(ValueError, match="and 2 selection changes"):
        IntervalCalibration.fit([np.zeros((5, 3))], [np.zeros(3)], select=[np.zeros(3)] * 2)


def test_evaluate_condition_reports_calibrated_and_raw_coverage():
    """With a calibration the coverage metrics score the stretched draws and the raw draws'
    coverage is kept as coverage90_*_uncalibrated."""
    from pyro_pvae.metrics import IntervalCalibration, evaluate_condition

    rng = np.random.default_rng(2)
    genes = [f"g{i}" for i in range(50)]
    ctrl = rng.poisson(3.0, (200, 50)).astype(float)
    obs = rng.poisson(3.0, (200, 50)).astype(float)
    samples = 0.01 * rng.standard_normal((100, 50))  # far too narrow
    m = evaluate_condition(obs, obs, ctrl, genes, top_de=genes[:20], pred_change_samples=samples,
                           calibration=IntervalCalibration(k=100.0))
    assert m["coverage90_all"] == 1.0 and m["coverage90_all_uncalibrated"] < 0.5
    assert m["coverage90_top20de"] == 1.0 and "coverage90_top20de_uncalibrated" in m
