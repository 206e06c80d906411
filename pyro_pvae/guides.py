r"""Variational guides for :mod:`pyro_pvae.model`.

``PerturbedVAEGuide`` is amortised for the local latents and mean-field for the globals:

* ``q(z_inv | x) = N(m(x), s(x))``: the invariant encoder sees only the cell's
  log-normalised expression, never its label;
* ``q(eps | x, u) = N((I - W)(h(x, u) - h_ctrl) - c u delta, s'(x, u))``: the perturbation
  encoder predicts the cell's ``z_pert`` location ``h``, measured from the mean ``h_ctrl``
  of control cells; the guide turns it into the exogenous noise ``eps`` with the *sampled*
  DAG and effects, so the eps-KL pulls ``u delta`` towards what the encoder sees and
  thereby learns the effects;
* gates ``q(gamma_pk) = Bernoulli(PIP_pk)``, sampled straight-through (hard 0/1 forward,
  Gumbel-sigmoid gradient with an annealed temperature); the KL to the Bernoulli prior is
  analytic, so ``TraceMeanField_ELBO`` uses it. ``PIP_pk`` are the posterior inclusion
  probabilities;
* slabs ``q(s_pk | gamma_pk)``: Normal(m, v) when the gate is on and the prior when it is
  off, so an effect pays its slab KL only when included (Titsias & Lazaro-Gredilla 2011);
* DAG weights: Normal; theta: LogNormal; pi: Beta.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn.functional import softplus

from .config import ModelConfig
from .model import inclusion_probability, lognormalize_counts, mlp


class StraightThroughBernoulli(dist.Bernoulli):
    """Bernoulli whose ``rsample`` is hard 0/1 in the forward pass and carries the gradient
    of a relaxed (Gumbel-sigmoid, temperature ``tau``) sample in the backward pass.

    Being a ``Bernoulli``, its KL to a Bernoulli prior is analytic.
    """

    has_rsample = True

    def __init__(self, logits, temperature: float = 0.5, validate_args=None):
        self.temperature = temperature
        super().__init__(logits=logits, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return type(self)(self.logits.expand(torch.Size(batch_shape)), self.temperature)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        noise = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((self.logits.expand(shape) + noise.log() - (-noise).log1p()) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly 0/1 forward; d/dlogits through `soft`


class Encoder(nn.Module):
    """MLP -> (loc, scale) of a diagonal Normal."""

    def __init__(self, n_in: int, n_out: int, hidden: int, n_layers: int):
        super().__init__()
        self.net = mlp(n_in, 2 * n_out, hidden, n_layers)

    def forward(self, h: torch.Tensor):
        loc, raw_scale = self.net(h).chunk(2, dim=-1)
        return loc, softplus(raw_scale) + 1e-4


class PerturbedVAEGuide(nn.Module):
    """Amortised encoders + mean-field globals (see module docstring)."""

    def __init__(self, cfg: ModelConfig, init_gate_prob: float = 0.5):
        super().__init__()
        self.cfg = cfg
        P, K, G = cfg.n_perts, cfg.latent_pert, cfg.n_genes
        self.inv_encoder = Encoder(G, cfg.latent_inv, cfg.hidden, max(cfg.n_layers, 1))
        self.pert_encoder = Encoder(G + P, K, cfg.hidden, max(cfg.n_layers, 1))
        p0 = torch.tensor(init_gate_prob)
        # what a variant does not train is a buffer (DDP requires every parameter to be used)
        self._param_or_buffer("gate_logits", torch.full((P, K), float(p0.logit())), cfg.gate_sites)
        self.slab_loc = nn.Parameter(0.1 * torch.randn(P, K))
        self.slab_raw_scale = nn.Parameter(torch.full((P, K), -2.0))
        self._param_or_buffer("pi_raw", torch.tensor([0.0, 1.0]), cfg.effect_prior == "spike_slab")
        self.w_loc = nn.Parameter(torch.zeros(K, K))
        self.w_raw_scale = nn.Parameter(torch.full((K, K), -3.0))
        self.theta_loc = nn.Parameter(torch.full((G,), 1.5))
        self.theta_raw_scale = nn.Parameter(torch.full((G,), -2.0))
        self.register_buffer("tril_mask", torch.ones(K, K).tril(-1))
        self.register_buffer("running_control_center", torch.zeros(K))
        self._model = [None]  # set by attach(); a list keeps it out of this module's parameters

    def _param_or_buffer(self, name: str, value: torch.Tensor, trained: bool) -> None:
        if trained:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def attach(self, model) -> "PerturbedVAEGuide":
        """Share the model's composition scale (the guide's eps location uses the same shift)."""
        self._model[0] = model
        return self

    # ---- posterior summaries -----------------------------------------------------------
    def pi_mean(self) -> torch.Tensor:
        a, b = softplus(self.pi_raw[0]) + 1e-3, softplus(self.pi_raw[1]) + 1e-3
        return a / (a + b)

    def pip(self, n_draws: int = 256) -> torch.Tensor:
        """Posterior inclusion probabilities PIP[p, k] (ones for the dense prior).

        straight-through: q(gate = 1); marginal: E_q(delta)[p(gate = 1 | delta, E[pi])], a
        Monte-Carlo average over a fixed set of standard-normal draws (deterministic)."""
        cfg = self.cfg
        if cfg.effect_prior == "dense":
            return torch.ones_like(self.gate_logits)
        if cfg.gate_inference == "straight_through":
            return torch.sigmoid(self.gate_logits)
        noise = torch.randn((n_draws, 1, 1), generator=torch.Generator().manual_seed(0)).to(self.slab_loc)
        delta = self.slab_loc + (softplus(self.slab_raw_scale) + 1e-4) * noise
        return inclusion_probability(delta, self.pi_mean(), cfg.spike_scale, cfg.slab_scale).mean(0)

    def effect_mean(self) -> torch.Tensor:
        """Posterior mean of delta (straight-through: PIP * E[slab])."""
        if self.cfg.gate_sites:
            return self.pip() * self.slab_loc
        return self.slab_loc

    def w_mean(self) -> torch.Tensor:
        return self.w_loc * self.tril_mask

    # ---- the guide ---------------------------------------------------------------------
    def guide(self, x, u, x_ctrl=None, kl_weight=1.0, temperature=0.5, *, n_cells: int):
        cfg = self.cfg
        P, K, G = cfg.n_perts, cfg.latent_pert, cfg.n_genes
        pyro.module("guide", self)

        if cfg.effect_prior == "spike_slab":
            pyro.sample("pi", dist.Beta(softplus(self.pi_raw[0]) + 1e-3, softplus(self.pi_raw[1]) + 1e-3))
        with pyro.plate("perts", P, dim=-2), pyro.plate("pert_latents", K, dim=-1):
            slab_scale = softplus(self.slab_raw_scale) + 1e-4
            if cfg.gate_sites:
                gate = pyro.sample("gate", StraightThroughBernoulli(self.gate_logits, temperature))
                # q(s | gate): the fitted Normal when the gate is on, the prior when it is off, so
                # an effect pays the slab's KL only when it is included (Occam's razor).
                slab = pyro.sample("slab", dist.Normal(gate * self.slab_loc,
                                                       gate * slab_scale + (1 - gate) * cfg.slab_scale))
                delta = gate * slab
            else:
                delta = pyro.sample("slab", dist.Normal(self.slab_loc, slab_scale))
        with pyro.plate("children", K, dim=-2), pyro.plate("parents", K, dim=-1):
            with poutine.mask(mask=self.tril_mask.bool()):
                W = pyro.sample("W", dist.Normal(self.w_loc, softplus(self.w_raw_scale) + 1e-4)) * self.tril_mask
        with pyro.plate("genes", G, dim=-1):
            pyro.sample("theta", dist.LogNormal(self.theta_loc, softplus(self.theta_raw_scale) + 1e-4))

        batch = x.shape[0]
        with pyro.plate("cells", n_cells, subsample=torch.arange(batch, device=x.device), dim=-2):
            with poutine.scale(scale=kl_weight):
                xn = lognormalize_counts(x)
                inv_loc, inv_scale = self.inv_encoder(xn)
                if self.training and x_ctrl is not None and cfg.alpha > 0 and self._model[0] is not None:
                    self._model[0].handed_inv_loc = (x, inv_loc)  # reused by the alignment factor
                pyro.sample("z_inv", dist.Normal(inv_loc.unsqueeze(-2), inv_scale.unsqueeze(-2)).to_event(1))
                center = self.control_center(x_ctrl, u)
                eps_loc, eps_scale = self.eps_posterior(xn, u, W, delta, center)
                pyro.sample("eps", dist.Normal(eps_loc.unsqueeze(-2), eps_scale.unsqueeze(-2)).to_event(1))

    def control_center(self, x_ctrl, u) -> torch.Tensor:
        """Mean encoder location h(x_c, 0) of the batch's paired control cells (training), or
        its running average (evaluation / prediction). Measuring z_pert from the control
        population pins its origin, so delta is the shift *from control* (without it, a common
        offset can sit in both the controls' eps and every delta)."""
        if x_ctrl is None or not self.training:
            return self.running_control_center
        h = self.pert_encoder(torch.cat([lognormalize_counts(x_ctrl), torch.zeros_like(u)], -1))[0].mean(0)
        with torch.no_grad():
            self.running_control_center.mul_(0.95).add_(0.05 * h)
        return h

    def eps_posterior(self, xn, u, W, delta, center=None):
        """loc, scale of q(eps | x, u) = N((I - W)(h(x, u) - center) - shift(u, delta), s(x, u))."""
        z_loc, scale = self.pert_encoder(torch.cat([xn, u], dim=-1))
        if center is None:
            center = self.running_control_center
        A = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - W
        return (z_loc - center) @ A.T - self._model[0].shift(u, delta), scale
