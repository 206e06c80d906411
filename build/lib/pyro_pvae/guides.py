"""Building blocks of the variational guide (the guide itself is
:meth:`pyro_pvae.model.PerturbedVAEModule.guide`): MLPs, the amortised Normal encoder and the
straight-through Bernoulli used for hard spike-and-slab gates."""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus


def mlp(n_in: int, n_out: int, hidden: int, n_layers: int) -> nn.Sequential:
    """n_layers hidden layers of width ``hidden`` with ELU (smooth) activations."""
    layers, width = [], n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """MLP -> (loc, scale) of a diagonal Normal."""

    def __init__(self, n_in: int, n_out: int, hidden: int, n_layers: int):
        super().__init__()
        self.net = mlp(n_in, 2 * n_out, hidden, n_layers)

    def forward(self, h: torch.Tensor):
        loc, raw_scale = self.net(h).chunk(2, dim=-1)
        return loc, softplus(raw_scale) + 1e-4


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
