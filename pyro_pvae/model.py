r"""The PerturbedVAE generative model, as one Pyro program.

For perturbations p = 1..P, perturbation latents k = 1..K, cells n and genes g:

.. math::

    \pi &\sim \mathrm{Beta}(a, b)                                   && \text{(sparsity level)}\\
    \gamma_{pk} &\sim \mathrm{Bernoulli}(\pi),\quad s_{pk} \sim \mathcal N(0, \sigma_s^2),
        \quad \delta_{pk} = \gamma_{pk} s_{pk}                       && \text{(spike and slab)}\\
    W_{kj} &\sim \mathrm{Laplace}(0, b_W),\ j < k                    && \text{(latent DAG)}\\
    \theta_g &\sim \mathrm{LogNormal}(\mu_\theta, \sigma_\theta)     && \text{(NB inverse dispersion)}\\
    z^{inv}_n &\sim \mathcal N(0, I_D),\quad \varepsilon_n \sim \mathcal N(0, I_K)\\
    z^{pert}_n &= (I - W)^{-1}\big(\varepsilon_n + c_{m_n} \textstyle\sum_p u_{np}\delta_p\big)
        && \text{(shift interventions)}\\
    \rho_n &= \mathrm{softmax}\big(f([z^{inv}_n, z^{pert}_n])\big),\quad \mu_{ng} = \ell_n \rho_{ng}\\
    x_{ng} &\sim \mathrm{NB}(\text{mean } \mu_{ng}, \text{inverse dispersion } \theta_g)

By default (``gate_inference="marginal"``) the gate is summed out: ``delta_pk ~ (1 - pi)
N(0, spike^2) + pi N(0, sigma_s^2)`` with a narrow Normal spike standing in for the point
mass, so every site is continuous and reparameterised; the posterior inclusion probability
is ``PIP_pk = E_q[p(gamma_pk = 1 | delta_pk, pi)]`` (:func:`inclusion_probability`).
``gate_inference="straight_through"`` keeps the Bernoulli gate as a site (guide: hard
straight-through samples, analytic Bernoulli KL).

``u_n`` is the multi-hot perturbation label, ``m_n = sum_p u_np`` the number of targets and
``c_m`` a learned composition scale (``c_1 = 1``; ``c_2`` lets doubles compose sub- or
super-additively in latent space; it only moves when training contains doubles). ``l_n`` is
the observed library size. The decoder ``f`` never sees ``u``. The triangular system is
solved, never inverted.

Alignment: a ``pyro.factor`` adds ``-alpha * penalty``, pulling the invariant posterior
means ``m(x)`` (the guide's q(z_inv | x) encoder) of perturbed cells towards those of
randomly paired control cells (see :meth:`PerturbedVAEModel.alignment_penalty`).
``alpha = 0`` turns it off.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .config import ModelConfig


def mlp(n_in: int, n_out: int, hidden: int, n_layers: int) -> nn.Sequential:
    """n_layers hidden layers of width ``hidden`` with ELU (smooth) activations."""
    layers, width = [], n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """f([z_inv, z_pert]) -> gene logits (softmax gives proportions rho)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_in = cfg.latent_inv + cfg.latent_pert
        if cfg.decoder == "linear":
            self.net = nn.Linear(n_in, cfg.n_genes)
        elif cfg.decoder == "nonlinear":
            self.net = mlp(n_in, cfg.n_genes, cfg.hidden, cfg.n_layers)
        else:
            raise ValueError(f"model.decoder must be 'nonlinear' or 'linear', got {cfg.decoder!r}")

    def forward(self, z_inv: torch.Tensor, z_pert: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z_inv, z_pert], dim=-1))


def lognormalize_counts(x: torch.Tensor) -> torch.Tensor:
    """log1p(x / library_size * 1e4): the encoders' input (and the evaluation scale)."""
    return torch.log1p(x / x.sum(-1, keepdim=True).clamp(min=1.0) * 1e4)


def spike_slab_mixture(pi, spike_scale: float, slab_scale: float, shape) -> dist.MixtureSameFamily:
    """(1 - pi) N(0, spike_scale^2) + pi N(0, slab_scale^2): the spike-and-slab prior of one
    effect with its gate summed out (a narrow Normal spike stands in for the point mass)."""
    weights = torch.stack([1 - pi, pi], -1).expand(*shape, 2)
    scales = torch.tensor([spike_scale, slab_scale], dtype=pi.dtype, device=pi.device).expand(*shape, 2)
    return dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(torch.zeros_like(scales), scales))


