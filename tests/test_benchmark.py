"""Tests of ``python -m pyro_pvae.benchmark`` (tiny simulation) and of the norman_effects
scoring path (additive baseline against RMSEs computed by hand from the truth)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_pvae import benchmark as B
from pyro_pvae import data as D
from pyro_pvae.data.splits import heldout_control_idx

EXPECTED_COLUMNS = {"method", "condition", "metric", "value", "seed", "group", "note"}
MODEL_ROWS = ("PerturbedVAE", "PerturbedVAE_no_alignment", "PerturbedVAE_dense_prior")
BASELINES = ("control_mean", "additive", "additive_shrink", "linear")
CELL_METRICS = {"nrmse", "r2_mean", "mmd", "pearson_delta_all", "pearson_delta_top20de",
                "pseudobulk_rmse_all", "pseudobulk_rmse_top20de", "delta_rmse_all", "l2_mean_all", "energy_distance",
                "direction_acc_top20de"}
COVERAGE = {"coverage90_all", "coverage90_top20de", "coverage90_all_uncalibrated", "coverage90_top20de_uncalibrated",
            "width90_all", "width90_top20de", "width90_all_uncalibrated", "width90_top20de_uncalibrated"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bench") / "tiny-benchmark"
    rc = B.main(["--config", "tiny", "train.epochs=1", "train.min_epochs=1", "benchmark.n_pred_cells=40",
                 "benchmark.n_change_draws=4", f"output.run_dir={run_dir}"])
    assert rc == 0
    return run_dir


@pytest.mark.slow
def test_benchmark_writes_files(tiny_run):
    for f in ("results.csv", "summary.md", "config.yaml", "split.json", "timings.csv",
              "scatter_model_vs_additive.png", "pred_vs_obs_top_genes.png"):
        assert (tiny_run / f).exists(), f
        assert (tiny_run / f).stat().st_size > 0, f


@pytest.mark.slow
def test_results_columns_methods_metrics(tiny_run):
    df = pd.read_csv(tiny_run / "results.csv", keep_default_na=False, na_values=[""])
    assert set(df.columns) == EXPECTED_COLUMNS
    assert set(df["method"]) == set(MODEL_ROWS) | set(BASELINES)
    assert set(df["metric"]) == CELL_METRICS | COVERAGE
    # coverage only for model rows
    cov = df[df["metric"].isin(COVERAGE)]
    assert set(cov["method"]) == set(MODEL_ROWS)
    assert cov[cov.metric == "coverage90_all"]["value"].between(0, 1).all()
    # every held-out condition for every method and every metric of that method
    split = D.Split.from_json(tiny_run / "split.json")
    held = {c for c in split.test_groups if c != D.CONTROL}
    assert held
    for m in set(df["method"]):
        dm = df[df["method"] == m]
        assert set(dm["condition"]) == held, m
        n_metrics = len(CELL_METRICS) + (len(COVERAGE) if m in MODEL_ROWS else 0)
        assert len(dm) == len(held) * n_metrics, m
    # groups as in the split, conditions canonical
    groups = df.drop_duplicates("condition").set_index("condition")["group"].to_dict()
    assert groups == {c: split.test_groups[c] for c in held}
    assert all(D.format_condition(D.parse_condition(c)) == c for c in held)
    # no bare NaN
    nan = df["value"].isna()
    assert (df.loc[nan, "note"].fillna("").str.len() > 0).all()
    assert not df.loc[nan, "note"].fillna("").str.contains("no reason recorded").any()
    # the additive baseline predicts a single by its own training change: finite values
    assert df[(df.method == "additive") & (df.metric == "pearson_delta_all")]["value"].notna().all()


@pytest.mark.slow
def test_summary_has_methods_and_no_reference(tiny_run):
    text = (tiny_run / "summary.md").read_text()
    for m in MODEL_ROWS + BASELINES:
        assert f"| {m} |" in text, m
    assert "published" not in text.lower()
    assert "## Group `single`" in text
    # the protocol, with this run's numbers: the tiny simulation has 300 controls, 150 held out
    assert "## Protocol" in text and "mean of the 150 held-out control cells" in text
    assert "on cells the top-20 metrics do not score" in text


def test_reference_rows_only_for_published_configs():
    df = pd.DataFrame({"method": ["additive"], "condition": ["A+B"], "group": ["seen2"],
                       "metric": ["nrmse"], "value": [0.5], "seed": [0], "note": [""]})
    ref = B.summary_text(df, "norman", [], "cells")
    assert "published, different data version" in ref
    measured, published = ref.split("## Reference: published, different data version")
    assert "0.4474" in published and "0.4474" not in measured
    assert "published" not in B.summary_text(df, "simulation", [], "cells").lower()


def test_cli_errors_are_short(capsys):
    assert B.main(["--config", "nope"]) == 2
    assert "unknown config" in capsys.readouterr().err
    assert B.main(["--config", "tiny", "benchmark.bogus=1"]) == 2
    assert "keys under benchmark" in capsys.readouterr().err
    assert B.main(["--config", "tiny", "benchmark.methods=[additive,foo]"]) == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and "Traceback" not in err
    assert B.main(["--help"]) == 0


def test_train_overrides_precedence():
    from pyro_pvae.config import compose

    ov = ["benchmark.train.epochs=7", "benchmark.train.lr=0.5", "train.epochs=3"]
    cfg = compose("tiny", B.hydra_overrides(ov))
    t = B.train_settings(cfg, ov)
    assert t["epochs"] == 3 and t["lr"] == 0.5 and t["progress"] is False


# ------------------------------------------------------------------ norman_effects scoring
@pytest.fixture(scope="module")
def effects_instance():
    from pyro_pvae.simulate import simulate_norman_effects

    adata = simulate_norman_effects(seed=0, tiny=True, n_genes=120, n_cells_per_condition=20, n_control=100)
    split = D.make_split(adata, "combo_seen", 0, unseen_gene_fraction=0.0, train_seen2_fraction=0.5,
                         single_test_fraction=0.0)
    return adata, split


def _pb(X):  # written independently of benchmark.pseudobulk_log1p_cpm
    X = np.asarray(X.todense(), dtype=np.float64)
    tot = X.sum(0)
    return np.log(1.0 + tot / tot.sum() * 1_000_000.0)


def test_effects_additive_matches_hand_rmse(effects_instance):
    adata, split = effects_instance
    df, extras = B.effects_benchmark(adata, split, ["additive", "additive_shrink", "control_mean"])
    truth = adata.uns["truth"]
    labels = [str(c) for c in truth["conditions"]]
    true = np.asarray(truth["true_delta_log1p_cpm"], float)
    cond = adata.obs["condition"].astype(str).to_numpy()
    tr = np.asarray(split.train_idx)
    ctrl = _pb(adata.X[tr[cond[tr] == "control"]])
    change = lambda c: _pb(adata.X[tr[cond[tr] == c]]) - ctrl  # noqa: E731
    held = [c for c in split.test_groups if "+" in c]
    assert held and set(df["condition"]) == set(split.test_groups)
    assert set(df["metric"]) == {m for m in B.EFFECT_METRICS if not m.startswith(("coverage", "width"))}  # baselines: no draws
    # training doubles give the shrink factor by least squares
    train_dbl = [c for c in set(cond[tr]) if "+" in c]
    num = sum(float((change(a) + change(b)) @ change(c))
              for c in train_dbl for a, b in [c.split("+")])
    den = sum(float((change(a) + change(b)) @ (change(a) + change(b)))
              for c in train_dbl for a, b in [c.split("+")])
    shrink = float(np.clip(num / den, 0, 2))
    for c in held:
        a, b = c.split("+")
        t = true[labels.index(c)]
        add = change(a) + change(b)
        want = {"additive": math.sqrt(np.mean((add - t) ** 2)),
                "additive_shrink": math.sqrt(np.mean((shrink * add - t) ** 2)),
                "control_mean": math.sqrt(np.mean(t ** 2))}
        for m, w in want.items():
            got = df[(df.method == m) & (df.condition == c) & (df.metric == "delta_rmse_all")]["value"]
            assert len(got) == 1
            assert got.iloc[0] == pytest.approx(w, rel=1e-9, abs=1e-12), (m, c)
        # top-20 genes: the held-out cells' change from the held-out controls, not the truth
        te = np.asarray(split.test_idx)
        observed = _pb(adata.X[te[cond[te] == c]]) - _pb(adata.X[heldout_control_idx(split, adata)])
        top = np.argsort(-np.abs(observed), kind="stable")[:20]
        assert set(top) != set(np.argsort(-np.abs(t))[:20])  # the choice matters here
        got = df[(df.method == "additive") & (df.condition == c) & (df.metric == "pearson_delta_top20de")]
        assert got["value"].iloc[0] == pytest.approx(np.corrcoef(add[top], t[top])[0, 1], abs=1e-9)


def test_score_effects_by_hand():
    t = np.array([1.0, -2.0, 0.5, 0.0])
    p = np.array([0.5, -1.0, 0.5, 1.0])
    s = B.score_effects(p, t, n_top=3)
    assert s["delta_rmse_all"] == pytest.approx(math.sqrt((0.25 + 1 + 0 + 1) / 4))
    assert s["pearson_delta_all"] == pytest.approx(np.corrcoef(p, t)[0, 1])
    assert s["pearson_delta_top20de"] == pytest.approx(np.corrcoef(p[[1, 0, 2]], t[[1, 0, 2]])[0, 1])


# ------------------------------------------------------------------ cells-mode protocol
def _no_effect_data(n_genes=300, seed=0):
    """Counts where no perturbation has any effect: every cell is a draw of the same profile.
    100 controls (as in the shipped subset), 8 singles of 60 cells, 5 doubles of 100."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    singles = [f"G{i}" for i in range(8)]
    doubles = ["G0+G1", "G2+G3", "G4+G5", "G6+G7", "G1+G2"]
    labels = ["control"] * 100 + [g for g in singles for _ in range(60)] + [d for d in doubles for _ in range(100)]
    rate = rng.gamma(0.6, 2.0, n_genes)
    X = rng.poisson(rate[None, :] * rng.lognormal(0, 0.2, (len(labels), 1)))
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)),
                   obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    return D.to_canonical(a)


