"""Tests of the data layer: readers, validation, preprocessing, splits, batchers."""
from __future__ import annotations

import logging
import stat

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_pvae import data
from pyro_pvae.data.splits import heldout_control_idx
from pyro_pvae.data import DataError

# ---------------------------------------------------------------------------------------
# helpers: a small experiment written in each format
# ---------------------------------------------------------------------------------------

TARGETS = ["KLF1", "MAP2K3", "MAP2K6", "SET", "CEBPE"]
GENES = TARGETS + [f"G{i}" for i in range(25)]
# canonical conditions with cell counts
DESIGN = {"control": 40, "KLF1": 12, "MAP2K3": 12, "MAP2K6": 12, "SET": 12,
          "KLF1+MAP2K6": 10, "MAP2K3+MAP2K6": 10, "CEBPE+SET": 8}


def _canon_conditions():
    return [c for c, n in DESIGN.items() for _ in range(n)]


def _counts(n, g, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, size=(n, g)).astype(np.float32)
    x[:, -1] = np.arange(n)  # every cell's row is distinct
    return x


def _label(cond, fmt):
    t = data.parse_condition(cond)
    if fmt == "cpa":
        return ",".join(t) if t else ""
    if fmt == "gears":
        if not t:
            return "ctrl"
        if len(t) == 1:  # both GEARS spellings of a single
            return t[0] + "+ctrl" if t[0] < "M" else "ctrl+" + t[0]
        return "+".join(t[::-1])  # unsorted on purpose
    if fmt == "scperturb":
        return "_".join(t) if t else "control"
    if fmt == "generic":
        return "|".join(t) if t else "NT"
    if fmt == "replogle":
        return "+".join(t) if t else "non-targeting"
    return "+".join(t[::-1]) if t else "control"  # canonical-ish, unsorted doubles


def _make(fmt="canonical", seed=0):
    cond = _canon_conditions()
    x = _counts(len(cond), len(GENES), seed)
    labels = [_label(c, fmt) for c in cond]
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(cond))])
    var = pd.DataFrame(index=list(GENES))
    key = {"cpa": "guide_ids", "gears": "condition", "scperturb": "perturbation",
           "generic": "guide", "canonical": "condition", "replogle": "gene"}[fmt]
    obs[key] = labels
    if fmt == "replogle":  # as the Replogle 2022 single-cell files: dense float32 counts in X, Ensembl
        # IDs as var_names with the symbols in var['gene_name'], and more per-cell columns
        obs["gene_id"] = [f"ENSG9{i:04d}" for i in range(len(cond))]
        obs["sgID_AB"] = [f"{lab}_sg{i}" for i, lab in enumerate(labels)]
        obs["UMI_count"] = x.sum(1).astype(np.float32)
        var = pd.DataFrame({"gene_name": GENES}, index=[f"ENSG{i:05d}" for i in range(len(GENES))])
        return ad.AnnData(X=x.astype(np.float32), obs=obs, var=var), x, cond
    if fmt == "gears":
        var = pd.DataFrame({"gene_name": GENES}, index=[f"ENSG{i:05d}" for i in range(len(GENES))])
        a = ad.AnnData(X=sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4)), obs=obs, var=var)
        a.layers["counts"] = sp.csr_matrix(x)
        return a, x, cond
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var), x, cond


def _write(a, tmp_path, name="d.h5ad"):
    p = tmp_path / name
    a.write_h5ad(p)
    return p


# ---------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["cpa", "gears", "scperturb", "canonical", "generic", "replogle"])
def test_readers_give_same_canonical_form(fmt, tmp_path, caplog):
    a, x, cond = _make(fmt)
    p = _write(a, tmp_path)
    kw = dict(label_key="guide", control_label="NT", sep="|") if fmt == "generic" else {}
    with caplog.at_level(logging.INFO, logger="pyro_pvae.data"):
        c = data.read_perturbseq(p, **kw)
    assert list(c.obs["condition"].astype(str)) == cond
    assert list(c.var_names) == GENES
    assert sp.isspmatrix_csr(c.X) and c.X.dtype == np.float32
    np.testing.assert_array_equal(c.X.toarray(), x)
    assert list(c.obs["n_targets"]) == [len(data.parse_condition(k)) for k in cond]
    expected_fmt = "generic" if fmt == "generic" else fmt
    assert c.uns["pyro_pvae"]["format"] == expected_fmt
    assert f"using format '{expected_fmt}'" in caplog.text
    # original label column kept
    orig = {"cpa": "guide_ids", "gears": "condition_original", "scperturb": "perturbation",
            "generic": "guide", "canonical": "condition_original", "replogle": "gene"}[fmt]
    assert list(c.obs[orig].astype(str)) == list(a.obs.iloc[:, 0].astype(str))
    if fmt == "gears":
        assert c.uns["pyro_pvae"]["counts_source"] == "layers['counts']"
    if fmt in ("gears", "replogle"):
        assert list(c.var["gene_id"])[:2] == ["ENSG00000", "ENSG00001"]