def inclusion_probability(delta, pi, spike_scale: float, slab_scale: float):
    """p(gate = 1 | delta, pi) = pi N(delta; 0, slab) / [pi N(delta; 0, slab) + (1 - pi) N(delta; 0, spike)]."""
    log_slab = dist.Normal(0.0, slab_scale).log_prob(delta) + torch.log(pi)
    log_spike = dist.Normal(0.0, spike_scale).log_prob(delta) + torch.log1p(-pi)
    return torch.sigmoid(log_slab - log_spike)


def propagate(eps_plus_shift: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """z = (I - W)^{-1} b for each row b, by a triangular solve (W strictly lower)."""
    A = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - W
    return torch.linalg.solve_triangular(A, eps_plus_shift.unsqueeze(-1), upper=False).squeeze(-1)


def sparse_rotation(effects: torch.Tensor, n_restarts: int = 16, steps: int = 300, seed: int = 0) -> torch.Tensor:
    r"""Orthogonal ``O`` (K x K) minimising ``sum_pk |(effects O^T)_pk|`` (a smooth L1).

    Why: with shift interventions and ``eps ~ N(0, I)`` the likelihood is unchanged by any
    rotation ``z_pert -> O z_pert``, ``delta_p -> O delta_p`` (the decoder and encoder absorb
    ``O``), and the spike-and-slab prior pulls towards the sparse basis only when an effect is
    already near zero, so SVI settles in a rotated, dense-looking basis. The sparsest rotation
    is the one the prior prefers (cf. varimax in factor analysis). ``O = exp(A - A^T)`` is
    optimised from the identity and ``n_restarts - 1`` random starts; the best is returned."""
    E = effects.detach().to(torch.float64).cpu()
    K = E.shape[1]
    gen = torch.Generator().manual_seed(seed)
    scale = E.abs().mean().clamp(min=1e-8)
    best, best_loss = torch.eye(K, dtype=torch.float64), float("inf")
    for r in range(n_restarts):
        A = torch.zeros(K, K, dtype=torch.float64) if r == 0 else torch.randn(K, K, generator=gen, dtype=torch.float64)
        A.requires_grad_(True)
        opt = torch.optim.Adam([A], lr=0.05)
        with torch.enable_grad():  # callers may be under no_grad
            for _ in range(steps):
                O = torch.matrix_exp(A - A.T)
                loss = torch.sqrt((E @ O.T) ** 2 + (0.03 * scale) ** 2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            O = torch.matrix_exp(A - A.T)
            final = (E @ O.T).abs().sum().item()
        if final < best_loss:
            best, best_loss = O.detach(), final
    return best.to(dtype=effects.dtype, device=effects.device)


class PerturbedVAEModel(nn.Module):
    """Holds the decoder and the composition scale; ``model(...)`` is the Pyro program."""

    def __init__(self, cfg: ModelConfig, inv_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)
        # log c_2: composition scale of cells with two or more targets (c_1 = 1).
        self.log_multi_scale = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_composition)
        # The invariant encoder's mean enters the alignment factor; it belongs to the guide.
        self._inv_encoder = [inv_encoder]  # a list keeps it out of this module's parameters
        self.handed_inv_loc = None  # (x, m(x)) left by the guide for the alignment factor
        self.register_buffer("tril_mask", torch.ones(cfg.latent_pert, cfg.latent_pert).tril(-1))

    # ---- pieces shared with prediction -------------------------------------------------
    def shift(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """c_{m_n} * sum_p u_np delta_p, with c_1 = 1 and c_{>=2} learned."""
        n_targets = u.sum(-1, keepdim=True)
        scale = torch.where(n_targets > 1, self.log_multi_scale.exp(), torch.ones_like(n_targets))
        return scale * (u @ delta)

    def gene_log_mean(self, z_inv, z_pert, library_size):
        """log mu_ng = log l_n + log_softmax(f([z_inv, z_pert]))_g."""
        return library_size.log().unsqueeze(-1) + torch.log_softmax(self.decoder(z_inv, z_pert), -1)

    def likelihood(self, log_mu: torch.Tensor, theta: torch.Tensor):
        if self.cfg.likelihood == "poisson":
            return dist.Poisson(log_mu.exp())
        # NB with mean mu and inverse dispersion theta: total_count=theta, logits=log(mu/theta)
        return dist.NegativeBinomial(total_count=theta, logits=log_mu - theta.log())

    def alignment_penalty(self, x, u, x_ctrl) -> torch.Tensor:
        """Distance between invariant posterior means of perturbed cells and paired controls.

        ``pairwise``: sum_n [u_n != 0] ||m(x_n) - m(x_c(n))||^2 (the paper's form);
        ``group_mean`` (default): sum_p N_p ||mean_{n: u_np=1} m(x_n) - mean_n m(x_c(n))||^2,
        i.e. the same pull on the per-perturbation means, without the pairwise form's
        between-cell variance term (which shrinks all z_inv towards a collapse)."""
        encoder = self._inv_encoder[0]  # registered with Pyro by the guide
        handed, self.handed_inv_loc = self.handed_inv_loc, None
        # the guide, run just before on the same x, hands over m(x): no second encoder pass
        m = handed[1] if handed is not None and handed[0] is x else encoder(lognormalize_counts(x))[0]
        m_ctrl = encoder(lognormalize_counts(x_ctrl))[0]
        if self.cfg.alignment == "pairwise":
            perturbed = (u.sum(-1) > 0).to(x.dtype)
            return (perturbed * (m - m_ctrl).pow(2).sum(-1)).sum()
        counts = u.sum(0)  # cells of each perturbation in the batch
        group_means = (u.T @ m) / counts.clamp(min=1).unsqueeze(-1)
        return (counts * (group_means - m_ctrl.mean(0)).pow(2).sum(-1)).sum()

    # ---- the generative model ---------------------------------------------------------
    def model(self, x, u, x_ctrl=None, kl_weight=1.0, temperature=None, *, n_cells: int):
        """x: (B, G) counts; u: (B, P) multi-hot labels; x_ctrl: (B, G) counts of randomly
        paired control cells (alignment); kl_weight: annealing weight of the local KLs;
        temperature: used by the guide only; n_cells: cells in the data (minibatch scale)."""
        cfg = self.cfg
        P, K, D, G = cfg.n_perts, cfg.latent_pert, cfg.latent_inv, cfg.n_genes
        pyro.module("model", self)
        zeros = x.new_zeros(())

        # Global perturbation effects delta[p, k].
        if cfg.effect_prior == "spike_slab":
            pi = pyro.sample("pi", dist.Beta(zeros + cfg.pi_prior[0], zeros + cfg.pi_prior[1]))
        with pyro.plate("perts", P, dim=-2), pyro.plate("pert_latents", K, dim=-1):
            if cfg.effect_prior == "spike_slab" and cfg.gate_inference == "marginal":
                # gate summed out: delta ~ (1 - pi) N(0, spike^2) + pi N(0, slab^2)
                delta = pyro.sample("slab", spike_slab_mixture(pi, cfg.spike_scale, cfg.slab_scale, (P, K)))
            elif cfg.effect_prior == "spike_slab":
                gate = pyro.sample("gate", dist.Bernoulli(pi))
                slab = pyro.sample("slab", dist.Normal(zeros, cfg.slab_scale))
                delta = gate * slab
            elif cfg.effect_prior == "dense":
                delta = pyro.sample("slab", dist.Normal(zeros, cfg.dense_scale))
            else:
                raise ValueError(f"model.effect_prior must be 'spike_slab' or 'dense', got {cfg.effect_prior!r}")

        # Latent causal model: strictly lower-triangular W with a Laplace (shrinkage) prior.
        with pyro.plate("children", K, dim=-2), pyro.plate("parents", K, dim=-1):
            with poutine.mask(mask=self.tril_mask.bool()):
                W = pyro.sample("W", dist.Laplace(zeros, cfg.w_prior_scale)) * self.tril_mask

        genes = pyro.plate("genes", G, dim=-1)
        with genes:
            theta = pyro.sample("theta", dist.LogNormal(zeros + cfg.theta_prior[0], cfg.theta_prior[1]))

        batch = x.shape[0]
        with pyro.plate("cells", n_cells, subsample=torch.arange(batch, device=x.device), dim=-2):
            with poutine.scale(scale=kl_weight):
                z_inv = pyro.sample("z_inv", dist.Normal(zeros, 1.0).expand([D]).to_event(1)).squeeze(-2)
                eps = pyro.sample("eps", dist.Normal(zeros, 1.0).expand([K]).to_event(1)).squeeze(-2)
            z_pert = propagate(eps + self.shift(u, delta), W)
            log_mu = self.gene_log_mean(z_inv, z_pert, x.sum(-1))
            with genes:
                pyro.sample("x", self.likelihood(log_mu, theta), obs=x)

        if cfg.alpha > 0 and x_ctrl is not None:
            pyro.factor("alignment", -cfg.alpha * n_cells / batch * self.alignment_penalty(x, u, x_ctrl))
        return z_pert
