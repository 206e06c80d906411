"""`python -m pyro_pvae.fit`: config handling, errors, and one short fit on the shipped real cells."""
from pathlib import Path

import numpy as np
import pytest

from pyro_pvae import load_run
from pyro_pvae.config import compose
from pyro_pvae.fit import main


def test_help_lists_configs_and_main_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("norman", "replogle", "simulation", "tiny", "norman_effects"):
        assert name in out
    assert "data.path" in out and "model=paper" in out


@pytest.mark.parametrize("argv, message", [
    (["--config", "normann"], "unknown config 'normann'; available: norman, "),
    (["--config", "norman", "train.epocs=3"], "unknown config key 'train.epocs'; keys under train: batch_size"),
    (["--config", "norman", "modl.hidden=3"], "unknown config section 'modl'"),
    ([], "missing --config NAME"),
    (["--config", "norman", "data.path=/nonexistent/file.h5ad"], "does not exist"),
    (["--config", "norman", "model.likelihood=poison"], "model.likelihood must be 'nb' or 'poisson', got 'poison'"),
    (["--config", "norman", "model.gate_inference=straight"], "model.gate_inference must be 'marginal' or "),
    (["--config", "norman", "train.lr_batch_rule=cubic"], "train.lr_batch_rule must be 'none', 'sqrt' or 'linear'"),
    (["--config", "norman", "train.lr_base_batch=0"], "train.lr_base_batch must be a positive batch size, got 0"),
])
def test_bad_invocations_fail_with_a_clear_message(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written for a bad invocation (no run directory)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_paper_preset_has_the_paper_sizes():
    cfg = compose("norman", ["model=paper", "train=paper"])
    assert (cfg.model.latent_pert, cfg.model.latent_inv, cfg.model.hidden) == (20, 85, 256)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.kl_weight) == (1e-4, 64, 0.01)


def test_short_fit_on_the_shipped_real_norman_cells(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--config", "norman", "train.epochs=2", "train.progress=false", f"output.run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "fitted PerturbedVAE on 3375 cells x 500 genes" in out and str(run) in out
    for f in ("config.yaml", "split.json", "checkpoint.pt", "metrics.csv", "training_curves.png", "model.pt",
              "effects.csv"):
        assert (run / f).exists(), f
    vae = load_run(run)
    pred = vae.predict(["KLF1+MAP2K6"], n_cells=20, seed=0)
    assert pred.n_obs == 20 and pred.obs["condition"].iloc[0] == "KLF1+MAP2K6"
    assert np.isfinite(pred.layers["lognorm"].toarray()).all()
    with pytest.raises(Exception, match="KLF1"):
        vae.predict(["KLF2"], n_cells=5)