def test_auto_respects_user_label_key():
    a, _, cond = _make("canonical")
    a.obs["guide_ids"] = "junk"  # a CPA column that must not win over the user's label_key
    c = data.to_canonical(a, label_key="condition")
    assert c.uns["pyro_pvae"]["format"] == "canonical"
    assert list(c.obs["condition"].astype(str)) == cond
    a.obs["my_label"] = a.obs["condition"].astype(str).str.replace("+", "&", regex=False)
    c = data.to_canonical(a, label_key="my_label", sep="&")
    assert c.uns["pyro_pvae"]["format"] == "generic" and c.uns["pyro_pvae"]["control_label"] == "control"
    assert list(c.obs["condition"].astype(str)) == cond


def test_to_canonical_in_memory_and_explicit_format():
    a, x, cond = _make("scperturb")
    c = data.to_canonical(a, format="scperturb")
    assert list(c.obs["condition"].astype(str)) == cond
    data.validate_canonical(c)


def test_counts_from_raw_aligned_to_var_names():
    a, x, cond = _make("canonical")
    # raw: genes in another order plus an extra gene
    raw_genes = ["EXTRA"] + GENES[::-1]
    raw_x = np.concatenate([np.ones((len(cond), 1), np.float32), x[:, ::-1]], axis=1)
    b = ad.AnnData(X=sp.csr_matrix(raw_x), obs=a.obs.copy(), var=pd.DataFrame(index=raw_genes))
    b.raw = b
    b = b[:, GENES].copy()
    b.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    c = data.to_canonical(b)
    assert c.uns["pyro_pvae"]["counts_source"] == "raw.X"
    np.testing.assert_array_equal(c.X.toarray(), x)


def test_shipped_subset_canonicalised():
    from pyro_pvae.datasets import norman19_effects, norman19_subset

    a = norman19_subset()
    assert a.shape == (3375, 500)
    conds = set(a.obs["condition"].astype(str))
    assert "KLF1+SET" in conds and "SET+KLF1" not in conds
    assert (a.obs["condition_original"] == "SET+KLF1").sum() == 100
    assert a.X.dtype == np.float32 and sp.isspmatrix_csr(a.X)
    e = norman19_effects()
    assert e["lfc_s"].shape == (104, 2000) and e["lfc_d"].shape == (130, 2000)
    assert e["comp_ok"].sum() == 126


# ---------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist.*nope.h5ad"):
        data.read_perturbseq(tmp_path / "nope.h5ad")


def test_wrong_suffix_and_unreadable(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"not an \.h5ad file \(suffix '\.csv'\)"):
        data.read_perturbseq(p)
    q = tmp_path / "bad.h5ad"
    q.write_bytes(b"this is not hdf5")
    with pytest.raises(DataError, match="could not read .*bad.h5ad.* as h5ad") as ei:
        data.read_perturbseq(q)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_missing_label_column_lists_columns(tmp_path):
    a, _, _ = _make("canonical")
    a.obs["batch"] = "b1"
    p = _write(a, tmp_path)
    with pytest.raises(DataError, match=r"obs\['guide'\] not found.*\['condition', 'batch'\]"):
        data.read_perturbseq(p, format="generic", label_key="guide", control_label="NT")
    b = ad.AnnData(X=a.X, obs=a.obs[["batch"]], var=a.var)
    with pytest.raises(DataError, match=r"could not detect.*obs columns: \['batch'\]"):
        data.to_canonical(b)


def test_no_control_cells_lists_labels():
    a, _, _ = _make("canonical")
    a.obs["condition"] = a.obs["condition"].replace({"control": "non-targeting"})
    with pytest.raises(DataError, match=r"no control cells.*'control'.*'non-targeting' \(40\)"):
        data.to_canonical(a)
    # naming the control label fixes it
    c = data.to_canonical(a, control_label="non-targeting")
    assert (c.obs["condition"] == "control").sum() == 40


@pytest.mark.parametrize("bad,what", [(np.nan, "1 NaN"), (np.inf, "1 inf"), (-2.0, "1 negative")])
def test_bad_values_in_counts(bad, what):
    a, x, _ = _make("canonical")
    x = x.copy()
    x[3, 4] = bad
    a.X = sp.csr_matrix(x)
    with pytest.raises(DataError, match=f"{what} values in X"):
        data.to_canonical(a)


def test_negative_in_counts_layer_names_layer():
    a, x, _ = _make("gears")
    m = a.layers["counts"].toarray()
    m[0, 0] = -1
    m[1, 0] = -3
    a.layers["counts"] = sp.csr_matrix(m)
    with pytest.raises(DataError, match=r"2 negative values in layers\['counts'\]"):
        data.to_canonical(a)


def test_lognormalised_without_counts_refused(tmp_path):
    a, x, _ = _make("gears")
    del a.layers["counts"]
    p = _write(a, tmp_path)
    with pytest.raises(DataError) as ei:
        data.read_perturbseq(p)
    msg = str(ei.value)
    assert "no raw integer UMI counts" in msg and "d.h5ad" in msg
    assert "X (" in msg and "non-integer" in msg and "layers['counts'] (absent" in msg
    assert "raw (absent)" in msg


@pytest.mark.parametrize("label,pattern", [("KLF1+", r"'KLF1\+'"), ("", "''"),
                                            ("+SET", r"'\+SET'")])
