"""Data-parallel training (pyro_pvae.distributed) on CPU: 2 gloo processes vs one process."""
import numpy as np
import pytest
import torch

from pyro_pvae import distributed as PD

# noncentered: with the default parameterisation="group" the guide measures cells from running
# group centres, rank-local EMAs that DDP replaces by rank 0's at every forward
# (broadcast_buffers), so the two ranks' losses are not exactly those of an emulation
MODEL = {"latent_inv": 3, "latent_pert": 3, "hidden": 16, "parameterisation": "noncentered"}
TRAIN = {"epochs": 2, "batch_size": 64, "lr": 1e-2, "device": "cpu", "progress": False, "kl_warmup_epochs": 1}
STEPS = 12


def _data():
    from pyro_pvae.simulate import simulate

    adata = simulate("tiny", seed=0, n_genes=60, n_control=200, cells_per_single=20, cells_per_double=20)
    return adata


def _rank(rank, world, adata, path, model):
    torch.set_num_threads(1)
    vae, trainer = PD.fit_ddp(rank, world, adata, None, model, TRAIN, max_steps=STEPS)
    if rank == 0:
        torch.save({"loss": trainer.step_losses, "module": vae.module.state_dict()}, path)
    torch.distributed.destroy_process_group()


def test_shard_is_disjoint_and_equal():
    idx = np.arange(11)
    a, b = PD.shard(idx, 0, 2), PD.shard(idx, 1, 2)
    assert len(a) == len(b) == 5 and not set(a) & set(b)



@pytest.mark.slow
@pytest.mark.parametrize("library_model", [False, True], ids=["default", "library_model"])
def test_two_gloo_processes_match_one_process(tmp_path, library_model):
    """Also with the library-size model (on in the real Norman presets, which large data sets
    train data-parallel): its sites are used on every rank."""
    model = {**MODEL, "library_model": library_model}
    adata = _data()
    path = tmp_path / "rank0.pt"
    PD.spawn(_rank, 2, args=(adata, str(path), model))
    ddp = torch.load(path, weights_only=False)
    assert len(ddp["loss"]) == STEPS

    # (1) exact: one process doing what the two ranks do (shards, RNG streams, averaged grads)
    torch.set_num_threads(1)
    vae, trainer = PD.emulate_ddp(adata, None, model, TRAIN, world=2, max_steps=STEPS)
    np.testing.assert_allclose(ddp["loss"], trainer.step_losses, rtol=1e-4)
    for k, v in vae.module.state_dict().items():
        if k == "running_control_center":  # an EMA of rank-local control batches (DDP broadcasts
            continue                        # rank 0's); it is not part of the training loss
        torch.testing.assert_close(ddp["module"][k], v, rtol=1e-3, atol=1e-4)

    # (2) one ordinary process with the same global batch (64 cells, one RNG stream, its own
    # batch order): the same trajectory up to Monte-Carlo and batch noise
    _, one = PD.emulate_ddp(adata, None, model, TRAIN, world=1, max_steps=STEPS)
    a, b = np.array(ddp["loss"]), np.array(one.step_losses)
    assert a[-1] < 0.9 * a[0] and b[-1] < 0.9 * b[0]  # both learn
    assert abs(a[-4:].mean() - b[-4:].mean()) < 0.05 * abs(b[-4:].mean()), (a, b)
    assert np.max(np.abs(a - b) / np.abs(b)) < 0.15, (a, b)  # different batches and draws
