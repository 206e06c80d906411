"""Baselines on a small hand-built canonical AnnData with known lognorm condition means."""
import types

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_pvae import baselines as B
from pyro_pvae.metrics import lognormalize_counts

GENES = [f"g{i}" for i in range(6)]
RNG = np.random.default_rng(0)
N = 6  # cells per condition
# known lognorm-scale changes from control
D = {
    "A": np.array([1.0, 0, 0, 0.5, 0, 0]),
    "B": np.array([0, -0.5, 0, 0, 2.0, 0]),
    "C": np.array([0, 0, 1.0, 0, 0, 0.3]),
    "D": np.array([0.4, 0, 0, -1.0, 0, 0]),
    "E": np.array([0, 0.7, 0, 0, 0, -0.6]),
    "F": np.array([0, 0, 0, 0.2, 0.9, 0]),
}
SHRINK = 0.6  # training doubles are 0.6 x the additive sum


def _make(train_doubles=("C+D", "E+F"), shrink=SHRINK):
    """Rows: control, singles A..F, training doubles, then the held-out test double A+B
    (and 3 held-out A cells with a wild profile). Returns adata, split, control mean."""
    ctrl = 2.0 + RNG.normal(0, 0.3, size=(8, len(GENES)))
    cm = ctrl.mean(0)
    blocks, labels = [ctrl], ["control"] * len(ctrl)

    def add(label, change):
        noise = RNG.normal(0, 0.2, size=(N, len(GENES)))
        noise -= noise.mean(0)  # exact condition mean
        blocks.append(cm + change + noise)
        labels.extend([label] * N)

    for g, d in D.items():
        add(g, d)
    for dbl in train_doubles:
        a, b = dbl.split("+")
        add(dbl, shrink * (D[a] + D[b]))
    n_train = sum(len(b) for b in blocks)
    add("A+B", D["A"] + D["B"] + 5.0)  # held-out: must not influence any fit
    blocks.append(np.full((3, len(GENES)), 50.0))
    labels.extend(["A"] * 3)  # held-out A cells, not in train_idx
    L = np.vstack(blocks)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.ones_like(L, dtype=np.float32)),
        obs=pd.DataFrame({"condition": labels,
                          "n_targets": [0 if c == "control" else len(c.split("+")) for c in labels]},
                         index=[f"c{i}" for i in range(len(L))]),
        var=pd.DataFrame(index=GENES))
    adata.layers["lognorm"] = L.astype(np.float64)
    split = types.SimpleNamespace(train_idx=np.arange(n_train),
                                  test_idx=np.arange(n_train, len(L)))
    return adata, split, cm


def test_additive_exact_on_constructed_data():
    adata, split, cm = _make()
    m = B.Additive().fit(adata, split)
    assert m.name == "additive"
    np.testing.assert_allclose(m.control_mean_, cm)
    np.testing.assert_allclose(m.predict_change("A+B"), D["A"] + D["B"], atol=1e-12)
    np.testing.assert_allclose(m.predict_change("B+A"), D["A"] + D["B"], atol=1e-12)
    np.testing.assert_allclose(m.predict_change("A"), D["A"], atol=1e-12)  # own training mean
    np.testing.assert_allclose(m.predict_change("control"), 0.0)
    pred = m.predict(["A+B", "C"], n_cells=10, seed=3)
    assert pred.shape == (20, len(GENES)) and list(pred.var_names) == GENES
    assert list(pred.obs["condition"]) == ["A+B"] * 10 + ["C"] * 10
    L = adata.layers["lognorm"]
    start = L[pred.obs["control_index"].to_numpy()]
    assert (adata.obs["condition"].to_numpy()[pred.obs["control_index"]] == "control").all()
    np.testing.assert_allclose(pred.layers["lognorm"][:10], start[:10] + D["A"] + D["B"],
                               atol=1e-5)
    # reproducible by seed
    np.testing.assert_array_equal(m.predict(["A+B"], n_cells=10, seed=3).layers["lognorm"],
                                  pred.layers["lognorm"][:10])


def test_additive_unseen_single_contributes_zero_and_is_recorded():
    adata, split, _ = _make()
    m = B.Additive().fit(adata, split)
    np.testing.assert_allclose(m.predict_change("A+ZZZ"), D["A"], atol=1e-12)
    assert "ZZZ" in m.notes["A+ZZZ"]
    assert "A+B" not in m.notes


