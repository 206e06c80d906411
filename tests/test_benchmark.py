"""Tests of ``python -m pyro_pvae.benchmark`` (tiny simulation) and of the norman_effects
scoring path (additive baseline against RMSEs computed by hand from the truth)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pyro_pvae import benchmark as B
from pyro_pvae import data as D

EXPECTED_COLUMNS = {"method", "condition", "metric", "value", "seed", "group", "note"}
MODEL_ROWS = ("PerturbedVAE", "PerturbedVAE_no_alignment", "PerturbedVAE_dense_prior")
BASELINES = ("control_mean", "additive", "additive_shrink", "linear")
CELL_METRICS = {"nrmse", "r2_mean", "mmd", "pearson_delta_all", "pearson_delta_top20de",
                "pseudobulk_rmse_all", "pseudobulk_rmse_top20de", "l2_mean_all", "energy_distance",
                "direction_acc_top20de"}


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
    assert set(df["metric"]) == CELL_METRICS | {"coverage90_top20de"}
    # coverage only for model rows
    cov = df[df["metric"] == "coverage90_top20de"]
    assert set(cov["method"]) == set(MODEL_ROWS)
    # every held-out condition for every method and every metric of that method
    split = D.Split.from_json(tiny_run / "split.json")
    held = {c for c in split.test_groups if c != D.CONTROL}
    assert held
    for m in set(df["method"]):
        dm = df[df["method"] == m]
        assert set(dm["condition"]) == held, m
        n_metrics = len(CELL_METRICS) + (1 if m in MODEL_ROWS else 0)
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
    assert set(df["metric"]) == set(B.EFFECT_METRICS) - {"coverage90_all", "coverage90_top20de"}  # baselines: no draws
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
        top = np.argsort(-np.abs(t))[:20]
        got = df[(df.method == "additive") & (df.condition == c) & (df.metric == "pearson_delta_top20de")]
        assert got["value"].iloc[0] == pytest.approx(np.corrcoef(add[top], t[top])[0, 1], abs=1e-9)


def test_score_effects_by_hand():
    t = np.array([1.0, -2.0, 0.5, 0.0])
    p = np.array([0.5, -1.0, 0.5, 1.0])
    s = B.score_effects(p, t, n_top=3)
    assert s["delta_rmse_all"] == pytest.approx(math.sqrt((0.25 + 1 + 0 + 1) / 4))
    assert s["pearson_delta_all"] == pytest.approx(np.corrcoef(p, t)[0, 1])
    assert s["pearson_delta_top20de"] == pytest.approx(np.corrcoef(p[[1, 0, 2]], t[[1, 0, 2]])[0, 1])