def test_empty_conditions(label, pattern):
    a, _, _ = _make("canonical")
    labs = a.obs["condition"].astype(str).to_numpy().copy()
    labs[50] = label
    a.obs["condition"] = labs
    with pytest.raises(DataError, match=f"empty target name in label {pattern}"):
        data.to_canonical(a)


def test_cpa_empty_string_is_control_not_error():
    a, _, cond = _make("cpa")
    c = data.to_canonical(a)
    assert (c.obs["condition"] == "control").sum() == DESIGN["control"]


def test_duplicate_gene_names():
    a, _, _ = _make("canonical")
    names = list(GENES)
    names[7] = "G0"
    a.var_names = names
    with pytest.raises(DataError, match=r"duplicate gene names.*\['G0'\]"):
        data.to_canonical(a)


def test_typo_like_targets_flagged_but_similar_genes_not():
    a, _, _ = _make("canonical")
    labs = a.obs["condition"].astype(str).to_numpy().copy()
    labs[41] = "klf1"
    labs[42] = "KLF-1"
    a.obs["condition"] = labs
    with pytest.raises(DataError, match=r"'KLF-1' vs 'KLF1' vs 'klf1'"):
        data.to_canonical(a)
    b, _, _ = _make("canonical")  # MAP2K3 and MAP2K6 are both present: fine
    c = data.to_canonical(b)
    assert {"MAP2K3", "MAP2K6"} <= set(data.perturbation_vocabulary(c))


@pytest.mark.parametrize("corrupt,message", [
    ("index_too_large", r"column indices outside \[0, 30\): min 0, max 99"),
    ("index_negative", r"column indices outside \[0, 30\): min -1,"),
    ("indptr_decreasing", r"index pointer decreases at 5"),
])
def test_corrupt_sparse_counts_in_file(corrupt, message, tmp_path):
    import h5py

    p = _write(_make("canonical")[0], tmp_path)
    with h5py.File(p, "r+") as f:
        indices, indptr = f["X/indices"], f["X/indptr"]
        if corrupt == "index_too_large":
            indices[3] = 99
        elif corrupt == "index_negative":
            indices[3] = -1
        else:
            v = indptr[:]
            v[5] = v[6] + 1
            indptr[...] = v
    with pytest.raises(DataError, match=f"X of .*d.h5ad is a corrupt sparse matrix \\({message}"):
        data.read_perturbseq(p)


def test_unsorted_and_duplicate_sparse_entries_are_canonicalised(tmp_path):
    a, x, cond = _make("canonical")
    m = sp.csr_matrix(x)
    s, e = m.indptr[2], m.indptr[3]
    m.indices[s:e], m.data[s:e] = m.indices[s:e][::-1].copy(), m.data[s:e][::-1].copy()
    # one entry of row 0 split into two duplicate entries: 1 + (x - 1)
    j, v = m.indices[0], m.data[0]
    ind = np.insert(m.indices, 1, j)
    dat = np.insert(m.data, 1, v - 1)
    dat[0] = 1
    ptr = m.indptr.copy()
    ptr[1:] += 1
    a.X = sp.csr_matrix((dat, ind, ptr), shape=x.shape)
    assert not a.X.has_canonical_format
    c = data.read_perturbseq(_write(a, tmp_path))
    assert c.X.has_canonical_format
    np.testing.assert_array_equal(c.X.toarray(), x)


def _canonical_in_memory():
    a, x, _ = _make("canonical")
    a.obs["condition"] = data.to_canonical(a).obs["condition"].astype(str).to_numpy()
    return a, x


def _bad_case(case):
    a, x = _canonical_in_memory()
    x = x.copy()
    if case == "lognormalised":
        a.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    elif case == "halved":
        a.X = sp.csr_matrix(x / 2)
    elif case in ("nan", "inf", "negative"):
        x[3, 4] = {"nan": np.nan, "inf": np.inf, "negative": -2.0}[case]
        a.X = sp.csr_matrix(x)
    elif case == "duplicated_genes":
        names = list(GENES)
        names[7] = "G0"
        a.var_names = names
    elif case == "no_condition_column":
        a.obs = a.obs.rename(columns={"condition": "guide"})
    elif case == "no_control":
        a.obs["condition"] = a.obs["condition"].replace({"control": "non-targeting"})
    return a


@pytest.mark.parametrize("case,message", [
    ("lognormalised", r"no raw integer UMI counts found in <in-memory AnnData>: checked X "
                      r"\(\d+ non-integer values .*looks normalised"),
    ("halved", r"no raw integer UMI counts found in <in-memory AnnData>: checked X "
               r"\(\d+ non-integer values \(e.g. 0.5;"),
    ("nan", r"^1 NaN values in X; raw UMI counts must be finite and >= 0$"),
    ("inf", r"^1 inf values in X; raw UMI counts must be finite and >= 0$"),
    ("negative", r"^1 negative values in X; raw UMI counts must be finite and >= 0$"),
    ("duplicated_genes", r"^1 duplicate gene names in <in-memory AnnData>: \['G0'\]"),
    ("no_condition_column", r"^label column obs\['condition'\] not found in <in-memory "
                            r"AnnData>; obs columns: \['guide'\]"),
    ("no_control", r"^no control cells in obs\['condition'\] of <in-memory AnnData>: expected "
                   r"label 'control'; most common labels: 'non-targeting' \(40\), 'KLF1' \(12\)"),
])
def test_validate_canonical_same_messages_as_readers(case, message):
    a = _bad_case(case)
    with pytest.raises(DataError, match=message) as by_validation:
        data.validate_canonical(a)
    with pytest.raises(DataError) as by_reader:
        data.to_canonical(a, format="canonical")
    assert str(by_validation.value) == str(by_reader.value)