@pytest.fixture(scope="module")
def no_effect():
    adata = _no_effect_data()
    D.lognormalize(adata)
    split = D.make_split(adata, "complete_doubles", 0, single_test_fraction=0.35)
    return adata, split


def test_reference_is_disjoint_from_training_and_selection(no_effect):
    from pyro_pvae.metrics import top_de_genes

    adata, split = no_effect
    ref = B.observed_reference(adata, split)
    cond = adata.obs["condition"].astype(str).to_numpy()
    trainval = np.concatenate([split.train_idx, split.val_idx])
    # 50 held-out controls: test cells labelled control, never training or validation cells
    assert len(ref.control_idx) == 50 and set(cond[ref.control_idx]) == {"control"}
    assert np.isin(ref.control_idx, split.test_idx).all() and not np.isin(ref.control_idx, trainval).any()
    assert not np.isin(ref.train_control_idx, ref.control_idx).any()
    L = adata.layers["lognorm"]
    for c, g in ref.groups.items():
        held = split.test_idx[cond[split.test_idx] == c]
        sel, sco = ref.select_idx[c], ref.top_score_idx[c]
        assert not np.isin(sel, sco).any(), c  # DE genes chosen on cells the top-20 metrics do not score
        assert np.array_equal(ref.score_idx[c], held)  # the all-gene metrics score every held-out cell
        if g == "single":  # 39 training cells: select on them, score every held-out cell
            assert ref.select_source[c] == "training cells"
            assert np.isin(sel, split.train_idx).all() and np.array_equal(sco, held)
        else:  # doubles: no training cell; halves of the held-out cells
            assert ref.select_source[c] == "half of the held-out cells"
            assert len(sel) == len(sco) == 50 and np.array_equal(np.sort(np.concatenate([sel, sco])), held)
            np.testing.assert_allclose(ref.observed_top[c], L[sco].toarray())
        assert ref.top_de[c] == top_de_genes(L[sel].toarray(), L[ref.train_control_idx].toarray(),
                                             ref.genes)
        want = L[held].toarray().mean(0, dtype=float) - L[ref.control_idx].toarray().mean(0, dtype=float)
        np.testing.assert_allclose(ref.obs_delta[c], want, rtol=1e-6, atol=1e-9)
    # a split without held-out controls is refused with the fix in the message
    old = D.make_split(adata, "complete_doubles", 0, control_test_fraction=0.0)
    with pytest.raises(B.BenchmarkError, match="control_test_fraction > 0"):
        B.observed_reference(adata, old)


