"""Shared fixtures and test tiers.

Tiers (markers declared in pyproject.toml): ``slow`` marks notebook execution, subprocess fits,
DDP and benchmark CLI runs; ``make test`` runs everything, ``make test-fast`` runs
``-m "not slow"``. ``gpu`` marks tests that need CUDA; they are skipped without it.

Session fixtures: ``tiny_adata`` (the tiny simulation, seed 0), ``tiny_split`` (its combo_seen
split) and ``tiny_vae`` (PerturbedVAE fitted once on them through the public API). They are
shared by every test of the session: read them, do not change them in place (a test that
modifies data or a model makes its own copy or fits its own).
"""
from __future__ import annotations

import pytest
import torch

#: the tiny fit shared by the tests: small networks, enough epochs to recover sparse effects
TINY_MODEL = {"latent_inv": 4, "latent_pert": 4, "hidden": 64}
TINY_TRAIN = {"epochs": 100, "batch_size": 64, "progress": False, "early_stopping_patience": 100}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def simulation_cache(tmp_path_factory):
    """Simulations cached by ``cached_simulation`` (CLI fits, subprocesses) go to a folder of
    this session, not to the user's ``~/.cache``; one cache for the whole session."""
    path = tmp_path_factory.mktemp("sim-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRO_PVAE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_adata():
    """``simulate("tiny", seed=0)``: 1,620 cells x 200 genes, controls, singles and doubles."""
    from pyro_pvae.simulate import simulate

    return simulate("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_split(tiny_adata):
    """combo_seen split of ``tiny_adata``: half of the doubles seen in training, no unseen genes."""
    from pyro_pvae import data as D

    return D.make_split(tiny_adata, "combo_seen", 0, unseen_gene_fraction=0.0, train_seen2_fraction=0.5)


@pytest.fixture(scope="session")
def tiny_vae(tiny_adata, tiny_split):
    """PerturbedVAE(tiny_adata, split=tiny_split, model=TINY_MODEL, train=TINY_TRAIN).fit(),
    on one torch thread (small models on a small shared CPU: several times faster)."""
    from pyro_pvae.api import PerturbedVAE

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return PerturbedVAE(tiny_adata, split=tiny_split, model=dict(TINY_MODEL), train=dict(TINY_TRAIN)).fit()
    finally:
        torch.set_num_threads(n_threads)