def test_validate_canonical_accepts_canonical_and_refuses_other_forms():
    a, x = _canonical_in_memory()
    assert data.validate_canonical(a) is a  # nothing to drop: the same object
    b = a.copy()
    b.obs["condition"] = b.obs["condition"].replace({"KLF1+MAP2K6": "MAP2K6+KLF1"})
    with pytest.raises(DataError, match=r"non-canonical labels in obs\['condition'\] of "
                                        r"<in-memory AnnData>: \['MAP2K6\+KLF1'\]; expected sorted"):
        data.validate_canonical(b)
    b = a.copy()
    b.layers["counts"] = b.X.copy()
    b.X = sp.csr_matrix(np.log1p(x))
    with pytest.raises(DataError, match=r"X of <in-memory AnnData> does not hold raw integer "
                                        r"counts \(.*non-integer.*\); they are in layers\['counts'\]"):
        data.validate_canonical(b)
    b = a.copy()
    b.X.indices[2] = 999  # corrupt in memory as well
    with pytest.raises(DataError, match=r"X of <in-memory AnnData> is a corrupt sparse matrix"):
        data.validate_canonical(b)


def _with_empty_cells(rows):
    a, x = _canonical_in_memory()
    x = x.copy()
    x[rows] = 0
    a.X = sp.csr_matrix(x)
    return a, x


def test_zero_count_cells_dropped_by_readers_and_validation(tmp_path, caplog):
    rows = [0, 1, 45]  # two control cells, one KLF1 cell
    a, x = _with_empty_cells(rows)
    keep = np.setdiff1d(np.arange(len(x)), rows)
    with caplog.at_level(logging.WARNING, logger="pyro_pvae.data"):
        c = data.read_perturbseq(_write(a, tmp_path))
    assert "d.h5ad: dropped 3 of 116 cells with zero total counts" in caplog.text
    assert "'control' (2)" in caplog.text and "'KLF1' (1)" in caplog.text
    assert c.n_obs == 113 and list(c.obs_names) == [f"c{i}" for i in keep]
    np.testing.assert_array_equal(c.X.toarray(), x[keep])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyro_pvae.data"):
        v = data.validate_canonical(a)
    assert "<in-memory AnnData>: dropped 3 of 116 cells with zero total counts" in caplog.text
    assert v is not a and a.n_obs == 116 and v.n_obs == 113
    np.testing.assert_array_equal(v.X.toarray(), x[keep])
    with pytest.raises(DataError, match=r"^3 cells of <in-memory AnnData> have zero total counts"):
        data.validate_canonical(a, drop_empty=False)


def test_zero_count_controls_only_means_no_control(caplog):
    a, _ = _with_empty_cells(list(range(DESIGN["control"])))
    for check in (data.to_canonical, data.validate_canonical):
        with pytest.raises(DataError, match=r"no control cells in obs\['condition'\]"):
            check(a)


def test_select_hvg_drops_cells_left_without_counts(caplog):
    a, x = _canonical_in_memory()
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)  # a flat gene: never variable
    x[7] = 0
    x[7, -1] = 1  # cell 7 has counts in the flat gene only
    a = ad.AnnData(X=sp.csr_matrix(x), obs=a.obs, var=pd.DataFrame(index=GENES + ["FLAT"]))
    with caplog.at_level(logging.WARNING, logger="pyro_pvae.data"):
        h = data.select_hvg(a, n_top_genes=8)
    assert "FLAT" not in h.var_names
    assert "select_hvg (8 genes): dropped 1 of 116 cells with zero total counts" in caplog.text
    assert h.n_obs == 115 and "c7" not in h.obs_names



def test_filter_genes_drops_genes_seen_in_too_few_cells_but_keeps_the_targets(caplog):
    a, x = _canonical_in_memory()
    x = x.copy()
    x[:, GENES.index("G0")] = 0                 # detected nowhere
    x[:, GENES.index("G1")] = 0
    x[:2, GENES.index("G1")] = 3                # in 2 cells
    x[:, GENES.index("SET")] = 0                # a target, detected nowhere: kept
    a = ad.AnnData(X=sp.csr_matrix(x), obs=a.obs, var=pd.DataFrame(index=GENES))
    assert all((x[:, GENES.index(g)] > 0).sum() >= 3 for g in GENES if g not in ("G0", "G1", "SET"))
    with caplog.at_level(logging.INFO, logger="pyro_pvae.data"):
        f2, f3 = data.filter_genes(a, 2), data.filter_genes(a, 3)
    assert list(f2.var_names) == [g for g in GENES if g != "G0"]
    assert list(f3.var_names) == [g for g in GENES if g not in ("G0", "G1")]
    assert f3.n_obs == a.n_obs and np.array_equal(f3.X.toarray(), np.delete(x, [5, 6], axis=1))
    assert f"filter_genes (min_cells=3): dropped 2 of {len(GENES)} genes" in caplog.text
    assert data.filter_genes(a, 0) is a
    no_targets = a[:, len(TARGETS):].copy()  # the targets are not measured: nothing forced
    with pytest.raises(DataError, match=r"no gene is detected in that many cells \(at most \d+ of 116\); lower"):
        data.filter_genes(no_targets, 117)
    with pytest.raises(ValueError, match="min_cells must be a whole number >= 0, got -1"):
        data.filter_genes(a, -1)