def _write_external(path, conds, blocks, control=None, layer=None, genes=None):
    """An .h5ad of predicted cells: ``blocks[i]`` are the cells of ``conds[i]``."""
    import anndata as ad

    if control is not None:
        conds, blocks = [*conds, "control"], [*blocks, control]
    X = np.vstack([np.asarray(b.toarray() if hasattr(b, "toarray") else b, np.float32) for b in blocks])
    labels = [c for c, b in zip(conds, blocks) for _ in range(b.shape[0])]
    obs = pd.DataFrame({"condition": labels}, index=[f"p{i}" for i in range(len(labels))])
    a = ad.AnnData(X=None if layer else X, obs=obs, layers={layer: X} if layer else None,
                   var=pd.DataFrame(index=genes if genes is not None else [f"g{i}" for i in range(X.shape[1])]))
    a.write_h5ad(path)
    return f"{path.stem}={path}"


def _value(df, method, cond, metric):
    v = df[(df.method == method) & (df.condition == cond) & (df.metric == metric)]["value"]
    assert len(v) == 1, (method, cond, metric)
    return float(v.iloc[0])


def test_constant_vector_and_additive_score_zero_without_effects(no_effect, tmp_path):
    """No condition has an effect. A method whose predicted change is the mean change of the
    training singles from the training controls (one constant vector) must not score: the
    observed changes are measured from held-out controls. Under the old protocol (training
    controls) the same vector scores high."""
    from pyro_pvae.metrics import pearson

    adata, split = no_effect
    cond = adata.obs["condition"].astype(str).to_numpy()
    L = adata.layers["lognorm"]
    tr = split.train_idx
    train_ctrl = L[tr[cond[tr] == "control"]].toarray()
    single_rows = tr[(cond[tr] != "control") & (np.char.find(cond[tr].astype(str), "+") < 0)]
    const = L[single_rows].toarray().mean(0) - train_ctrl.mean(0)
    ref = B.observed_reference(adata, split)
    doubles = [c for c, g in ref.groups.items() if g == "seen2"]
    assert len(doubles) == 5 and len(single_rows) > 250  # 8 x 39, less the validation cells
    ext = B.read_external([_write_external(tmp_path / "constant.h5ad", doubles,
                                           [train_ctrl + const] * len(doubles), train_ctrl, layer="lognorm")])
    df, _ = B.cell_benchmark(adata, split, ["additive"], {}, {}, n_pred_cells=100, external=ext)
    new = [_value(df, "constant", c, "pearson_delta_all") for c in doubles]
    add = [_value(df, "additive", c, "pearson_delta_all") for c in doubles]
    old = [pearson(const, ref.observed[c].mean(0) - train_ctrl.mean(0)) for c in doubles]
    print("constant vector, Pearson delta on the doubles: held-out controls", np.round(new, 3),
          "training controls", np.round(old, 3), "; additive", np.round(add, 3))
    assert abs(np.mean(new)) < 0.1 and abs(np.mean(add)) < 0.1
    assert np.mean(old) > 0.4
    # the singles it lacks are reported as missing
    singles_held = [c for c, g in ref.groups.items() if g == "single"]
    miss = df[(df.method == "constant") & df.condition.isin(singles_held)]
    assert miss["value"].isna().all() and miss["note"].str.contains("no predicted cells .* \\(missing\\)").all()


