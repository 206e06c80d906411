"""Training loop: kill-and-resume, non-finite losses, early stopping, metrics files."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_pvae import data as D
from pyro_pvae.api import PerturbedVAE
from pyro_pvae.simulate import simulate
from pyro_pvae.train import TrainingError

REPO = Path(__file__).resolve().parents[1]
FIT = [sys.executable, "-m", "pyro_pvae.fit", "--config", "tiny", "train.epochs=6", "train.checkpoint_every=1",
       "train.progress=false", "model.hidden=32"]


def run_fit(run_dir, *extra, env=None):
    return subprocess.run(FIT + [f"output.run_dir={run_dir}", *extra], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def sim_cache(tmp_path_factory):
    env = dict(os.environ, PYRO_PVAE_CACHE=str(tmp_path_factory.mktemp("cache")))
    return env


@pytest.mark.slow  # subprocess fits
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, sim_cache):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_fit(full, env=sim_cache).returncode == 0

    proc = subprocess.Popen(FIT + [f"output.run_dir={killed}"], cwd=REPO, env=sim_cache,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = torch.load(ckpt, weights_only=False)["epoch"]
    assert epoch_at_kill < 5 and not (killed / "model.pt").exists()

    res = run_fit(killed, "train.resume=true", env=sim_cache)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = pd.read_csv(full / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    assert list(b.epoch) == list(range(6))
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=1e-5)
    ea, eb = pd.read_csv(full / "effects.csv"), pd.read_csv(killed / "effects.csv")
    np.testing.assert_allclose(eb.pip, ea.pip, rtol=1e-5, atol=1e-6)


def small_vae(**train):
    adata = simulate("tiny", seed=1)
    return PerturbedVAE(adata, split="iid", model=dict(latent_inv=3, latent_pert=3, hidden=16, sparse_rotation=False),
                        train={"epochs": 3, "batch_size": 128, "progress": False, **train})


def test_non_finite_loss_names_the_step_and_term_and_keeps_the_checkpoint(tmp_path):
    vae = small_vae(checkpoint_every=1)
    vae.fit(run_dir=tmp_path)
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert good["epoch"] == 2

    class Poison(torch.nn.Module):  # a decoder that returns NaN logits
        def forward(self, z_inv, z_pert):
            return torch.full((z_inv.shape[0], len(vae.gene_names)), float("nan"))

    original = PerturbedVAE.build_module

    def build_with_nan_decoder(self):
        module = original(self)
        module.decoder = Poison()
        return module

    PerturbedVAE.build_module = build_with_nan_decoder
    try:
        with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 0, step 0: bad term\(s\) \['recon'"):
            vae.fit(run_dir=tmp_path / "bad")
    finally:
        PerturbedVAE.build_module = original
    # the earlier run's checkpoint is intact
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == good["epoch"]
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_early_stopping_stops_when_validation_does_not_improve():
    vae = small_vae(lr=1e-12, epochs=40, kl_warmup_epochs=0, early_stopping_patience=3, min_epochs=1)
    vae.fit()
    # stops once three epochs in a row do not improve on the best (the running control centre
    # still settles during the first epochs, so the best may come a few epochs in)
    val = [r["val_loss"] for r in vae.history]
    assert len(val) < 15
    best = min(val[:-3])
    assert all(v >= best - 1e-4 * abs(best) for v in val[-3:])


def test_metrics_csv_and_curves_are_written(tmp_path):
    vae = small_vae()
    vae.fit(run_dir=tmp_path)
    m = pd.read_csv(tmp_path / "metrics.csv")
    for col in ("epoch", "train_loss", "val_loss", "batch_recon", "batch_kl_local", "batch_alignment", "cells_per_s"):
        assert col in m.columns
    assert np.isfinite(m.train_loss).all() and m.train_loss.iloc[-1] < m.train_loss.iloc[0]
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert D.Split.from_json(tmp_path / "split.json").name == "iid"


def test_trainer_steps_equal_pyro_svi_with_clipped_adam():
    """Trainer (ELBOModule + torch Adam with ClippedAdam's clamp and decay) takes the same steps
    as pyro.infer.SVI with pyro.optim.ClippedAdam: same parameters and random draws give the
    same losses and updates."""
    import copy

    import pyro
    from pyro.infer import SVI, TraceMeanField_ELBO
    from pyro.optim import ClippedAdam
    from pyro_pvae.config import TrainConfig
    from pyro_pvae.model import GLOBAL_PARAMS
    from pyro_pvae.train import Trainer

    vae = small_vae()
    b = D.make_batcher(vae.adata, vae.split.train_idx, vae.vocabulary, vae.control_idx, 64)
    batches = [next(iter(b))] * 3
    cfg = TrainConfig(epochs=1, lr=1e-2)
    results = {}
    for engine in ("svi", "trainer"):
        module = copy.deepcopy(vae.module)
        pyro.clear_param_store()
        trainer = Trainer(module, b, None, cfg, None)
        if engine == "svi":
            def optim_args(_, name):
                glob = name.split(".", 1)[-1] in GLOBAL_PARAMS
                return {"lr": cfg.lr * (cfg.global_lr_multiplier if glob else 1.0), "clip_norm": cfg.clip_norm,
                        "lrd": cfg.lr_final_fraction ** (1.0 / trainer.total_steps)}
            svi = SVI(module.model, module.guide, ClippedAdam(optim_args), TraceMeanField_ELBO())
            step = lambda args: svi.step(*args, n_cells=trainer.n_cells)  # noqa: E731
        else:
            step = trainer.step
        torch.manual_seed(0)
        losses = [step(trainer.batch_args(batch, i, 1.0)) for i, batch in enumerate(batches)]
        results[engine] = (losses, {k: v.detach().clone() for k, v in module.state_dict().items()})
    np.testing.assert_allclose(results["trainer"][0], results["svi"][0], rtol=1e-4)
    moved = 0
    for k, v in results["svi"][1].items():
        mine = results["trainer"][1][k]
        if k == "running_control_center":  # an EMA over guide evaluations, not a trained parameter
            torch.testing.assert_close(mine, v, rtol=0, atol=1e-3)
            continue
        if k == "pert_encoder.net.2.bias":  # its location half cancels against the control centre
            v, mine = v[3:], mine[3:]  # (zero gradient): noise
        torch.testing.assert_close(mine, v, rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, vae.module.state_dict()[k]))
    assert moved > 10  # the steps really moved the parameters


def test_fit_streams_a_backed_h5ad(tmp_path):
    import anndata as ad

    adata = simulate("tiny", seed=2)
    adata.uns, adata.obsm = {}, {}
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    vae = PerturbedVAE(backed, split="iid", model=dict(latent_inv=3, latent_pert=3, hidden=16),
                       train=dict(epochs=2, batch_size=128, progress=False))
    assert isinstance(D.make_batcher(backed, vae.split.train_idx, vae.vocabulary, vae.control_idx, 64),
                      D.BackedBatcher)  # what fit() uses for a backed AnnData
    vae.fit()
    assert len(vae.history) == 2
    assert np.isfinite([r["train_loss"] for r in vae.history]).all()
    assert vae.predict([vae.vocabulary[0]], n_cells=5).n_obs == 5


def test_learning_rate_rule_for_large_batches():
    from pyro_pvae.config import TrainConfig
    from pyro_pvae.train import param_groups

    base = dict(lr=1e-3, lr_base_batch=256, batch_size=1024)
    assert TrainConfig.from_dict(base).batch_lr == pytest.approx(1e-3)  # rule "none" by default
    assert TrainConfig.from_dict({**base, "lr_batch_rule": "sqrt"}).batch_lr == pytest.approx(2e-3)
    cfg = TrainConfig.from_dict({**base, "lr_batch_rule": "linear", "global_lr_multiplier": 10.0})
    assert cfg.batch_lr == pytest.approx(4e-3)
    vae = small_vae()
    groups = param_groups(vae.module, cfg)
    assert [g["lr"] for g in groups] == pytest.approx([4e-3, 4e-2])
    with pytest.raises(ValueError, match="lr_batch_rule must be"):
        TrainConfig.from_dict({**base, "lr_batch_rule": "cubic"})
    with pytest.raises(ValueError, match="lr_base_batch must be >= 1, got 0"):
        TrainConfig.from_dict({**base, "lr_base_batch": 0})


def test_training_rotates_once_to_the_sparse_basis_and_goes_on(tmp_path, caplog):
    """train.rotate_at: after that share of the epochs the trainer rotates z_pert to the sparsest
    effects (the module's exact re-expression) once, and keeps training in the new basis; the
    checkpoint remembers it, so a resumed run does not rotate again."""
    adata = simulate("tiny", seed=1)
    vae = PerturbedVAE(adata, split="iid", model=dict(latent_inv=3, latent_pert=3, hidden=16),
                       train={"epochs": 4, "batch_size": 128, "progress": False, "rotate_at": 0.5,
                              "checkpoint_every": 1})
    with caplog.at_level("INFO", logger="pyro_pvae"):
        vae.fit(run_dir=tmp_path)
    rotations = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
    assert len(rotations) == 1 and rotations[0].startswith("epoch 1: rotated"), rotations
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["rotated"] is True
    assert len(vae.history) == 4  # training went on after the rotation


def test_gene_interactions_are_held_until_the_rotation(monkeypatch):
    """model.gene_interactions with train.interaction_steps=0 (the default): the trainer holds the pairs'
    gene-level interactions at 0 until it rotates z_pert (so c_2 and the latent pair effects are
    learned first), then frees them."""
    from pyro_pvae.model import PerturbedVAEModule

    calls = []
    original = PerturbedVAEModule.hold_gene_interactions
    monkeypatch.setattr(PerturbedVAEModule, "hold_gene_interactions",
                        lambda self, hold: (calls.append(hold), original(self, hold))[1])
    adata = simulate("tiny", seed=1)
    vae = PerturbedVAE(adata, split="iid", model=dict(latent_inv=3, latent_pert=3, hidden=16, gene_interactions=True),
                       train={"epochs": 4, "batch_size": 128, "progress": False, "rotate_at": 0.5,
                              "interaction_steps": 0})
    vae.fit()
    assert vae.module.n_pairs > 0
    assert calls == [True, False]
    assert vae.module.gene_interactions_on.item() == 1.0


def test_gene_interactions_last_phase_fits_kappa_alone_and_finds_a_planted_interaction(monkeypatch):
    """model.gene_interactions with train.interaction_steps > 0: kappa is held at 0 through
    training, then fitted alone. Known answer: one training pair's cells get 4x the counts on
    five of its expressed genes (ranks 21-25 by mean count; an interaction no composition of the
    singles makes); its kappa is above 0.5 on each (log 4 = 1.39; the latent pair effect takes
    some of it in training) and near 0 elsewhere, and no other parameter moves in that phase."""
    from pyro_pvae.model import GENE_INTERACTION_PARAMS
    from pyro_pvae.train import Trainer

    adata = simulate("tiny", seed=1)
    labels = adata.obs["condition"].astype(str)
    pair = sorted(c for c in labels.unique() if "+" in c)[0]
    cells = np.flatnonzero(labels.to_numpy() == pair)
    X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X).copy()
    planted = np.argsort(-X[cells].mean(0))[20:25]  # expressed (4x is visible), not the library's bulk
    X[np.ix_(cells, planted)] *= 4
    adata.X = X
    before = {}
    original = Trainer.fit_gene_interactions

    def snapshot_then_fit(self):
        before.update({n: p.detach().clone() for n, p in self.module.named_parameters()})
        assert self.module.gene_interactions_on.item() == 0.0  # held through training
        original(self)

    monkeypatch.setattr(Trainer, "fit_gene_interactions", snapshot_then_fit)
    vae = PerturbedVAE(adata, split="iid", model=dict(latent_inv=3, latent_pert=3, hidden=16, gene_interactions=True,
                                                     sparse_rotation=False),
                       train={"epochs": 30, "batch_size": 128, "progress": False, "interaction_steps": 300})
    vae.fit()
    after = dict(vae.module.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert sorted(moved) == sorted(n for n in GENE_INTERACTION_PARAMS if after[n].numel()), moved
    assert all(p.requires_grad for p in vae.module.parameters())  # unfrozen afterwards
    u = torch.as_tensor(vae.perturbation_matrix([pair]), dtype=torch.float32)
    kappa = vae.module.gene_pair_loc[vae.module.pair_ids(u)[0]].detach()
    rest = np.delete(np.arange(kappa.numel()), planted)
    assert float(kappa[planted].min()) > 0.5 and float(kappa[rest].abs().mean()) < 0.1, (kappa[planted], kappa[rest])