def test_filter_genes_refuses_a_backed_anndata(tmp_path):
    a, _ = _canonical_in_memory()
    backed = ad.read_h5ad(_write(a, tmp_path), backed="r")
    with pytest.raises(DataError, match="needs the counts in memory, and this AnnData is backed"):
        data.filter_genes(backed, 1)


def test_min_cells_drops_the_shipped_subsets_silent_genes():
    from pyro_pvae.config import compose, load_dataset

    full = load_dataset(compose("norman", []))
    kept = load_dataset(compose("norman", ["data.min_cells=1"]))
    assert (full.n_vars, kept.n_vars, kept.n_obs) == (500, 250, full.n_obs)  # 250 genes have no count at all
    assert np.asarray(kept.X.sum(axis=0)).min() > 0 and "TMSB4X" in kept.var_names

# ---------------------------------------------------------------------------------------
# preprocessing and encodings
# ---------------------------------------------------------------------------------------

def test_lognormalize_and_library_size():
    x = np.array([[1, 0, 3], [0, 0, 0], [2, 2, 0]], dtype=np.float32)
    np.testing.assert_allclose(data.library_size(sp.csr_matrix(x)), [4, 0, 4])
    ln = data.lognormalize(sp.csr_matrix(x)).toarray()
    np.testing.assert_allclose(ln[0], np.log1p(x[0] / 4 * 1e4), rtol=1e-6)
    np.testing.assert_array_equal(ln[1], 0)
    a = ad.AnnData(X=sp.csr_matrix(x))
    data.lognormalize(a)
    np.testing.assert_allclose(a.layers["lognorm"].toarray(), ln)
    np.testing.assert_allclose(data.lognormalize(x), ln, rtol=1e-6)


def test_hvg_keeps_target_genes():
    a, x, _ = _make("canonical")
    x = x.copy()
    x[:, :len(TARGETS)] = 1.0  # targets flat: never highly variable by themselves
    a.X = sp.csr_matrix(x)
    c = data.to_canonical(a)
    h = data.select_hvg(c, n_top_genes=8, keep=["G3"])
    assert set(TARGETS) <= set(h.var_names) and "G3" in h.var_names
    assert h.n_vars == 8
    assert h.var["forced"].sum() == 6
    h2 = data.select_hvg(c, n_top_genes=12)
    assert h2.n_vars == 12 and set(TARGETS) <= set(h2.var_names)
    assert list(h2.var_names) == [g for g in c.var_names if g in set(h2.var_names)]


