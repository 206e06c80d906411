import time

import numpy as np
import pytest
import scipy.sparse as sp

from pyro_pvae.data import CONTROL, parse_condition
from pyro_pvae.simulate import (
    PRESETS,
    _sample_nb,
    cached_simulation,
    simulate,
    simulate_norman_effects,
    true_condition_means,
)


def test_tiny_canonical_form_and_speed():
    t = time.time()
    a = simulate("tiny", seed=1)
    assert time.time() - t < 2.0
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() > 0
    assert a.var_names[0] == "G0001" and a.var_names.is_unique
    p = PRESETS["tiny"]
    conds = a.obs["condition"].astype(str)
    assert (conds == CONTROL).sum() == p["n_control"]
    assert conds.nunique() == 1 + p["n_singles"] + p["n_doubles"]
    nt = np.array([len(parse_condition(c)) for c in conds])
    assert np.array_equal(nt, a.obs["n_targets"].to_numpy())
    for c in conds.unique():
        assert c == CONTROL or "+".join(sorted(c.split("+"))) == c
    # perturbation targets are measured genes
    assert set(a.uns["truth"]["perturbations"]) <= set(a.var_names)
    assert a.obsm["z_inv_true"].shape == (a.n_obs, p["n_inv_latents"])
    assert a.obsm["z_pert_true"].shape == (a.n_obs, p["n_pert_latents"])
    assert a.uns["simulation"]["preset"] == "tiny" and a.uns["simulation"]["seed"] == 1


def test_realistic_counts_norman_like_small():
    a = simulate("norman_like", seed=0, n_genes=2000, n_singles=4, n_doubles=2,
                 cells_per_single=20, cells_per_double=20, n_control=1000)
    ctrl = (a.obs["condition"] == CONTROL).to_numpy()
    X = a.X[ctrl].toarray()
    zero = (X == 0).mean()
    assert 0.6 < zero < 0.95
    lib = np.median(X.sum(1))
    # 2,000-gene panel at the calibrated depth of ~0.8 UMI per gene and cell
    assert 1000 < lib < 2500
    gm = X.mean(0)
    assert np.median(gm) < 1.0 and (gm < 1).mean() > 0.6
    # naive per-gene moment dispersion in the range measured on real Norman cells (~1-2)
    m, v = gm, X.var(0)
    ok = (m > 0.05) & (v > m)
    th = np.median(m[ok] ** 2 / (v[ok] - m[ok]))
    assert 0.5 < th < 4.0


def test_nb_mean_variance():
    rng = np.random.default_rng(0)
    mus = np.array([0.02, 0.3, 2.0, 8.0, 60.0])
    theta = np.array([0.5, 1.0, 3.0, 2.0, 10.0])
    X = _sample_nb(rng, np.tile(mus, (100000, 1)), theta).toarray()
    np.testing.assert_allclose(X.mean(0), mus, rtol=0.03)
    np.testing.assert_allclose(X.var(0), mus + mus ** 2 / theta, rtol=0.06)
    # zero probability exact
    np.testing.assert_allclose((X == 0).mean(0), (theta / (theta + mus)) ** theta, atol=0.005)


def test_sparsity_gates_and_dag():
    a = simulate("tiny", seed=3, n_singles=200, n_pert_latents=8, n_doubles=5, gate_prob=0.25,
                 n_genes=300, cells_per_single=1, cells_per_double=1, n_control=10)
    t = a.uns["truth"]
    g = np.asarray(t["gates"], dtype=bool)
    assert g.any(1).all()
    K = g.shape[1]
    expected = 0.25 + (0.75 ** K) / K  # forced gate where none drawn (coverage adds <= K/P*K)
    assert abs(g.mean() - expected) < 0.04
    d = np.asarray(t["delta"])
    assert np.array_equal(d != 0, g)
    W = np.asarray(t["W"])
    assert np.allclose(np.triu(W), 0)
    nzw = np.abs(W[W != 0])
    assert nzw.size == 0 or (nzw.min() >= 0.5 and nzw.max() <= 1.0)
    # intervention coverage: every latent has a hard intervention
    hard = np.asarray(t["hard_targets"], dtype=bool)
    assert hard.any(0).all() and np.all(g[hard])
    assert np.array_equal(np.asarray(t["hard_interventions"], dtype=bool), hard.any(1))


def _shift_of(a, label):
    t = a.uns["truth"]
    perts = list(t["perturbations"])
    W = np.asarray(t["W"]).copy()
    shift = np.zeros(W.shape[0])
    for p in parse_condition(label):
        i = perts.index(p)
        shift += t["delta"][i]
        W[np.asarray(t["hard_targets"][i], dtype=bool)] = 0
    return shift, W


