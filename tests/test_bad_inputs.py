"""Misuse and bad input through the API: one specific error (what was wrong, what is expected),
raised before anything is written. The CLI's bad settings are in test_fit_cli.py / test_config.py,
run directories in test_rundir.py, corrupt files in test_data.py."""
import numpy as np
import pytest
import scipy.sparse as sp

from pyro_pvae import data as D
from pyro_pvae import load_run
from pyro_pvae.api import PerturbedVAE
from pyro_pvae.train import TrainingError

MODEL = {"latent_inv": 2, "latent_pert": 2, "hidden": 8, "sparse_rotation": False}
TRAIN = {"epochs": 1, "batch_size": 128, "progress": False}


@pytest.fixture(scope="module")
def cells():
    from pyro_pvae.simulate import simulate

    return simulate("tiny", seed=3, n_genes=40)


@pytest.fixture(scope="module")
def fitted(cells, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    vae = PerturbedVAE(cells, split="iid", model=MODEL, train=TRAIN).fit(run_dir=run)
    return vae, run


def _with_X(adata, X):
    out = adata.copy()
    out.X = X
    return out


@pytest.mark.parametrize("change, message", [
    (lambda a: _with_X(a, sp.csr_matrix(np.log1p(a.X.toarray()))), "no raw integer UMI counts found.*non-integer"),
    (lambda a: _with_X(a, sp.csr_matrix(a.X.toarray() / 2)), "no raw integer UMI counts found.*non-integer"),
    (lambda a: _with_X(a, sp.csr_matrix(np.where(np.arange(a.n_vars) == 0, np.nan, a.X.toarray()))), "finite"),
    (lambda a: _with_X(a, sp.csr_matrix(-a.X.toarray())), "negative"),
])
def test_api_refuses_counts_that_are_not_raw_counts(cells, change, message):
    with pytest.raises(D.DataError, match=message):
        PerturbedVAE(change(cells), split="iid", model=MODEL, train=TRAIN)


def test_api_refuses_duplicated_genes_and_missing_labels(cells):
    dup = cells.copy()
    dup.var_names = [dup.var_names[0]] * 2 + list(dup.var_names[2:])
    with pytest.raises(D.DataError, match="gene names"):
        PerturbedVAE(dup, split="iid", model=MODEL, train=TRAIN)
    no_label = cells.copy()
    del no_label.obs["condition"]
    with pytest.raises(D.DataError, match="condition"):
        PerturbedVAE(no_label, split="iid", model=MODEL, train=TRAIN)
    no_ctrl = cells[cells.obs["condition"] != D.CONTROL].copy()
    with pytest.raises(D.DataError, match="control"):
        PerturbedVAE(no_ctrl, split="iid", model=MODEL, train=TRAIN)


def test_api_drops_cells_without_counts_and_says_how_many(cells, caplog):
    X = cells.X.toarray()
    X[:3] = 0
    vae = PerturbedVAE(_with_X(cells, sp.csr_matrix(X)), split="iid", model=MODEL, train=TRAIN)
    assert vae.adata.n_obs == cells.n_obs - 3
    assert "3" in caplog.text and "zero total counts" in caplog.text



def test_api_names_the_genes_without_a_count_in_the_training_cells(cells, caplog):
    X = cells.X.toarray()
    X[:, [4, 7]] = 0
    vae = PerturbedVAE(_with_X(cells, sp.csr_matrix(X)), split="iid", model=MODEL, train=TRAIN)
    assert vae.genes_without_counts == [cells.var_names[4], cells.var_names[7]]
    assert f"2 of {cells.n_vars} genes have no count in any training cell (e.g. {cells.var_names[4]}" in caplog.text
    # a gene counted only in held-out cells carries no information for the fit either
    train = np.asarray(vae.split.train_idx)
    X[:, 4] = 0
    X[np.setdiff1d(np.arange(cells.n_obs), train), 4] = 1
    assert PerturbedVAE(_with_X(cells, sp.csr_matrix(X)), split=vae.split, model=MODEL,
                        train=TRAIN).genes_without_counts == [cells.var_names[4], cells.var_names[7]]
    caplog.clear()
    assert PerturbedVAE(cells, split="iid", model=MODEL, train=TRAIN).genes_without_counts == []
    assert "no count in any training cell" not in caplog.text

def test_api_settings_are_checked_on_construction(cells):
    with pytest.raises(ValueError, match="train.lr must be > 0, got -0.01"):
        PerturbedVAE(cells, split="iid", model=MODEL, train={**TRAIN, "lr": -0.01})
    with pytest.raises(ValueError, match="train.epochs must be >= 1, got 0"):
        PerturbedVAE(cells, split="iid", model=MODEL, train={**TRAIN, "epochs": 0})
    with pytest.raises(ValueError, match="model.latent_pert must be >= 1, got 0"):
        PerturbedVAE(cells, split="iid", model={**MODEL, "latent_pert": 0}, train=TRAIN)


def test_prediction_arguments(fitted):
    vae, _ = fitted
    with pytest.raises(ValueError, match="at least one condition"):
        vae.predict([])
    with pytest.raises(ValueError, match="n_cells must be a positive integer, got -1"):
        vae.predict([vae.vocabulary[0]], n_cells=-1)
    with pytest.raises(ValueError, match="n_draws must be a positive integer, got 0"):
        vae.predict_change_samples(vae.vocabulary[0], n_draws=0)
    with pytest.raises(D.DataError, match="XYZ1"):
        vae.predict(["XYZ1"], n_cells=3)


def test_unseen_single_is_predicted_with_a_warning(fitted, caplog):
    vae, _ = fitted
    vae.trained_singles = [vae.vocabulary[0]]  # as if the others were seen only inside doubles
    try:
        vae.predict([vae.vocabulary[1]], n_cells=2)
    finally:
        vae.trained_singles = list(vae.vocabulary)
    assert "never seen alone in training" in caplog.text and vae.vocabulary[1] in caplog.text


def test_loaded_model_without_data_and_truncated_files(fitted, tmp_path):
    _, run = fitted
    vae = load_run(run)
    with pytest.raises(ValueError, match="with_data=True"):
        vae.latents()
    assert "not fitted" not in repr(vae) and "perturbations in the vocabulary" in repr(vae)
    bad = tmp_path / "model.pt"
    bad.write_bytes((run / "model.pt").read_bytes()[:200])
    with pytest.raises(TrainingError, match="cannot be read .* truncated"):
        PerturbedVAE.load(bad)


def test_resume_with_other_settings_is_refused_with_the_differences(cells, fitted):
    _, run = fitted
    vae = PerturbedVAE(cells, split="iid", model={**MODEL, "latent_pert": 3}, train={**TRAIN, "seed": 5, "resume": True})
    with pytest.raises(TrainingError) as err:
        vae.fit(run_dir=run)
    msg = str(err.value)
    assert "cannot resume" in msg and "model.latent_pert: 2 -> 3" in msg and "train.seed: 0 -> 5" in msg
    # epochs may change: the same settings with more epochs resume
    ok = PerturbedVAE(cells, split="iid", model=MODEL, train={**TRAIN, "epochs": 2, "resume": True}).fit(run_dir=run)
    assert len(ok.history) == 2


def test_truncated_checkpoint_is_one_line(cells, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a whole file")
    vae = PerturbedVAE(cells, split="iid", model=MODEL, train={**TRAIN, "resume": True})
    with pytest.raises(TrainingError, match="checkpoint.pt cannot be read"):
        vae.fit(run_dir=tmp_path)


def test_non_finite_loss_says_what_is_on_disk(cells, tmp_path):
    vae = PerturbedVAE(cells, split="iid", model=MODEL, train={**TRAIN, "lr": 1e6, "epochs": 3})
    with pytest.raises(TrainingError) as err:
        vae.fit(run_dir=tmp_path)
    msg = str(err.value)
    assert "non-finite loss" in msg
    assert ("no checkpoint was written" in msg) != ("last good checkpoint (epoch" in msg)