def test_perturbation_vocabulary_and_matrix():
    c = data.to_canonical(_make("canonical")[0])
    assert data.perturbation_vocabulary(c) == sorted(TARGETS)
    idx = np.flatnonzero(c.obs["condition"].isin(["control", "KLF1+MAP2K6"]))
    assert data.perturbation_vocabulary(c, idx) == ["KLF1", "MAP2K6"]
    u = data.perturbation_matrix(["control", "KLF1+MAP2K6", "SET"], ["KLF1", "MAP2K6", "SET"])
    np.testing.assert_array_equal(u, [[0, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert u.dtype == np.float32
    with pytest.raises(DataError, match=r"'KLF2' \(nearest known: \['KLF1'"):
        data.perturbation_matrix(["KLF2+SET"], ["KLF1", "MAP2K6", "SET"])
    u = data.perturbation_matrix(["KLF2+SET"], ["KLF1", "MAP2K6", "SET"], unknown="ignore")
    np.testing.assert_array_equal(u, [[0, 0, 1]])


# ---------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------

def _split_invariants(s, c):
    tr, va, te = set(s.train_idx), set(s.val_idx), set(s.test_idx)
    assert not (tr & te) and not (va & te) and not (tr & va)
    cond = c.obs["condition"].astype(str).to_numpy()
    assert set(cond[s.test_idx]) - {"control"} == set(s.test_conditions) or s.name == "iid"
    assert set(s.test_groups) == set(s.test_conditions)
    assert set(s.test_groups.values()) <= {"single", "seen0", "seen1", "seen2"}


@pytest.fixture(scope="module")
def canon():
    return data.to_canonical(_make("canonical")[0])


@pytest.mark.parametrize("name", ["norman_discrepancy", "combo_seen", "complete_doubles", "iid"])
def test_split_invariants_determinism_json(name, canon, tmp_path):
    s = data.make_split(canon, name, seed=3)
    _split_invariants(s, canon)
    s2 = data.make_split(canon, name, seed=3)
    for k in ("train_idx", "val_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(s, k), getattr(s2, k))
    assert s.test_groups == s2.test_groups
    cond = canon.obs["condition"].astype(str).to_numpy()
    ctrl = np.flatnonzero(cond == "control")
    held = heldout_control_idx(s, canon)
    # half of the controls are held out (test cells labelled control), the rest train or validate
    assert len(held) == round(0.5 * len(ctrl)) and set(cond[held]) == {"control"}
    assert set(ctrl) - set(held) <= set(s.train_idx) | set(s.val_idx)
    assert "control" not in s.test_groups and s.params["control_test_fraction"] == 0.5
    assert len(s.val_idx) > 0
    p = tmp_path / "sub" / "split.json"
    s.to_json(p)
    r = data.Split.from_json(p)
    assert r.name == name and r.seed == 3 and r.test_groups == s.test_groups
    assert r.train_conditions == s.train_conditions and r.test_conditions == s.test_conditions
    np.testing.assert_array_equal(r.test_idx, s.test_idx)
    np.testing.assert_array_equal(r.val_idx, s.val_idx)
    assert list(p.parent.iterdir()) == [p]  # no temp file left behind
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_norman_discrepancy_first_96_and_seen_groups():
    rows = (["control"] * 30 + ["KLF1"] * 100 + ["SET"] * 50 + ["MAP2K3"] * 20
            + ["KLF1+MAP2K3"] * 5 + ["CEBPE+KLF1"] * 5 + ["CEBPE+FOXA1"] * 5)
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    a = ad.AnnData(X=sp.csr_matrix(_counts(len(rows), 4)),
                   obs=pd.DataFrame({"condition": rows}, index=[str(i) for i in range(len(rows))]))
    c = data.to_canonical(a)
    s = data.split_norman_discrepancy(c, seed=0)
    cond = np.array(rows)
    klf1 = np.flatnonzero(cond == "KLF1")
    te = set(s.test_idx)
    assert set(klf1[:96]) <= te and not (set(klf1[96:]) & te)
    assert set(np.flatnonzero(cond == "SET")) <= te  # fewer than 96 cells: all held out
    assert not set(np.flatnonzero(cond == "MAP2K3")) & te  # not one of the 14
    assert s.test_groups == {"KLF1": "single", "SET": "single", "KLF1+MAP2K3": "seen2",
                             "CEBPE+KLF1": "seen1", "CEBPE+FOXA1": "seen0"}
    # seeds change val and the held-out controls only, never the perturbed test cells
    s7 = data.split_norman_discrepancy(c, seed=7)
    pert = lambda idx: idx[cond[idx] != "control"]  # noqa: E731
    np.testing.assert_array_equal(pert(s7.test_idx), pert(s.test_idx))
    assert not np.array_equal(heldout_control_idx(s7, c), heldout_control_idx(s, c))
    assert not np.array_equal(s7.val_idx, s.val_idx)


def test_combo_seen_membership():
    genes = [f"T{i}" for i in range(10)]
    rows = ["control"] * 40
    for g in genes:
        rows += [g] * 10
    doubles = [f"{genes[i]}+{genes[j]}" for i in range(10) for j in range(i + 1, 10)][:30]
    for d in doubles:
        rows += [d] * 3
    a = ad.AnnData(X=sp.csr_matrix(_counts(len(rows), 5)),
                   obs=pd.DataFrame({"condition": rows}, index=[str(i) for i in range(len(rows))]))
    c = data.to_canonical(a)
    cond = np.array(rows)
    for seed in (0, 1):
        s = data.split_combo_seen(c, seed=seed, unseen_gene_fraction=0.3, train_seen2_fraction=0.5)
        unseen = set(s.params["unseen_genes"])
        assert len(unseen) == 3
        train_cond = set(cond[np.concatenate([s.train_idx, s.val_idx])])
        assert not unseen & train_cond  # unseen genes' singles never in training
        seen = set(genes) - unseen
        n_seen2_train = 0
        for d in doubles:
            k = sum(g in seen for g in d.split("+"))
            if d in train_cond:
                assert k == 2 and d not in s.test_groups
                n_seen2_train += 1
            else:
                assert s.test_groups[d] == f"seen{k}"
        n_seen2 = sum(all(g in seen for g in d.split("+")) for d in doubles)
        assert n_seen2_train == round(0.5 * n_seen2)
        for g in seen:  # 20% of each training single's cells held out
            assert (cond[s.test_idx] == g).sum() == 2 and s.test_groups[g] == "single"
    hard = data.split_combo_seen(c, seed=0, train_seen2_fraction=0.0)
    assert not any("+" in k for k in hard.train_conditions)


def test_complete_doubles_on_shipped_file():
    from pyro_pvae.datasets import norman19_subset

    a = norman19_subset()
    s = data.split_complete_doubles(a, seed=0)
    doubles = sorted(k for k, v in s.test_groups.items() if v == "seen2")
    assert doubles == ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2",
                       "MAPK1+TGFBR2"]
    assert "KLF1+SET" in s.train_conditions
    _split_invariants(s, a)
    cond = a.obs["condition"].astype(str).to_numpy()
    assert (cond[s.test_idx] == "KLF1").sum() == 20


def test_iid_split_fractions(canon):
    s = data.split_iid(canon, seed=0, test_fraction=0.25, control_test_fraction=0.4)
    cond = canon.obs["condition"].astype(str).to_numpy()
    for c, n in DESIGN.items():
        assert (cond[s.test_idx] == c).sum() == round((0.4 if c == "control" else 0.25) * n)
    assert "control" not in s.test_groups


@pytest.mark.parametrize("name", ["norman_discrepancy", "combo_seen", "complete_doubles", "iid"])
def test_heldout_controls_never_train(name):
    """The held-out controls are test cells, never training or validation cells; the share is
    a parameter (0: every control trains) and changing it moves no other cell."""
    from pyro_pvae.datasets import norman19_subset

    a = norman19_subset()
    cond = a.obs["condition"].astype(str).to_numpy()
    ctrl = np.flatnonzero(cond == "control")
    s = data.make_split(a, name, seed=1, control_test_fraction=0.3)
    held = heldout_control_idx(s, a)
    assert len(ctrl) == 100 and len(held) == 30
    assert np.isin(held, s.test_idx).all()
    assert not np.isin(held, s.train_idx).any() and not np.isin(held, s.val_idx).any()
    assert np.array_equal(np.sort(np.concatenate([held, s.train_idx[cond[s.train_idx] == "control"],
                                                  s.val_idx[cond[s.val_idx] == "control"]])), ctrl)
    # the default: 50 of the shipped subset's 100 controls held out
    assert len(heldout_control_idx(data.make_split(a, name, seed=1), a)) == 50
    none = data.make_split(a, name, seed=1, control_test_fraction=0.0)
    assert len(heldout_control_idx(none, a)) == 0
    assert set(ctrl) <= set(none.train_idx) | set(none.val_idx)
    # other cells: the same test set whatever the control share
    pert = lambda idx: idx[cond[idx] != "control"]  # noqa: E731
    np.testing.assert_array_equal(pert(s.test_idx), pert(none.test_idx))
    with pytest.raises(DataError, match=r"control_test_fraction must be in \[0, 1\), got 1.0"):
        data.make_split(a, name, seed=1, control_test_fraction=1.0)


def test_split_notes_targets_without_training_cells(tmp_path, caplog):
    rows = (["control"] * 30 + ["KLF1"] * 1 + ["MAP2K3"] * 20 + ["GATA1"] * 20
            + ["KLF1+MAP2K3"] * 5 + ["GATA1+MAP2K3"] * 5)
    a = ad.AnnData(X=sp.csr_matrix(_counts(len(rows), 4)),
                   obs=pd.DataFrame({"condition": rows}, index=[str(i) for i in range(len(rows))]))
    c = data.to_canonical(a)
    with caplog.at_level(logging.WARNING, logger="pyro_pvae.data"):
        s = data.split_norman_discrepancy(c, seed=0)
    # the one KLF1 cell is held out (a Norman held-out single): KLF1 is in no training cell
    assert s.notes == {"KLF1": "no training cell carries KLF1",
                       "KLF1+MAP2K3": "no training cell carries KLF1"}
    assert "KLF1" not in data.perturbation_vocabulary(c, s.train_idx)
    assert "split norman_discrepancy: 2 condition(s) name targets without training cells" in caplog.text
    assert "KLF1: no training cell carries KLF1" in caplog.text
    s.to_json(tmp_path / "split.json")
    assert data.Split.from_json(tmp_path / "split.json").notes == s.notes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyro_pvae.data"):
        assert data.split_complete_doubles(c, seed=0).notes == {}
    assert caplog.text == ""


def test_combo_seen_does_not_note_its_deliberately_unseen_genes():
    genes = [f"T{i}" for i in range(5)]
    rows = ["control"] * 20 + [g for g in genes for _ in range(10)] + ["T0+T1"] * 3 + ["T2+T3"] * 3
    a = ad.AnnData(X=sp.csr_matrix(_counts(len(rows), 4)),
                   obs=pd.DataFrame({"condition": rows}, index=[str(i) for i in range(len(rows))]))
    s = data.split_combo_seen(data.to_canonical(a), seed=0, unseen_gene_fraction=0.4)
    assert len(s.params["unseen_genes"]) == 2 and s.notes == {}


def test_validation_cells_never_take_a_conditions_last_training_cell():
    # every condition too small for a 5% validation share: one validation cell is drawn from
    # the conditions that have a second training cell
    rows = ["control"] * 3 + ["A"] + ["B"] * 2 + ["C"]
    a = ad.AnnData(X=sp.csr_matrix(_counts(len(rows), 4)),
                   obs=pd.DataFrame({"condition": rows}, index=[str(i) for i in range(len(rows))]))
    c = data.to_canonical(a)
    cond = np.array(rows)
    picked = set()
    for seed in range(30):
        s = data.split_iid(c, seed=seed, test_fraction=0.0, control_test_fraction=0.0)
        assert len(s.val_idx) == 1 and set(cond[s.train_idx]) == set(rows)
        picked.add(cond[s.val_idx[0]])
    assert picked == {"control", "B"}


def test_make_split_unknown_name(canon):
    with pytest.raises(DataError, match=r"unknown split 'combo'.*'combo_seen'"):
        data.make_split(canon, "combo", seed=0)


# ---------------------------------------------------------------------------------------
# batchers
# ---------------------------------------------------------------------------------------

def _batch_setup(canon):
    s = data.split_complete_doubles(canon, seed=0)
    cond = canon.obs["condition"].astype(str).to_numpy()
    ctrl = s.train_idx[cond[s.train_idx] == "control"]
    vocab = data.perturbation_vocabulary(canon, s.train_idx)
    return s, cond, ctrl, vocab


def _check_batch(b, canon, cond, ctrl, vocab):
    X = canon.X.toarray()
    idx = b.idx.numpy()
    assert b.x.dtype == torch.float32 and b.idx.dtype == torch.long
    np.testing.assert_array_equal(b.x.numpy(), X[idx])  # densified rows exact
    np.testing.assert_array_equal(b.u.numpy(), data.perturbation_matrix(cond[idx], vocab))
    ctrl_rows = {X[i].tobytes() for i in ctrl}
    assert b.x_ctrl.shape == b.x.shape
    assert all(r.tobytes() in ctrl_rows for r in b.x_ctrl.numpy())


def test_cell_batcher(canon):
    s, cond, ctrl, vocab = _batch_setup(canon)
    bt = data.make_batcher(canon, s.train_idx, vocab, ctrl, batch_size=16, seed=5)
    assert isinstance(bt, data.CellBatcher)
    assert len(bt) == len(s.train_idx) // 16 and bt.n_genes == len(GENES)
    bt.set_epoch(0)
    batches = list(bt)
    assert len(batches) == len(bt)
    for b in batches:
        _check_batch(b, canon, cond, ctrl, vocab)
    seen = np.concatenate([b.idx.numpy() for b in batches])
    assert len(set(seen)) == len(seen) and set(seen) <= set(s.train_idx)
    # set_epoch determinism: same (seed, epoch) -> same batches, other epoch -> other order
    bt.set_epoch(0)
    again = list(bt)
    for b1, b2 in zip(batches, again):
        assert torch.equal(b1.idx, b2.idx) and torch.equal(b1.x_ctrl, b2.x_ctrl)
    bt.set_epoch(1)
    assert not torch.equal(next(iter(bt)).idx, batches[0].idx)
    other = data.CellBatcher(canon, s.train_idx, vocab, ctrl, 16, seed=5)
    other.set_epoch(0)
    assert torch.equal(next(iter(other)).idx, batches[0].idx)
    # drop_last=False covers every cell once
    full = data.CellBatcher(canon, s.train_idx, vocab, ctrl, 16, drop_last=False)
    got = np.sort(np.concatenate([b.idx.numpy() for b in full]))
    np.testing.assert_array_equal(got, np.sort(s.train_idx))


def test_cell_batcher_unknown_target_in_cells(canon):
    _, cond, ctrl, _ = _batch_setup(canon)
    with pytest.raises(DataError, match=r"'SET' \(nearest known"):
        data.CellBatcher(canon, np.flatnonzero(cond == "SET"), ["KLF1"], ctrl, 4)


def test_backed_batcher_every_cell_once(canon, tmp_path):
    p = _write(canon, tmp_path, "canon.h5ad")
    s, cond, ctrl, vocab = _batch_setup(canon)
    bt = data.make_batcher(str(p), s.train_idx, vocab, ctrl, batch_size=10, seed=1,
                           chunk_size=16, buffer_chunks=2, drop_last=False)
    assert isinstance(bt, data.BackedBatcher)
    for epoch in (0, 1):
        bt.set_epoch(epoch)
        batches = list(bt)
        assert len(batches) == len(bt) == int(np.ceil(len(s.train_idx) / 10))
        got = np.concatenate([b.idx.numpy() for b in batches])
        assert len(got) == len(set(got))
        np.testing.assert_array_equal(np.sort(got), np.sort(s.train_idx))
        for b in batches:
            _check_batch(b, canon, cond, ctrl, vocab)
    bt.set_epoch(0)
    first = [b.idx for b in bt]
    bt.set_epoch(0)
    assert all(torch.equal(a, b.idx) for a, b in zip(first, bt))
    dl = data.BackedBatcher(p, s.train_idx, vocab, ctrl, 10, chunk_size=16, drop_last=True)
    assert [len(b.idx) for b in dl] == [10] * (len(s.train_idx) // 10)
    bt.close()
    dl.close()


def test_backed_batcher_prefetch_gives_identical_batches(canon, tmp_path):
    """Reading the next buffer in a background thread changes nothing in what is emitted."""
    p = _write(canon, tmp_path, "canon.h5ad")
    s, cond, ctrl, vocab = _batch_setup(canon)
    runs = {}
    for prefetch in (False, True):
        bt = data.BackedBatcher(p, s.train_idx, vocab, ctrl, 10, seed=3, chunk_size=16, buffer_chunks=1,
                                drop_last=False, prefetch=prefetch)
        runs[prefetch] = [(b.idx.clone(), b.x.clone(), b.x_ctrl.clone(), b.u.clone()) for b in bt]
        bt.close()
    assert len(runs[True]) == len(runs[False]) > 3
    for a, b in zip(runs[False], runs[True]):
        assert all(torch.equal(t, v) for t, v in zip(a, b))