def test_doubles_compose(tiny_adata):
    a = tiny_adata
    t = a.uns["truth"]
    assert np.asarray(t["interaction"]).shape == (len(t["doubles"]), a.obsm["eps_true"].shape[1])
    assert np.any(np.abs(t["interaction"]).sum(1) > 0)
    conds = a.obs["condition"].astype(str).to_numpy()
    for j, lab in enumerate(t["doubles"]):
        m = conds == lab
        z, eps = a.obsm["z_pert_true"][m], a.obsm["eps_true"][m]
        sA, _ = _shift_of(a, parse_condition(lab)[0])
        sB, _ = _shift_of(a, parse_condition(lab)[1])
        _, Wc = _shift_of(a, lab)
        resid = z @ (np.eye(len(sA)) - Wc).T - eps
        np.testing.assert_allclose(resid, np.tile(sA + sB + t["interaction"][j], (m.sum(), 1)),
                                   atol=1e-8)
    # singles and controls too
    m = conds == CONTROL
    np.testing.assert_allclose(a.obsm["z_pert_true"][m] @ (np.eye(len(sA)) - np.asarray(t["W"])).T,
                               a.obsm["eps_true"][m], atol=1e-8)


def test_determinism_and_seed(tiny_adata):
    b = simulate("tiny", seed=0)
    assert (tiny_adata.X != b.X).nnz == 0
    np.testing.assert_array_equal(tiny_adata.obsm["z_pert_true"], b.obsm["z_pert_true"])
    c = simulate("tiny", seed=1)
    assert (tiny_adata.X != c.X).nnz > 0


def test_overrides():
    a = simulate("tiny", n_genes=120, n_pert_latents=6, n_inv_latents=3, decoder="linear",
                 n_control=20, cells_per_single=5, cells_per_double=5)
    assert a.n_vars == 120 and a.obsm["z_pert_true"].shape[1] == 6
    assert a.uns["truth"]["decoder_kind"] == "linear"
    with pytest.raises(ValueError, match="bogus_key"):
        simulate("tiny", bogus_key=3)
    with pytest.raises(ValueError, match="n_genes"):  # lists the valid keys
        simulate("tiny", bogus_key=3)
    with pytest.raises(ValueError):
        simulate("nope")


def test_h5ad_round_trip(tiny_adata, tmp_path):
    import anndata as ad

    tiny = tiny_adata.copy()  # writing may convert obs columns in place
    f = tmp_path / "sim.h5ad"
    tiny.write_h5ad(f)
    b = ad.read_h5ad(f)
    assert (b.X != tiny.X).nnz == 0
    np.testing.assert_allclose(b.uns["truth"]["W"], tiny.uns["truth"]["W"])
    assert list(b.uns["truth"]["doubles"]) == list(tiny.uns["truth"]["doubles"])
    # the truth read back still drives true_condition_means
    lab = str(tiny.uns["truth"]["doubles"][0])
    m1 = true_condition_means(b, [lab], n_cells=300, seed=0)[lab]
    m2 = true_condition_means(tiny, [lab], n_cells=300, seed=0)[lab]
    np.testing.assert_allclose(m1, m2, rtol=1e-5)
    e = simulate_norman_effects(tiny=True, n_cells_per_condition=5, n_control=20)
    e.write_h5ad(tmp_path / "ne.h5ad")
    e2 = ad.read_h5ad(tmp_path / "ne.h5ad")
    np.testing.assert_allclose(e2.uns["truth"]["true_delta_log1p_cpm"],
                               e.uns["truth"]["true_delta_log1p_cpm"])


def test_true_condition_means_match_observed(tiny_adata):
    tiny = tiny_adata
    conds = tiny.obs["condition"].astype(str).to_numpy()
    lab = str(tiny.uns["truth"]["perturbations"][0])
    truth = true_condition_means(tiny, [CONTROL, lab], n_cells=2000)
    X = tiny.X[conds == lab]
    tot = np.asarray(X.sum(1)).ravel()
    obs = np.asarray(np.log1p((sp.diags(1e4 / tot) @ X).toarray()).mean(0)).ravel()
    assert np.corrcoef(obs, truth[lab])[0, 1] > 0.95
    # the perturbation moves expression away from control
    assert np.abs(truth[lab] - truth[CONTROL]).max() > 0.1
    exp = true_condition_means(tiny, [lab], n_cells=500, mode="expected")[lab]
    assert exp.shape == (tiny.n_vars,)