def test_additive_from_counts_matches_hand_lognorm():
    counts = np.array([[1, 3, 0], [2, 2, 0],   # control
                       [0, 1, 3], [0, 3, 1]],  # A
                      dtype=np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts),
                       obs=pd.DataFrame({"condition": ["control", "control", "A", "A"]},
                                        index=list("abcd")),
                       var=pd.DataFrame(index=["x", "y", "z"]))
    m = B.Additive().fit(adata, types.SimpleNamespace(train_idx=np.arange(4)))
    lg = np.log1p
    ctrl_mean = np.array([(lg(2500) + lg(5000)) / 2, (lg(7500) + lg(5000)) / 2, 0.0])
    a_mean = np.array([0.0, (lg(2500) + lg(7500)) / 2, (lg(7500) + lg(2500)) / 2])
    np.testing.assert_allclose(m.predict_change("A"), a_mean - ctrl_mean, rtol=1e-5)
    np.testing.assert_allclose(lognormalize_counts(counts)[2], [0, lg(2500), lg(7500)])


def test_additive_shrink_recovers_known_factor():
    adata, split, _ = _make()
    m = B.AdditiveShrink().fit(adata, split)
    assert m.name == "additive_shrink"
    assert m.c_ == pytest.approx(SHRINK, abs=1e-10)
    assert sorted(m.shrink_doubles_) == ["C+D", "E+F"]
    np.testing.assert_allclose(m.predict_change("A+B"), SHRINK * (D["A"] + D["B"]), atol=1e-10)
    np.testing.assert_allclose(m.predict_change("A"), D["A"], atol=1e-12)  # singles unshrunk


def test_additive_shrink_defaults_and_clipping():
    adata, split, _ = _make(train_doubles=())
    assert B.AdditiveShrink().fit(adata, split).c_ == 1.0
    adata, split, _ = _make(shrink=3.5)
    assert B.AdditiveShrink().fit(adata, split).c_ == 2.0
    adata, split, _ = _make(shrink=-1.0)
    assert B.AdditiveShrink().fit(adata, split).c_ == 0.0


def test_control_mean_predicts_control_cells():
    adata, split, _ = _make()
    m = B.ControlMean().fit(adata, split)
    assert m.name == "control_mean"
    np.testing.assert_array_equal(m.predict_change("A+B"), np.zeros(len(GENES)))
    pred = m.predict("A+B", n_cells=5, seed=1)
    np.testing.assert_allclose(pred.layers["lognorm"],
                               adata.layers["lognorm"][pred.obs["control_index"]], atol=1e-5)


def test_linear_composes_by_summing_embeddings():
    adata, split, _ = _make()
    m = B.Linear(n_components=4, ridge=0.1).fit(adata, split)
    assert m.name == "linear"
    fa, fb, fab = (m.predict_change(c) for c in ("A", "B", "A+B"))
    assert fab.shape == (len(GENES),) and np.isfinite(fab).all()
    # linear in the embedding: f(A+B) - b = (f(A) - b) + (f(B) - b)
    np.testing.assert_allclose(fab - m.b_, (fa - m.b_) + (fb - m.b_), atol=1e-10)
    np.testing.assert_allclose(m.predict_change("control"), 0.0)
    # fitting ignores held-out cells: same fit with the test cells deleted
    keep = split.train_idx
    m2 = B.Linear(n_components=4, ridge=0.1).fit(adata[keep].copy(), None)
    np.testing.assert_allclose(m2.predict_change("A+B"), fab, atol=1e-8)
    # a target neither measured nor trained gets a zero embedding, recorded
    np.testing.assert_allclose(m.predict_change("QQQ"), m.b_, atol=1e-12)
    assert "QQQ" in m.notes["QQQ"]
    # the fit explains the training singles better than predicting no change
    err = np.mean([np.sum((m.predict_change(g) - d) ** 2) for g, d in D.items()])
    assert err < np.mean([np.sum(d ** 2) for d in D.values()])


def test_make_baseline_names_and_predict_before_fit():
    assert set(B.BASELINES) == {"control_mean", "additive", "additive_shrink", "linear"}
    assert isinstance(B.make_baseline("additive_shrink"), B.AdditiveShrink)
    with pytest.raises(ValueError):
        B.make_baseline("nope")
    with pytest.raises(RuntimeError):
        B.Additive().predict(["A"])