def test_baseline_point_prediction_is_exact_and_the_same_every_seed(no_effect):
    """The additive baseline's predicted change is, by hand, the sum of its two singles' mean
    training changes from the training controls: its point metrics are computed from exactly
    that (not from the mean of its resampled cells, which adds resampling noise) and so are
    identical over seeds, while its distribution metrics use the resampled cells."""
    from pyro_pvae.metrics import pearson, rmse

    adata, split = no_effect
    ref = B.observed_reference(adata, split)
    cond = adata.obs["condition"].astype(str).to_numpy()
    L = adata.layers["lognorm"]
    tr = split.train_idx
    ctrl = L[tr[cond[tr] == "control"]].toarray().mean(0)
    df, _ = B.cell_benchmark(adata, split, ["additive", "control_mean"], {}, {}, seeds=2, n_pred_cells=40)
    zero = df[(df.method == "control_mean") & (df.metric == "pearson_delta_all")]
    assert zero["value"].isna().all() and zero["note"].str.contains("zero variance of the predicted").all()
    df = df[df.method == "additive"]
    doubles = [c for c, g in ref.groups.items() if g == "seen2"]
    for c in doubles:
        a, b = c.split("+")
        change = sum(L[tr[cond[tr] == t]].toarray().mean(0) - ctrl for t in (a, b))
        obs = ref.observed[c].mean(0) - ref.control.mean(0)
        v = df[(df.condition == c)].pivot_table(index="metric", columns="seed", values="value")
        for m in ("pearson_delta_all", "delta_rmse_all", "pseudobulk_rmse_all", "pearson_delta_top20de"):
            assert v.loc[m, 0] == v.loc[m, 1], m
        # float32 log-normalised cells: agreement to float32 precision
        assert v.loc["pearson_delta_all", 0] == pytest.approx(pearson(change, obs), rel=1e-4, abs=1e-6)
        assert v.loc["delta_rmse_all", 0] == pytest.approx(rmse(change, obs), rel=1e-4)
        assert v.loc["energy_distance", 0] != v.loc["energy_distance", 1]  # other resampled cells