def test_cached_simulation(tmp_path, monkeypatch):
    a = cached_simulation("tiny", 0, cache_dir=tmp_path, n_control=30)
    files = list(tmp_path.glob("*.h5ad"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    b = cached_simulation("tiny", 0, cache_dir=tmp_path, n_control=30)
    assert (a.X != b.X).nnz == 0
    monkeypatch.setenv("PYRO_PVAE_CACHE", str(tmp_path / "env"))
    cached_simulation("tiny", 1, n_control=30)
    assert len(list((tmp_path / "env").glob("*.h5ad"))) == 1


def test_norman_effects_recovers_file_values():
    a = simulate_norman_effects(seed=0, tiny=True, n_cells_per_condition=2000, n_control=2000)
    t = a.uns["truth"]
    conds = a.obs["condition"].astype(str).to_numpy()
    assert set(t["doubles"]) and all("+".join(sorted(d.split("+"))) == d for d in t["doubles"])
    for d in t["doubles"]:
        assert set(parse_condition(d)) <= set(t["singles"])

    def pb(lab):
        s = np.asarray(a.X[conds == lab].sum(0)).ravel()
        return np.log1p(1e6 * s / s.sum())

    c0 = pb(CONTROL)
    cors = []
    for i, lab in enumerate(t["conditions"]):
        target = t["true_delta_log1p_cpm"][i]
        ch = np.abs(target) > 0.1
        cors.append(np.corrcoef(pb(lab)[ch] - c0[ch], target[ch])[0, 1])
    cors = np.array(cors)
    assert np.max(cors) > 0.95 and np.median(cors) > 0.85 and cors.min() > 0.75
    # the strongest effect is recovered best
    rms = np.sqrt((np.asarray(t["true_delta_log1p_cpm"]) ** 2).mean(1))
    assert cors[np.argmax(rms)] > 0.9


def test_norman_effects_default_contents():
    t0 = time.time()
    a = simulate_norman_effects(seed=0, n_cells_per_condition=5, n_control=50)
    assert time.time() - t0 < 15
    t = a.uns["truth"]
    assert a.n_vars == 2000 and len(t["singles"]) == 104 and len(t["doubles"]) == 126
    assert np.asarray(t["true_delta_log1p_cpm"]).shape == (230, 2000)


def test_condition_spec_gives_the_latents_before_propagation(tiny_adata):
    """(I - W_c) z_pert = eps + shift for a hard-intervened single (its latent's parents cut) and
    the controls: analyses/identifiability.py scores recovery of these (mcc_pert_exogenous)."""
    from pyro_pvae.simulate import condition_spec

    a, t = tiny_adata, tiny_adata.uns["truth"]
    conds = a.obs["condition"].astype(str).to_numpy()
    hard = [str(p) for p in np.asarray(t["perturbations"])[np.asarray(t["hard_interventions"], dtype=bool)]]
    cut = [p for p in hard if not np.array_equal(condition_spec(t, p)[1], np.asarray(t["W"]))]
    assert cut, "the tiny truth should have a hard intervention that cuts an edge"
    for label in (cut[0], CONTROL):
        shift, Wc = condition_spec(t, label)
        m = conds == label
        z = a.obsm["z_pert_true"][m]
        np.testing.assert_allclose(z - z @ Wc.T, a.obsm["eps_true"][m] + shift, atol=1e-8)


def test_library_effects_shift_each_conditions_depth():
    """``library_effect_sd`` > 0: a condition's log library size is shifted by the sum of its
    targets' ``library_effect`` (each single's mean log depth minus the controls' recovers its
    effect to sampling noise, 60 cells at log-sd 0.37: se about 0.07; a double's is the sum);
    at the default 0 the effects are zero and the data are those of the same seed before."""
    plain = simulate("tiny", seed=3)
    assert not np.asarray(plain.uns["truth"]["library_effect"]).any()
    ad = simulate("tiny", seed=3, library_effect_sd=0.5)
    truth = ad.uns["truth"]
    effect = dict(zip([str(p) for p in truth["perturbations"]], np.asarray(truth["library_effect"])))
    cond = ad.obs["condition"].astype(str).to_numpy()
    log_lib = np.log(np.asarray(ad.X.sum(1)).ravel())
    base = log_lib[cond == CONTROL].mean()
    for label in [p for p in effect][:6] + [str(d) for d in truth["doubles"]][:3]:
        expected = sum(effect[t] for t in parse_condition(label))
        assert abs(log_lib[cond == label].mean() - base - expected) < 0.25, label
    # the same draws otherwise: the latents are unchanged
    np.testing.assert_array_equal(ad.obsm["z_inv_true"], plain.obsm["z_inv_true"])
    with pytest.raises(ValueError, match=r"library_effect_sd must be >= 0 .*got -0.5"):
        simulate("tiny", seed=3, library_effect_sd=-0.5)
