"""`python -m pyro_pvae.fit`: --help, bad invocations and settings refused before anything is read
or written, and one short fit on the shipped real cells."""
import json

import numpy as np
import pandas as pd
import pytest

from pyro_pvae import load_run
from pyro_pvae.fit import main


def test_help_lists_configs_presets_and_main_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "configs (pyro_pvae/configs/NAME.yaml): norman, norman_effects, norman_full, replogle, simulation, tiny" in out
    assert "model presets (model=NAME): default, norman, paper" in out
    assert "norman_discrepancy | combo_seen | complete_doubles | iid | none" in out
    assert "data.path" in out and "model=paper" in out and "auto |" not in out.split("split.name")[1].splitlines()[0]


@pytest.mark.parametrize("argv, message", [
    (["--config", "normann"], "unknown config 'normann'; available: norman, "),
    (["--config", "norman", "train.epocs=3"], "unknown config key 'train.epocs'; keys under train: epochs, min_steps, batch_size"),
    (["--config", "norman", "modl.hidden=3"], "unknown config section 'modl'"),
    (["--config", "norman", "model=papr"], "unknown model preset 'papr'; available: default, norman, paper"),
    (["--config", "norman", "train.engine=svi"], "unknown config key 'train.engine'"),
    (["--config", "norman", "model.n_genes=5"], "unknown config key 'model.n_genes'"),
    ([], "missing --config NAME"),
    (["--config", "norman", "train.epochs=[1,2"], "cannot read override 'train.epochs=[1,2'"),
    (["--config", "norman", "data.path=/nonexistent/file.h5ad"], "does not exist"),
    (["--config", "norman_full"], "data.source=file needs data.path="),
])
def test_bad_invocations_fail_with_a_clear_message(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written for a bad invocation (no run directory)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.epochs=-3", "train.epochs must be >= 1, got -3"),
    ("train.epochs=2.5", "train.epochs must be an integer, got 2.5"),
    ("train.lr=-0.01", "train.lr must be > 0, got -0.01"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("model.latent_pert=0", "model.latent_pert must be >= 1, got 0"),
    ("model.hidden=-1", "model.hidden must be >= 1, got -1"),
    ("train.batch_size=abc", "train.batch_size must be an integer, got 'abc'"),
    ("train.batch_size=-5", "train.batch_size must be >= 1, got -5"),
    ("train.init_gate_prob=1.5", "train.init_gate_prob must be in (0, 1), got 1.5"),
    ("train.init_gate_prob=0", "train.init_gate_prob must be in (0, 1), got 0.0"),
    ("train.lr_final_fraction=0", "train.lr_final_fraction must be in (0, 1], got 0.0"),
    ("train.progress=maybe", "train.progress must be true or false, got 'maybe'"),
    ("train.device=gpu", "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("train.lr_batch_rule=cubic", "train.lr_batch_rule must be 'none', 'sqrt' or 'linear', got 'cubic'"),
    ("train.lr_base_batch=0", "train.lr_base_batch must be >= 1, got 0"),
    ("model.likelihood=poison", "model.likelihood must be 'nb' or 'poisson', got 'poison'"),
    ("model.gate_inference=straight", "model.gate_inference must be 'marginal' or 'straight_through', got 'straight'"),
    ("model.pi_prior=[1,0]", "model.pi_prior must be > 0 (each value), got [1.0, 0.0]"),
    ("model.theta_prior=[2,-1]", "model.theta_prior must be [loc, scale] with scale > 0, got [2.0, -1.0]"),
    ("data.source=files", "data.source must be 'file', 'norman19_subset', 'simulation' or 'norman_effects'"),
    ("data.n_top_genes=0", "data.n_top_genes must be >= 1, got 0"),
    ("data.min_cells=-1", "data.min_cells must be >= 0, got -1"),
    ("split.name=auto", "split.name must be 'norman_discrepancy', 'combo_seen', 'complete_doubles', 'iid' or 'none'"),
    ("+split.kwargs.test_fraction=0.1", "split.kwargs ['test_fraction'] are not arguments of split 'complete_doubles'"),
    ("benchmark.seeds=0", "benchmark.seeds must be >= 1, got 0"),
])
def test_bad_settings_are_refused_before_anything_is_read(capsys, override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "norman", override]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" or err.strip().startswith(f"error: {message}"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_short_fit_on_the_shipped_real_norman_cells(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", "norman", "train.epochs=2", "train.min_steps=0", "train.progress=false", f"output.run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "fitted PerturbedVAE on 3375 cells x 500 genes" in out and str(run) in out
    for f in ("config.yaml", "split.json", "checkpoint.pt", "metrics.csv", "training_curves.png", "model.pt",
              "effects.csv", "library_effects.csv"):  # the norman preset models the library size
        assert (run / f).exists(), f
    assert "library size: the perturbations that change the total counts most (library_effects.csv): " in out
    lib = pd.read_csv(run / "library_effects.csv")
    assert list(lib.columns) == ["perturbation", "mean", "sd", "q05", "q95", "fold_change"] and len(lib) == 31
    eff = pd.read_csv(run / "effects.csv")
    summary = json.loads((run / "fit_summary.json").read_text())
    assert summary["effects_lfsr_below_0.05"] == int((eff.lfsr < 0.05).sum())
    assert f"{summary['effects_lfsr_below_0.05']} have a local false sign rate below 0.05" in out
    assert summary["genes_without_counts"] == 276  # of the 500, in the preset split's training cells
    vae = load_run(run)
    pred = vae.predict(["KLF1+MAP2K6"], n_cells=20, seed=0)
    assert pred.n_obs == 20 and pred.obs["condition"].iloc[0] == "KLF1+MAP2K6"
    assert np.isfinite(pred.layers["lognorm"].toarray()).all()
    with pytest.raises(Exception, match="KLF1"):
        vae.predict(["KLF2"], n_cells=5)


@pytest.mark.slow
def test_replogle_preset_fits_a_file_in_the_replogle_layout(tmp_path, capsys):
    """The replogle preset reads a file laid out as the Replogle 2022 single-cell files (labels in
    obs['gene'], controls 'non-targeting', dense float32 counts, Ensembl IDs with the symbols in
    var['gene_name']) and fits it with its library-size model."""
    import anndata as ad
    from pyro_pvae.simulate import simulate

    sim = simulate("tiny", 0, n_doubles=0, n_singles=6, n_genes=60)
    labels = sim.obs["condition"].astype(str).replace({"control": "non-targeting"}).to_numpy()
    obs = pd.DataFrame({"gene": labels, "sgID_AB": [f"{g}_sg" for g in labels],
                        "UMI_count": np.asarray(sim.X.sum(1)).ravel()}, index=[f"cell{i}" for i in range(sim.n_obs)])
    var = pd.DataFrame({"gene_name": sim.var_names.astype(str)}, index=[f"ENSG{i:05d}" for i in range(sim.n_vars)])
    path = tmp_path / "K562_essential_like.h5ad"
    ad.AnnData(X=sim.X.toarray().astype(np.float32), obs=obs, var=var).write_h5ad(path)
    run = tmp_path / "run"
    assert main(["--config", "replogle", f"data.path={path}", "train.epochs=1", "train.progress=false",
                 f"output.run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"fitted PerturbedVAE on {sim.n_obs} cells x 60 genes (6 perturbations)" in out
    lib = pd.read_csv(run / "library_effects.csv")
    assert sorted(lib["perturbation"]) == sorted(set(labels) - {"non-targeting"})
    vae = load_run(run)
    assert list(vae.gene_names) == list(sim.var_names.astype(str))  # symbols, not Ensembl IDs