def test_external_file_scores_like_the_builtin_method(no_effect, tmp_path):
    """The additive baseline's predictions saved as .h5ad score exactly like the built-in
    additive row: its resampled cells on the distribution metrics, every training control cell
    plus its change (whose mean is its exact point prediction) on the point metrics; an oracle
    file (the scored cells' counts, held-out controls as its control) scores a perfect change;
    conditions a file lacks are missing, in results and summary."""
    from pyro_pvae.baselines import make_baseline

    adata, split = no_effect
    ref = B.observed_reference(adata, split)
    conds = list(ref.groups)
    b = make_baseline("additive").fit(adata, split)
    pred = b.predict(conds, n_cells=60, seed=0)  # what cell_benchmark asks of it for seed 0
    pc = pred.obs["condition"].astype(str).to_numpy()
    add = _write_external(tmp_path / "mine.h5ad", conds, [pred.layers["lognorm"][pc == c] for c in conds],
                          ref.train_control, layer="lognorm")
    exact = _write_external(tmp_path / "exact.h5ad", conds, [ref.train_control + b.predict_change(c) for c in conds],
                            ref.train_control, layer="lognorm")
    X = adata.X
    oracle = _write_external(tmp_path / "oracle.h5ad", conds[1:], [X[ref.score_idx[c]] for c in conds[1:]],
                             X[ref.control_idx])
    counts = _write_external(tmp_path / "counts_layer.h5ad", conds[1:], [X[ref.score_idx[c]] for c in conds[1:]],
                             X[ref.control_idx], layer="counts")
    singles = [c for c in conds[1:] if ref.groups[c] == "single"]
    ext = B.read_external([add, oracle, counts, exact])
    df, extras = B.cell_benchmark(adata, split, ["additive"], {}, {}, n_pred_cells=60, external=ext)
    a = df[df.method == "additive"].set_index(["condition", "metric"])["value"]
    assert len(a) == len(conds) * len([m for m in B.CELL_METRICS if m not in B.INTERVAL_METRICS])
    cells_metrics = ["nrmse", "r2_mean", "mmd", "energy_distance"]
    for name, on_cells in (("mine", True), ("exact", False)):
        m = df[df.method == name].set_index(["condition", "metric"])["value"]
        assert m.index.equals(a.index)
        pick = m.index.get_level_values("metric").isin(cells_metrics) == on_cells
        tol = dict(rtol=1e-9) if on_cells else dict(rtol=1e-4, atol=1e-6)  # float32 cells in the file
        np.testing.assert_allclose(m[pick].to_numpy(), a[pick].to_numpy(), equal_nan=True, **tol)
    for name in ("oracle", "counts_layer"):
        for c in conds[1:]:
            assert _value(df, name, c, "pearson_delta_all") == pytest.approx(1.0, abs=1e-6)
            assert _value(df, name, c, "delta_rmse_all") == pytest.approx(0.0, abs=1e-6)
            assert _value(df, name, c, "pseudobulk_rmse_all") == pytest.approx(0.0, abs=1e-6)
        for c in singles:  # top-20 metrics scored on the same (all held-out) cells
            assert _value(df, name, c, "pearson_delta_top20de") == pytest.approx(1.0, abs=1e-6)
        assert np.isnan(_value(df, name, conds[0], "pearson_delta_all"))
    assert extras["missing"] == {"mine": [], "oracle": [conds[0]], "counts_layer": [conds[0]], "exact": []}
    text = B.summary_text(df, "x", [], "cells", extras)
    assert f"`oracle` has no predicted cells for 1 of the {len(conds)} held-out conditions ({conds[0]})" in text
    assert "| mine |" in text and "external `mine`" in text


