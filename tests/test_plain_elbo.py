"""The plain-PyTorch yardstick computes the same ELBO as Pyro's TraceMeanField_ELBO."""
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from perf.plain_elbo import amp, flops_per_cell, plain_loss
from pyro_pvae.config import ModelConfig
from pyro_pvae.model import PerturbedVAEModule

PLAIN = {"learn_composition": False, "pair_effects": False}  # what the yardstick mirrors


def _setup(**cfg_kw):
    torch.manual_seed(0)
    cfg = ModelConfig(latent_inv=3, latent_pert=4, hidden=16, **{**PLAIN, **cfg_kw})
    module = PerturbedVAEModule(cfg, n_genes=30, n_perts=5)
    model = guide = module
    with torch.no_grad():  # move off the initial values so every term matters
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    B = 12
    x = torch.distributions.Poisson(torch.rand(B, 30) * 5).sample()
    x[0, :] = 0.0
    x[0, 3] = 2.0
    u = torch.zeros(B, 5)
    u[1:, :][torch.arange(B - 1), torch.arange(B - 1) % 5] = 1.0
    u[2, 0] = u[2, 3] = 1.0  # a double
    x_ctrl = torch.distributions.Poisson(torch.rand(B, 30) * 5).sample()
    args = (x, u, x_ctrl, torch.tensor(0.7), torch.tensor(0.5))
    return model, guide, args


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("kw", [{}, {"effect_prior": "dense"}, {"likelihood": "poisson", "alpha": 0.0},
                                {"decoder": "linear", "learn_composition": False},
                                {"parameterisation": "centered"},
                                {"parameterisation": "noncentered"}])
def test_same_value_and_gradients(kw):
    model, guide, args = _setup(**kw)
    params = [p for p in model.parameters() if p.requires_grad]
    pyro.clear_param_store()
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    n_cells = 1000
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        lp = elbo.differentiable_loss(model.model, guide.guide, *args, n_cells=n_cells)
        gp = _grads(lp, params)
        pyro.set_rng_seed(seed)
        lq = plain_loss(model, *args, n_cells=n_cells)
        gq = _grads(lq, params)
        assert torch.allclose(lp, lq, rtol=1e-5, atol=1e-3), (float(lp), float(lq))
        for a, b in zip(gp, gq):
            if a is None or b is None:
                assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
            else:
                assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-4, (a - b).abs().max()
    # the deduplicated alignment (guide's m(x) reused) is the same number
    pyro.set_rng_seed(3)
    l1 = plain_loss(model, *args, n_cells=n_cells)
    pyro.set_rng_seed(3)
    l2 = plain_loss(model, *args, n_cells=n_cells, dedupe=True)
    assert torch.allclose(l1, l2)


def test_amp_patch_is_scoped_and_close():
    # noncentered: the group centres are running means that each training-mode call moves, so
    # bf16 and float32 calls in a row would not see the same state
    model, guide, args = _setup(parameterisation="noncentered")
    pyro.set_rng_seed(5)
    ref = plain_loss(model, *args, n_cells=100)
    with amp(model, torch.bfloat16):
        pyro.set_rng_seed(5)
        lb = plain_loss(model, *args, n_cells=100)
        pyro.set_rng_seed(5)
        lp = TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(model.model, guide.guide, *args,
                                                                          n_cells=100)
    assert torch.allclose(lb, lp, rtol=1e-5, atol=1e-3)  # pyro sees the same patched networks
    assert abs(float((lb - ref).detach())) < 0.05 * abs(float(ref.detach()))
    assert "forward" not in guide.inv_encoder.net.__dict__  # patch removed
    pyro.set_rng_seed(5)
    assert torch.equal(plain_loss(model, *args, n_cells=100), ref)


def test_flop_count():
    model, _, _ = _setup()
    f = flops_per_cell(model)
    G, P, H, D, K = 30, 5, 16, 3, 4
    enc_x = 2 * G * H + 2 * H * 2 * D
    assert f["forward"] == 3 * enc_x + (2 * (G + P) * H + 2 * H * 2 * K) + (2 * (D + K) * H + 2 * H * G)
    assert f["total"] > 2 * f["forward"]