def test_external_expected_counts_are_flagged(no_effect, tmp_path, caplog):
    """A file of expected counts (non-integer means, e.g. a model's NB means) is read as counts,
    with a warning and a protocol line saying its level metrics are not comparable; sampled
    (whole-number) counts are not flagged."""
    adata, split = no_effect
    ref = B.observed_reference(adata, split)
    c = list(ref.groups)[1]
    X = adata.X[ref.score_idx[c]].toarray()
    means = _write_external(tmp_path / "means.h5ad", [c], [X + 0.25], X)
    draws = _write_external(tmp_path / "draws.h5ad", [c], [X], X)
    with caplog.at_level("WARNING", logger="pyro_pvae.benchmark"):
        ext = B.read_external([means, draws])
    assert [e.expected_counts for e in ext] == [True, False]
    assert [e.counts is not None for e in ext] == [True, True]
    assert sum("means" in r.getMessage() and "non-integer counts" in r.getMessage() for r in caplog.records) == 1
    lines = B.protocol_lines(ref, ext)
    assert "not whole numbers" in lines[-2] and "not whole numbers" not in lines[-1]


def test_external_bad_files_fail_before_any_fit(tmp_path, capsys):
    import anndata as ad

    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"not an h5ad file")
    nocond = tmp_path / "nocond.h5ad"
    ad.AnnData(X=np.ones((3, 2), np.float32), obs=pd.DataFrame({"label": ["a"] * 3}, index=list("xyz"))).write_h5ad(nocond)
    cases = {f"x={tmp_path}/absent.h5ad": "does not exist", f"x={garbage}": "cannot read",
             f"x={nocond}": "has no obs['condition'] column (columns: label)",
             f"additive={nocond}": "already taken", str(nocond): "expected NAME=path"}
    for entry, message in cases.items():
        run_dir = tmp_path / "run"
        rc = B.main(["--config", "tiny", f"benchmark.external=[{entry}]", f"output.run_dir={run_dir}"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (entry, err)
        assert len(err.strip().splitlines()) == 1 and not run_dir.exists()
    # a file without the data's genes fails before any fit as well
    ext = B.read_external([f"x={nocond}"[:0] + _write_external(tmp_path / "genes.h5ad", ["G0"], [np.ones((2, 3))])])
    adata = _no_effect_data(n_genes=20)
    split = D.make_split(adata, "complete_doubles", 0)
    with pytest.raises(B.BenchmarkError, match="17 of the data's 20 genes are not in"):
        B.cell_benchmark(adata, split, ["PerturbedVAE"], {}, {}, external=ext)


def test_external_override_is_quoted_for_hydra():
    ov = B.hydra_overrides(["benchmark.external=[a=x/p.h5ad, b=/tmp/q.h5ad]", "benchmark.train.lr=0.1"])
    assert ov == ["benchmark.external=['a=x/p.h5ad','b=/tmp/q.h5ad']", "++benchmark.train.lr=0.1"]
    from pyro_pvae.config import compose

    assert list(compose("tiny", ov).benchmark.external) == ["a=x/p.h5ad", "b=/tmp/q.h5ad"]


# ------------------------------------------------------------------ effects mode: coverage, externals
def test_score_effects_coverage_by_hand():
    t = np.array([1.0, -2.0, 0.5, 0.0])
    draws = np.tile(np.linspace(-1.0, 1.0, 101)[:, None], (1, 4))  # 5%..95%: -0.9..0.9
    s = B.score_effects(np.zeros(4), t, n_top=2, change_samples=draws)
    assert s["coverage90_all"] == 0.5  # 0.5 and 0.0 inside
    assert s["coverage90_top20de"] == 0.0  # the two largest |t|: -2 and 1, both outside
    assert s["width90_all"] == pytest.approx(1.8) and s["width90_top20de"] == pytest.approx(1.8)
    assert "coverage90_all" not in B.score_effects(np.zeros(4), t)
    # intervals stretched twice about their mean (0): -1.8..1.8 covers 1, 0.5, 0 but not -2
    from pyro_pvae.metrics import IntervalCalibration

    s = B.score_effects(np.zeros(4), t, n_top=2, change_samples=draws, calibration=IntervalCalibration(k=2.0))
    assert s["coverage90_all"] == 0.75 and s["coverage90_all_uncalibrated"] == 0.5
    assert s["width90_all"] == pytest.approx(3.6) and s["width90_all_uncalibrated"] == pytest.approx(1.8)
    # against the observed change instead: 0.5, 0.0 and 0.8 inside, 2.0 outside
    s = B.score_effects(np.zeros(4), t, n_top=2, change_samples=draws, observed_change=np.array([0.5, 0.0, 0.8, 2.0]))
    assert s["coverage90_all_observed"] == 0.75


class _FakeVAE:
    """``predict`` of a model whose condition cells are its control cells times ``fold``."""

    def __init__(self, base, fold):
        self.base, self.fold = base, fold

    def predict(self, conditions, n_cells, seed=0, unknown="error"):
        import anndata as ad

        rng = np.random.default_rng(seed)
        blocks = [self.base[rng.integers(0, len(self.base), n_cells)] * (1.0 if c == "control" else self.fold)
                  for c in conditions]
        return ad.AnnData(X=np.vstack(blocks), obs=pd.DataFrame({"condition": np.repeat(conditions, n_cells)},
                                                               index=[str(i) for i in range(n_cells * len(conditions))]))


def test_effects_change_draws_pair_condition_and_control_blocks():
    base = np.random.default_rng(0).poisson(5.0, (40, 6)).astype(float) + 1
    fold = np.array([4.0, 1, 1, 1, 1, 0.25])
    draws = B.effects_change_draws(_FakeVAE(base, fold), "A", n_draws=7, n_cells=30, seed=3)
    assert draws.shape == (7, 6)
    # each draw: the same control cells with and without the shift
    fake = _FakeVAE(base, fold).predict(["A"] * 7, 30, seed=3).X
    for k in range(7):
        ctrl = fake[30 * k: 30 * (k + 1)] / fold
        want = _pb(sp.csr_matrix(fake[30 * k: 30 * (k + 1)])) - _pb(sp.csr_matrix(ctrl))
        np.testing.assert_allclose(draws[k], want, atol=1e-9)


def test_effects_external_counts_and_missing(effects_instance, tmp_path):
    """An external file holding the held-out cells' own counts (and the held-out controls as
    its control) scores exactly the noise floor; a log-normalised-only file cannot be scored
    on the log1p(CPM) scale and says so; a condition it lacks is missing."""
    from pyro_pvae.data.splits import heldout_control_idx

    adata, split = effects_instance
    cond = adata.obs["condition"].astype(str).to_numpy()
    te = split.test_idx
    held = [c for c in split.test_groups if c in set(cond[te])]
    rev = np.arange(adata.n_vars)[::-1]  # the file's genes in another order
    genes = list(adata.var_names[rev])
    blocks = [adata.X[te[cond[te] == c]][:, rev] for c in held[1:]]
    ctrl = adata.X[heldout_control_idx(split, adata)][:, rev]
    own = _write_external(tmp_path / "own.h5ad", held[1:], blocks, ctrl, genes=genes)
    logn = _write_external(tmp_path / "logn.h5ad", held, [np.log1p(b.toarray()) for b in [blocks[0]] * len(held)],
                           layer="lognorm", genes=genes)
    df, extras = B.effects_benchmark(adata, split, ["additive"], external=B.read_external([own, logn]))
    for c in held[1:]:
        assert _value(df, "own", c, "delta_rmse_all") == pytest.approx(extras["noise_floor"][c], rel=1e-9)
    assert np.isnan(_value(df, "own", held[0], "delta_rmse_all"))
    assert extras["missing"]["own"] == [held[0]]
    notes = df[df.method == "logn"]["note"]
    assert df[df.method == "logn"]["value"].isna().all() and notes.str.contains("needs predicted counts").all()


def test_score_effects_top_genes_from_select_change():
    """The top-DE genes come from ``select_change`` (the held-out cells' change), not from the
    scored truth: picking them by the size of the scored value favours genes where it lies
    furthest out."""
    t = np.array([1.0, -2.0, 0.5, 0.0])
    draws = np.tile(np.linspace(-1.0, 1.0, 101)[:, None], (1, 4))  # 5%..95%: -0.9..0.9
    sel = np.array([0.1, 0.0, 0.9, -0.7])  # the data point at genes 2 and 3
    s = B.score_effects(np.array([0.0, 0.0, 0.4, 0.1]), t, n_top=2, change_samples=draws, select_change=sel)
    assert s["coverage90_top20de"] == 1.0  # 0.5 and 0.0 inside; by |t| it would be 0.0
    assert s["pearson_delta_top20de"] == pytest.approx(1.0)  # genes 2, 3: (0.4, 0.1) vs (0.5, 0.0)
    assert list(B.top_genes(sel, 2)) == [2, 3]


def test_effects_benchmark_scores_the_model_on_every_held_out_double(effects_instance):
    """The model's path through effects mode (its point change from its own predicted controls,
    its change draws): a row per held-out double with a finite RMSE no worse than predicting no
    change by a wide margin, and coverages that are shares."""
    adata, split = effects_instance
    df, _ = B.effects_benchmark(adata, split, ["PerturbedVAE", "control_mean"], dict(latent_inv=3, latent_pert=3, hidden=16),
                                dict(epochs=2, batch_size=128, progress=False), 1, 50, 5)
    held = {c for c in split.test_groups if "+" in c}
    model = df[df.method == "PerturbedVAE"].pivot_table(index="condition", columns="metric", values="value")
    assert set(model.index) == held
    assert np.isfinite(model["delta_rmse_all"]).all()
    ctrl = df[(df.method == "control_mean") & (df.metric == "delta_rmse_all")].set_index("condition")["value"]
    assert model["delta_rmse_all"].mean() < 2 * ctrl.mean()
    for m in ("coverage90_all", "coverage90_top20de", "coverage90_all_observed"):
        assert model[m].between(0, 1).all(), m
