r"""PerturbedVAE (arXiv 2605.19343): the generative model and its guide, in one module.

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
    \rho_n &= \mathrm{softmax}\big(f([z^{inv}_n, z^{pert}_n]) + c_{m_n} \textstyle\sum_p u_{np}\beta_p\big),
        \quad \mu_{ng} = \ell_n \rho_{ng}\\
    x_{ng} &\sim \mathrm{NB}(\text{mean } \mu_{ng}, \text{inverse dispersion } \theta_g)

By default (``gate_inference="marginal"``) the gate is summed out: ``delta_pk ~ (1 - pi)
N(0, spike^2) + pi N(0, sigma_s^2)`` with a narrow Normal spike standing in for the point
mass, so every site is continuous and reparameterised; the posterior inclusion probability
is ``PIP_pk = E_q[p(gamma_pk = 1 | delta_pk, pi)]`` (:func:`inclusion_probability`).
``gate_inference="straight_through"`` keeps the Bernoulli gate as a site (guide: hard
straight-through samples, analytic Bernoulli KL).

``beta_pg ~ Laplace(0, b)`` (``b`` learned) are optional gene-level effects beside the latent
path (``model.gene_effects``; off by default: ``beta = 0``); with them each pair adds a gene-level
interaction ``kappa_g ~ Laplace(0, b_I)`` (``model.gene_interactions``: kappa alone, beta = 0). With ``model.pair_composition`` (off by default)
each pair composes with its own ``log c_pair ~ N(log c_2, s_c^2)``; pairs unseen in training draw
their interactions and ``c`` from these fitted priors at prediction.
``u_n`` is the multi-hot perturbation label, ``m_n = sum_p u_np`` the number of targets and
``c_m`` a learned composition scale (``c_1 = 1``; ``c_2`` lets doubles compose sub- or
super-additively in latent space). ``l_n`` is the observed library size (``model.library_model``
adds ``log l_n ~ N(l_0 + c_{m_n} sum_p u_np lambda_p, s^2)`` with ``lambda_p ~ N(0, 0.5^2)``, so a
perturbation can change the panel's total counts and a predicted cell's library follows). The decoder ``f``
never sees ``u``. The triangular system is solved, never inverted.

Alignment: a ``pyro.factor`` adds ``-alpha * penalty``, pulling the invariant posterior
means ``m(x)`` (the guide's q(z_inv | x) encoder) of perturbed cells towards those of
randomly paired control cells (:meth:`PerturbedVAEModule.alignment_penalty`).
``alpha = 0`` turns it off.

The guide (:meth:`PerturbedVAEModule.guide`) is amortised for the local latents and
mean-field for the globals:

* ``q(z_inv | x) = N(m(x), s(x))``: the invariant encoder sees only the cell, never its label;
* ``q(eps | x, u) = N((I - W)(h(x, u) - r_g), s'(x, u))`` (``parameterisation="group"``, the
  default): the perturbation encoder's location ``h`` is measured from ``r_g``, the running mean
  location of the cell's training group g (its single, or its training pair; the control
  centre ``h_ctrl`` for controls and pairs unseen in training), and turned into exogenous
  noise with the sampled DAG. The model adds the shift, so the guide's ``z_pert = (I -
  W)^{-1}(eps + c u delta)``: group offsets are carried by the effects alone, and the effects,
  c_2 and the pair effects get the likelihood's gradient directly. ``"noncentered"``: ``r_g =
  h_ctrl`` for every cell (the encoder, which sees u, may then carry part of a group's offset
  and the effects the rest; with large effects it carries most of it). ``"centered"``: ``q(eps
  | x, u) = N((I - W)(h - h_ctrl) - c u delta, s')``, so ``z_pert = h - h_ctrl`` and the effects
  are learned only through the eps KL (on the shipped Norman cells the model then reproduces
  its own training cells' group means poorly; analyses/param_check.py);
* straight-through gates ``q(gamma_pk) = Bernoulli(PIP_pk)`` (hard 0/1 forward, Gumbel-sigmoid
  gradient) with slabs ``q(s | gamma)`` = the fitted Normal when on and the prior when off;
  marginal gates: ``q(delta_pk) = N(m, v)``;
* DAG weights: Normal; theta: LogNormal; pi: Beta.

Predicted cells come from the same program: :func:`sample_globals` traces the guide for
global draws and :meth:`PerturbedVAEModule.sample_cells` runs :meth:`~PerturbedVAEModule.model`
with its observation released.
"""
from __future__ import annotations

from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import kl_divergence
from torch.nn.functional import softplus

from .config import ModelConfig
from .guides import Encoder, StraightThroughBernoulli, mlp
from .utils import lognormalize

#: the variational parameters of the pairs' gene-level interactions kappa and their scale b_I
#: (``model.gene_interactions`` with ``train.interaction_steps > 0``: fitted alone after training)
GENE_INTERACTION_PARAMS = ("gene_pair_loc", "gene_pair_raw_scale", "gene_pair_scale_loc", "gene_pair_scale_raw_scale")
#: the guide's global variational parameters (learning rate ``lr * global_lr_multiplier``)
GLOBAL_PARAMS = ("gate_logits", "slab_loc", "slab_raw_scale", "pi_raw", "w_loc", "w_raw_scale",
                 "theta_loc", "theta_raw_scale", "c2_loc", "c2_raw_scale", "pair_pi_raw", "pair_scale_loc",
                 "pair_scale_raw_scale", "pair_loc", "pair_raw_scale", "gene_effect_loc", "gene_effect_raw_scale",
                 "gene_scale_loc", "gene_scale_raw_scale", "c_spread_loc", "c_spread_raw_scale",
                 "pair_log_c_loc", "pair_log_c_raw_scale", "library_effect_loc", "library_effect_raw_scale"
                 ) + GENE_INTERACTION_PARAMS
#: sample sites of the globals and of the per-cell latents
GLOBAL_SITES = ("pi", "gate", "slab", "W", "theta", "c2", "pair_pi", "pair_scale", "pair_effect", "gene_scale",
                "gene_effect", "gene_pair_scale", "gene_pair_effect", "c_spread", "pair_log_c", "library_effect")
LOCAL_SITES = ("z_inv", "eps")


# ---- the math pieces ----------------------------------------------------------------------

def spike_slab_mixture(pi, spike_scale: float, slab_scale, shape) -> dist.MixtureSameFamily:
    """(1 - pi) N(0, spike_scale^2) + pi N(0, slab_scale^2): the spike-and-slab prior of one
    effect with its gate summed out (a narrow Normal spike stands in for the point mass).
    ``slab_scale`` may be a (scalar) tensor, e.g. a learned scale."""
    weights = torch.stack([1 - pi, pi], -1).expand(*shape, 2)
    slab = torch.as_tensor(slab_scale, dtype=pi.dtype, device=pi.device)
    scales = torch.stack([torch.full_like(slab, spike_scale), slab], -1).expand(*shape, 2)
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
    is the one the prior prefers (cf. varimax in factor analysis). ``O`` is the Cayley
    transform ``(I - S)^{-1} (I + S)`` of a skew-symmetric ``S = A - A^T`` (every rotation
    without eigenvalue -1; a linear solve, far cheaper than a matrix exponential), optimised
    from the identity and ``n_restarts - 1`` random starts, all restarts in one batched
    tensor (their losses are independent, so one Adam on the stack is ``n_restarts``
    separate runs); the best is returned."""
    E = effects.detach().to(torch.float64).cpu()
    K = E.shape[1]
    gen = torch.Generator().manual_seed(seed)
    smooth = (0.03 * E.abs().mean().clamp(min=1e-8)) ** 2
    eye = torch.eye(K, dtype=torch.float64)

    def rotation(A):
        S = A - A.transpose(1, 2)
        return torch.linalg.solve(eye - S, eye + S)

    A = 0.5 * torch.randn(n_restarts, K, K, generator=gen, dtype=torch.float64)
    A[0] = 0.0  # the identity is always one start
    A.requires_grad_(True)
    opt = torch.optim.Adam([A], lr=0.05)
    with torch.enable_grad():  # callers may be under no_grad
        for _ in range(steps):
            loss = torch.sqrt((E @ rotation(A).transpose(1, 2)) ** 2 + smooth).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        O = rotation(A)
        best = int((E @ O.transpose(1, 2)).abs().sum((1, 2)).argmin())
    return O[best].detach().to(dtype=effects.dtype, device=effects.device)


def group_mean_alignment(m: torch.Tensor, u: torch.Tensor, m_ctrl: torch.Tensor) -> torch.Tensor:
    """sum_p N_p (||mean_p m - mean_c m||^2 - tr S_p / N_p - tr S_c / N_c) over the
    perturbations with N_p >= 2 cells in the batch (S: sample covariances): unbiased for
    sum_p N_p ||E m_p - E m_c||^2 whatever the spreads (see
    :meth:`PerturbedVAEModule.alignment_penalty`)."""
    counts = u.sum(0)  # cells of each perturbation in the batch
    n = counts.clamp(min=2).unsqueeze(-1)
    group_means = (u.T @ m) / n
    group_vars = ((u.T @ m.pow(2)) - n * group_means.pow(2)) / (n - 1)  # per perturbation and dimension
    distance = (group_means - m_ctrl.mean(0)).pow(2).sum(-1)
    bias = group_vars.sum(-1) / n.squeeze(-1) + m_ctrl.var(0).sum() / m_ctrl.shape[0]
    return (torch.where(counts >= 2, counts, 0.0) * (distance - bias)).sum()


def pairwise_alignment(m: torch.Tensor, u: torch.Tensor, m_ctrl: torch.Tensor) -> torch.Tensor:
    """sum_n [u_n != 0] ||m_n - m_c(n)||^2, the paper's per-pair form."""
    perturbed = (u.sum(-1) > 0).to(m.dtype)
    return (perturbed * (m - m_ctrl).pow(2).sum(-1)).sum()


class Decoder(nn.Module):
    """Gene logits (softmax gives proportions rho) from [z_inv, z_pert]:

    * ``nonlinear``: f([z_inv, z_pert]), an MLP;
    * ``linear``: a linear map;
    * ``hybrid``: f([z_inv, z_pert]) + L z_pert, a log-linear path from z_pert beside the MLP,
      so that latent shifts add in log expression (the additive model of doubles is the
      special case f constant in z_pert); the MLP is left for interactions."""

    def __init__(self, n_inv: int, n_pert: int, n_genes: int, cfg: ModelConfig):
        super().__init__()
        n_in = n_inv + n_pert
        self.net = nn.Linear(n_in, n_genes) if cfg.decoder == "linear" else mlp(n_in, n_genes, cfg.hidden,
                                                                                  cfg.n_layers)
        self.loglinear = None
        if cfg.decoder == "hybrid":
            self.loglinear = nn.Linear(n_pert, n_genes, bias=False)
            nn.init.zeros_(self.loglinear.weight)

    def forward(self, z_inv: torch.Tensor, z_pert: torch.Tensor) -> torch.Tensor:
        logits = self.net(torch.cat([z_inv, z_pert], dim=-1))
        return logits if self.loglinear is None else logits + self.loglinear(z_pert)

    @property
    def first_layer(self) -> nn.Linear:
        return self.net if isinstance(self.net, nn.Linear) else self.net[0]


def _positive(raw: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    return softplus(raw) + floor


def _inverse_positive(value: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """raw with ``_positive(raw) = value`` (values at the floor map to a very negative raw)."""
    return torch.log(torch.expm1((value - floor).clamp(min=1e-12)))


class PerturbedVAEModule(nn.Module):
    """Networks and variational parameters of PerturbedVAE; ``model`` and ``guide`` are the
    Pyro programs (see the module docstring for the equations).

    ``n_genes`` and ``n_perts`` come from the data; ``pairs``: the (i, j) perturbation index
    pairs (i < j) of the training doubles, which get their own interaction effects (with
    ``cfg.pair_effects``); ``cfg`` holds sizes and priors."""

    def __init__(self, cfg: ModelConfig, n_genes: int, n_perts: int, pairs=(), init_gate_prob: float = 0.5,
                 library_log_mean: float = 0.0):
        super().__init__()
        self.cfg, self.n_genes, self.n_perts = cfg, int(n_genes), int(n_perts)
        P, K, D, G = self.n_perts, cfg.latent_pert, cfg.latent_inv, self.n_genes
        keys = sorted({min(i, j) * P + max(i, j) for i, j in pairs}) if cfg.pair_effects else []
        self.n_pairs = len(keys)
        self.pairs_unseen = False  # see pairs_as_unseen
        depth = max(cfg.n_layers, 1)
        # guide networks: q(z_inv | x) and the z_pert location h(x, u)
        self.inv_encoder = Encoder(G, D, cfg.hidden, depth)
        self.pert_encoder = Encoder(G + P, K, cfg.hidden, depth)
        # guide: mean-field globals (what a variant does not train is a buffer, as DDP requires
        # every parameter to be used)
        gate_logit = float(torch.tensor(init_gate_prob).logit())
        self._param_or_buffer("gate_logits", torch.full((P, K), gate_logit), cfg.gate_sites)
        self.slab_loc = nn.Parameter(0.1 * torch.randn(P, K))
        self.slab_raw_scale = nn.Parameter(torch.full((P, K), -2.0))
        self._param_or_buffer("pi_raw", torch.tensor([0.0, 1.0]), cfg.effect_prior == "spike_slab")
        self.w_loc = nn.Parameter(torch.zeros(K, K))
        self.w_raw_scale = nn.Parameter(torch.full((K, K), -3.0))
        self.theta_loc = nn.Parameter(torch.full((G,), 1.5))
        self.theta_raw_scale = nn.Parameter(torch.full((G,), -2.0))
        self.register_buffer("tril_mask", torch.ones(K, K).tril(-1))
        self.register_buffer("running_control_center", torch.zeros(K))
        #: running mean encoder location of each training group (singles, then training pairs)
        self.register_buffer("group_centers", torch.zeros(P + self.n_pairs, K))
        self.register_buffer("group_seen", torch.zeros(P + self.n_pairs, dtype=torch.bool))
        #: orthogonal O of :meth:`rotate_latents` (identity until then): q(eps) scales are those
        #: of O eps, the square roots of diag(O diag(s^2) O^T)
        self.register_buffer("eps_rotation", torch.eye(K))
        # guide: composition of doubles (c_2, pair interactions)
        learned_pairs = bool(cfg.pair_effects and self.n_pairs)
        self._param_or_buffer("c2_loc", torch.tensor(float(cfg.composition_prior[0])), cfg.learn_composition)
        self._param_or_buffer("c2_raw_scale", torch.tensor(-2.0), cfg.learn_composition)
        per_pair_c = self.per_pair_composition
        self._param_or_buffer("c_spread_loc", torch.tensor(float(cfg.composition_spread_prior[0])), per_pair_c)
        self._param_or_buffer("c_spread_raw_scale", torch.tensor(-2.0), per_pair_c)
        n_c_pairs = self.n_pairs if per_pair_c else 0
        self._param_or_buffer("pair_log_c_loc", torch.full((n_c_pairs,), float(cfg.composition_prior[0])),
                              bool(n_c_pairs))
        self._param_or_buffer("pair_log_c_raw_scale", torch.full((n_c_pairs,), -2.0), bool(n_c_pairs))
        self._param_or_buffer("pair_pi_raw", torch.tensor([1.0, 1.0]), cfg.pair_effects)
        self._param_or_buffer("pair_scale_loc", torch.tensor(float(cfg.pair_scale_prior[0])), cfg.pair_effects)
        self._param_or_buffer("pair_scale_raw_scale", torch.tensor(-2.0), cfg.pair_effects)
        self._param_or_buffer("pair_loc", torch.zeros(self.n_pairs, K), learned_pairs)
        self._param_or_buffer("pair_raw_scale", torch.full((self.n_pairs, K), -2.0), learned_pairs)
        self.register_buffer("pair_keys", torch.tensor(keys, dtype=torch.long))
        # guide: gene-level effects beta[p, g] beside the latent path
        self._param_or_buffer("gene_scale_loc", torch.tensor(float(cfg.gene_scale_prior[0])), cfg.gene_effects)
        self._param_or_buffer("gene_scale_raw_scale", torch.tensor(-2.0), cfg.gene_effects)
        self._param_or_buffer("gene_effect_loc", torch.zeros(P if cfg.gene_effects else 0, G), cfg.gene_effects)
        self._param_or_buffer("gene_effect_raw_scale", torch.full((P if cfg.gene_effects else 0, G), -4.0),
                              cfg.gene_effects)
        gene_pairs = cfg.gene_pair_sites  # gene-level interactions of pairs
        n_gene_pairs = self.n_pairs if gene_pairs else 0
        self._param_or_buffer("gene_pair_scale_loc", torch.tensor(float(cfg.gene_scale_prior[0])), gene_pairs)
        self._param_or_buffer("gene_pair_scale_raw_scale", torch.tensor(-2.0), gene_pairs)
        self._param_or_buffer("gene_pair_loc", torch.zeros(n_gene_pairs, G), bool(n_gene_pairs))
        self._param_or_buffer("gene_pair_raw_scale", torch.full((n_gene_pairs, G), -4.0), bool(n_gene_pairs))
        #: 0 while the trainer holds the gene-level interactions of model.gene_interactions (until
        #: the rotation, or until the last phase; see :meth:`hold_gene_interactions`), else 1
        self.register_buffer("gene_interactions_on", torch.tensor(1.0))
        # model: the decoder f
        self.decoder = Decoder(D, K, G, cfg)
        # model.library_model: log library size l_0 (starts at the training cells' mean, library_log_mean)
        # and sd; guide: q(lambda_p), the perturbations' effects on it
        lib = cfg.library_model
        self._param_or_buffer("library_center", torch.tensor(float(library_log_mean)), lib)
        self._param_or_buffer("library_raw_scale", torch.tensor(0.0), lib)
        self._param_or_buffer("library_effect_loc", torch.zeros(P if lib else 0, 1), lib)
        self._param_or_buffer("library_effect_raw_scale", torch.full((P if lib else 0, 1), -2.0), lib)
        #: (x, m(x)) kept by the guide for the model's alignment factor of the same step, so
        #: the invariant encoder runs once per step (the guide runs before the model)
        self.guide_inv_loc: tuple | None = None

    def _param_or_buffer(self, name: str, value: torch.Tensor, trained: bool) -> None:
        if trained:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def global_parameters(self) -> list[nn.Parameter]:
        """The guide's global variational parameters (effects, DAG, dispersions, composition)."""
        return [p for n, p in self.named_parameters() if n in GLOBAL_PARAMS]

    # ---- pieces of the generative story -------------------------------------------------
    def pair_ids(self, u: torch.Tensor) -> torch.Tensor:
        """Per cell: the index of its pair among the training pairs; -1 for a double whose
        pair was not in training; -2 for cells with other than two targets."""
        two = u.sum(-1) == 2
        i, j = u.topk(2, dim=-1).indices.sort(-1).values.unbind(-1)
        key = i * self.n_perts + j
        if self.n_pairs == 0 or self.pairs_unseen:
            return torch.where(two, -1, -2)
        pos = torch.searchsorted(self.pair_keys, key).clamp(max=self.n_pairs - 1)
        known = self.pair_keys[pos] == key
        return torch.where(two, torch.where(known, pos, -1), -2)

    @contextmanager
    def pairs_as_unseen(self):
        """Within this block every double is treated as a pair unseen in training: its own
        interaction (and composition) is replaced by draws from the fitted prior, as for a new
        pair. For calibrating the intervals of unseen pairs on the training pairs."""
        self.pairs_unseen = True
        try:
            yield self
        finally:
            self.pairs_unseen = False

    @property
    def per_pair_composition(self) -> bool:
        """``model.pair_composition``: each pair composes with its own c (needs a learned c_2 and
        pair effects)."""
        return self.cfg.pair_composition and self.cfg.learn_composition and self.cfg.pair_effects

    def composition(self, u, c2=None, pair_log_c=None, novel_pair_log_c=None):
        """The composition scale of each cell's shift: ``c2`` (a scalar, or None for 1), or with
        per-pair composition a (B, 1) column: exp(log c_pair) for training pairs (``pair_log_c``),
        the drawn ``novel_pair_log_c`` (B, 1) for pairs unseen in training, ``c2`` otherwise."""
        if pair_log_c is None and novel_pair_log_c is None:
            return c2
        pid = self.pair_ids(u).unsqueeze(-1)
        out = (c2 if c2 is not None else torch.tensor(1.0)).expand(u.shape[0], 1).to(u)
        if pair_log_c is not None and self.n_pairs:
            out = torch.where(pid >= 0, pair_log_c[pid.squeeze(-1).clamp(min=0)].unsqueeze(-1).exp(), out)
        if novel_pair_log_c is not None:
            out = torch.where(pid == -1, novel_pair_log_c.exp(), out)
        return out

    def shift(self, u, delta, c2=None, pair_effect=None, novel_pair_effect=None) -> torch.Tensor:
        """The intervention on eps: c_{m_n} sum_p u_np delta_p + iota_{pair(n)}. The same
        composition gives the gene-level shift in log expression, c_{m_n} sum_p u_np beta_p +
        kappa_{pair(n)} (``model.gene_effects``; pass beta, kappa and their novel draws).

        c_1 = 1 and c_{>=2} = ``c2`` (None: 1; a (B, 1) column: per cell, :meth:`composition`);
        iota: the pair's interaction effect
        (``pair_effect`` rows of the training pairs; ``novel_pair_effect``, (B, K), for cells
        of pairs not seen in training, drawn from the fitted prior at prediction)."""
        out = u @ delta
        if c2 is not None:
            out = torch.where(u.sum(-1, keepdim=True) > 1, c2 * out, out)
        if pair_effect is None and novel_pair_effect is None:
            return out
        pid = self.pair_ids(u).unsqueeze(-1)
        if pair_effect is not None and self.n_pairs:
            out = out + (pid >= 0) * pair_effect[pid.squeeze(-1).clamp(min=0)]
        if novel_pair_effect is not None:
            out = out + (pid == -1) * novel_pair_effect
        return out

    def gene_log_mean(self, z_inv, z_pert, library_size, gene_shift=0.0):
        """log mu_ng = log l_n + log_softmax(f([z_inv, z_pert]) + gene_shift)_g."""
        return library_size.log().unsqueeze(-1) + torch.log_softmax(self.decoder(z_inv, z_pert) + gene_shift, -1)

    def likelihood(self, log_mu: torch.Tensor, theta: torch.Tensor):
        """NB with mean mu and inverse dispersion theta (total_count=theta, logits=log(mu/theta));
        ``likelihood="poisson"``: Poisson(mu)."""
        if self.cfg.likelihood == "poisson":
            return dist.Poisson(log_mu.exp())
        return dist.NegativeBinomial(total_count=theta, logits=log_mu - theta.log())

    def alignment_penalty(self, x, u, x_ctrl) -> torch.Tensor:
        """Distance between invariant posterior means m(x) of perturbed cells and paired controls.

        ``group_mean`` (default): for each perturbation p with N_p >= 2 cells in the batch and
        the batch's N_c paired controls, an unbiased estimate of ||E m(x_p) - E m(x_c)||^2,

            sum_p N_p (||mean_p m - mean_c m||^2 - tr S_p / N_p - tr S_c / N_c),

        with S the groups' sample covariances. Its expectation is N_p times the squared
        distance of the true means, whatever the spreads: unlike the plain squared distance of
        the batch means (biased upwards by tr Cov_p / N_p + tr Cov_c / N_c) it gives no reward
        for shrinking z_inv to a point, and (each group's own spread being subtracted) none for
        spreading one group out either.
        ``pairwise`` (the paper's form): sum_n [u_n != 0] ||m(x_n) - m(x_c(n))||^2; its
        optimum shrinks z_inv (it includes twice the between-cell variance)."""
        kept, self.guide_inv_loc = self.guide_inv_loc, None
        m = kept[1] if kept is not None and kept[0] is x else self.inv_encoder(lognormalize(x))[0]
        m_ctrl = self.inv_encoder(lognormalize(x_ctrl))[0]
        if self.cfg.alignment == "pairwise":
            return pairwise_alignment(m, u, m_ctrl)
        return group_mean_alignment(m, u, m_ctrl)

    # ---- the generative model -----------------------------------------------------------
    def model(self, x, u, x_ctrl=None, kl_weight=1.0, temperature=None, *, n_cells: int,
              novel_pair_effect=None, novel_gene_pair_effect=None, novel_pair_log_c=None,
              library: str = "observed"):
        """x: (B, G) counts (their totals are the library sizes); u: (B, P) multi-hot labels;
        x_ctrl: (B, G) counts of randomly paired control cells (alignment); kl_weight:
        annealing weight of the local KLs; temperature: used by the guide only; n_cells: cells
        in the data (minibatch scale); novel_pair_effect: (B, K) interaction of cells whose
        pair was not in training (prediction; see :meth:`shift`); novel_gene_pair_effect: (B, G),
        their gene-level interaction (see :meth:`shift`); novel_pair_log_c: (B, 1), their log
        composition scale (see :meth:`composition`); library (``model.library_model``): ``"observed"``
        (the library sizes are data), ``"keep"`` (the cells keep them: posterior-predictive checks) or
        ``"counterfactual"`` (prediction: each cell moves from control depth by its condition's library
        effects; :meth:`sample_cells` first moves start cells of other conditions back to control)."""
        cfg = self.cfg
        P, K, D, G = self.n_perts, cfg.latent_pert, cfg.latent_inv, self.n_genes
        pyro.module("pvae", self)
        zeros = x.new_zeros(())

        # The priors of the effects, composition and DAG are weighted like their data term
        # (global_prior_scale): the likelihood at full weight (group, noncentered), or the eps KL
        # that kl_weight scales (centered), so annealing never lets a prior overrule the data.
        with poutine.scale(scale=self.global_prior_scale(kl_weight)):
            # Global perturbation effects delta[p, k].
            if cfg.effect_prior == "spike_slab":
                pi = pyro.sample("pi", dist.Beta(zeros + cfg.pi_prior[0], zeros + cfg.pi_prior[1]))
            with pyro.plate("perts", P, dim=-2), pyro.plate("pert_latents", K, dim=-1):
                if cfg.effect_prior == "dense":
                    delta = pyro.sample("slab", dist.Normal(zeros, cfg.dense_scale))
                elif cfg.gate_inference == "marginal":  # gate summed out
                    delta = pyro.sample("slab", spike_slab_mixture(pi, cfg.spike_scale, cfg.slab_scale, (P, K)))
                else:
                    gate = pyro.sample("gate", dist.Bernoulli(pi))
                    delta = gate * pyro.sample("slab", dist.Normal(zeros, cfg.slab_scale))

            # Composition of doubles: c_2 and a sparse interaction effect iota per pair whose
            # slab scale tau is learned (pairs unseen in training draw iota from this prior).
            c2 = pair_effect = None
            if cfg.learn_composition:
                c2 = pyro.sample("c2", dist.LogNormal(zeros + cfg.composition_prior[0], cfg.composition_prior[1]))
            if cfg.pair_effects:
                pair_pi = pyro.sample("pair_pi", dist.Beta(zeros + cfg.pair_pi_prior[0], zeros + cfg.pair_pi_prior[1]))
                tau = pyro.sample("pair_scale", dist.LogNormal(zeros + cfg.pair_scale_prior[0],
                                                               cfg.pair_scale_prior[1]))
                if self.n_pairs:
                    with pyro.plate("pairs", self.n_pairs, dim=-2), pyro.plate("pair_latents", K, dim=-1):
                        pair_effect = pyro.sample("pair_effect", spike_slab_mixture(
                            pair_pi, cfg.spike_scale, tau, (self.n_pairs, K)))
            # Per-pair composition (model.pair_composition): log c_pair ~ N(log c_2, s_c^2), s_c
            # learned; pairs unseen in training draw their c from it at prediction.
            pair_log_c = None
            if self.per_pair_composition:
                spread = pyro.sample("c_spread", dist.LogNormal(zeros + cfg.composition_spread_prior[0],
                                                                cfg.composition_spread_prior[1]))
                if self.n_pairs:
                    with pyro.plate("pair_compositions", self.n_pairs, dim=-1):
                        pair_log_c = pyro.sample("pair_log_c", dist.Normal(c2.log(), spread))

            # model.library_model: each perturbation's effect lambda_p on the log library size (the
            # panel's total counts), composing in doubles like the latent shift
            library_effect = None
            if cfg.library_model:
                with pyro.plate("library_perts", P, dim=-2):
                    library_effect = pyro.sample("library_effect", dist.Normal(zeros, 0.5).expand([P, 1]))

            # Latent causal model: strictly lower-triangular W with a Laplace (shrinkage) prior.
            with pyro.plate("children", K, dim=-2), pyro.plate("parents", K, dim=-1):
                with poutine.mask(mask=self.tril_mask.bool()):
                    W = pyro.sample("W", dist.Laplace(zeros, cfg.w_prior_scale)) * self.tril_mask

            # Gene-level effects beta[p, g] ~ Laplace(0, b), b learned: what a perturbation does
            # to expression beyond its latent effects (gene-specific responses the shared decoder
            # does not reach); doubles add their singles' (times c_2) and a gene-level interaction
            # kappa[g] ~ Laplace(0, b_I) per pair (b_I learned from the training pairs; a pair
            # unseen in training draws kappa from it at prediction). (Per-gene scales b_g and b_I,g
            # measured worse on norman_effects: Pearson delta 0.513 vs 0.575, README.)
            # (model.gene_interactions: kappa only, beta = 0.)
            gene_effect = gene_pair_effect = None
            if cfg.gene_effects:
                b = pyro.sample("gene_scale", dist.LogNormal(zeros + cfg.gene_scale_prior[0], cfg.gene_scale_prior[1]))
                with pyro.plate("gene_perts", P, dim=-2), pyro.plate("effect_genes", G, dim=-1):
                    gene_effect = pyro.sample("gene_effect", dist.Laplace(zeros, b))
            if cfg.gene_pair_sites:
                b_pair = pyro.sample("gene_pair_scale", dist.LogNormal(zeros + cfg.gene_scale_prior[0],
                                                                       cfg.gene_scale_prior[1]))
                if self.n_pairs:
                    with pyro.plate("gene_pairs", self.n_pairs, dim=-2), pyro.plate("pair_genes", G, dim=-1):
                        gene_pair_effect = pyro.sample("gene_pair_effect", dist.Laplace(zeros, b_pair))

        genes = pyro.plate("genes", G, dim=-1)
        with genes:
            theta = pyro.sample("theta", dist.LogNormal(zeros + cfg.theta_prior[0], cfg.theta_prior[1]))

        batch = x.shape[0]
        with pyro.plate("cells", n_cells, subsample=torch.arange(batch, device=x.device), dim=-2):
            with poutine.scale(scale=kl_weight):
                z_inv = pyro.sample("z_inv", dist.Normal(zeros, 1.0).expand([D]).to_event(1)).squeeze(-2)
                eps = pyro.sample("eps", dist.Normal(zeros, 1.0).expand([K]).to_event(1)).squeeze(-2)
            c = self.composition(u, c2, pair_log_c, novel_pair_log_c)
            z_pert = propagate(eps + self.shift(u, delta, c, pair_effect, novel_pair_effect), W)
            gene_shift = 0.0
            if cfg.gene_interactions_held:  # at 0 until the trainer frees them
                on = self.gene_interactions_on
                gene_pair_effect = None if gene_pair_effect is None else on * gene_pair_effect
                novel_gene_pair_effect = None if novel_gene_pair_effect is None else on * novel_gene_pair_effect
            if gene_effect is not None or gene_pair_effect is not None or novel_gene_pair_effect is not None:
                beta = gene_effect if gene_effect is not None else x.new_zeros(P, G)
                gene_shift = self.shift(u, beta, c, gene_pair_effect, novel_gene_pair_effect)
            library_size = x.sum(-1)
            if library_effect is not None:
                lib_shift = self.shift(u, library_effect, c)  # (B, 1)
                if library == "observed":
                    pyro.sample("library", dist.Normal(self.library_center + lib_shift,
                                                       softplus(self.library_raw_scale) + 1e-3),
                                obs=library_size.log().unsqueeze(-1))
                elif library == "counterfactual":  # from control cells (shift 0) to condition u
                    library_size = library_size * lib_shift.squeeze(-1).exp()
            log_mu = self.gene_log_mean(z_inv, z_pert, library_size, gene_shift)
            with genes:
                counts = pyro.sample("x", self.likelihood(log_mu, theta), obs=x)

        if cfg.alpha > 0 and x_ctrl is not None:
            pyro.factor("alignment", -cfg.alpha * n_cells / batch * self.alignment_penalty(x, u, x_ctrl))
        return counts

    # ---- the guide ----------------------------------------------------------------------
    def guide(self, x, u, x_ctrl=None, kl_weight=1.0, temperature=0.5, *, n_cells: int):
        """Same arguments as :meth:`model`."""
        cfg = self.cfg
        P, K, G = self.n_perts, cfg.latent_pert, self.n_genes
        pyro.module("pvae", self)

        with poutine.scale(scale=self.global_prior_scale(kl_weight)):  # as in the model
            if cfg.effect_prior == "spike_slab":
                pyro.sample("pi", dist.Beta(*self.pi_concentrations()))
            with pyro.plate("perts", P, dim=-2), pyro.plate("pert_latents", K, dim=-1):
                slab_scale = _positive(self.slab_raw_scale)
                if cfg.gate_sites:
                    gate = pyro.sample("gate", StraightThroughBernoulli(self.gate_logits, temperature))
                    # q(s | gate): the fitted Normal when the gate is on, the prior when it is off,
                    # so an effect pays the slab's KL only when it is included (Occam's razor).
                    slab = pyro.sample("slab", dist.Normal(gate * self.slab_loc,
                                                           gate * slab_scale + (1 - gate) * cfg.slab_scale))
                    delta = gate * slab
                else:
                    delta = pyro.sample("slab", dist.Normal(self.slab_loc, slab_scale))
            c2 = pair_effect = None
            if cfg.learn_composition:
                c2 = pyro.sample("c2", dist.LogNormal(self.c2_loc, _positive(self.c2_raw_scale)))
            if cfg.pair_effects:
                pyro.sample("pair_pi", dist.Beta(*self.pair_pi_concentrations()))
                pyro.sample("pair_scale", dist.LogNormal(self.pair_scale_loc, _positive(self.pair_scale_raw_scale)))
                if self.n_pairs:
                    with pyro.plate("pairs", self.n_pairs, dim=-2), pyro.plate("pair_latents", K, dim=-1):
                        pair_effect = pyro.sample("pair_effect", dist.Normal(self.pair_loc,
                                                                             _positive(self.pair_raw_scale)))
            pair_log_c = None
            if self.per_pair_composition:
                pyro.sample("c_spread", dist.LogNormal(self.c_spread_loc, _positive(self.c_spread_raw_scale)))
                if self.n_pairs:
                    with pyro.plate("pair_compositions", self.n_pairs, dim=-1):
                        pair_log_c = pyro.sample("pair_log_c", dist.Normal(self.pair_log_c_loc,
                                                                           _positive(self.pair_log_c_raw_scale)))
            if cfg.library_model:
                with pyro.plate("library_perts", P, dim=-2):
                    pyro.sample("library_effect", dist.Normal(self.library_effect_loc,
                                                              _positive(self.library_effect_raw_scale)))
            with pyro.plate("children", K, dim=-2), pyro.plate("parents", K, dim=-1):
                with poutine.mask(mask=self.tril_mask.bool()):
                    W = pyro.sample("W", dist.Normal(self.w_loc, _positive(self.w_raw_scale))) * self.tril_mask
            if cfg.gene_effects:
                pyro.sample("gene_scale", dist.LogNormal(self.gene_scale_loc, _positive(self.gene_scale_raw_scale)))
                with pyro.plate("gene_perts", P, dim=-2), pyro.plate("effect_genes", G, dim=-1):
                    pyro.sample("gene_effect", dist.Normal(self.gene_effect_loc, _positive(self.gene_effect_raw_scale)))
            if cfg.gene_pair_sites:
                pyro.sample("gene_pair_scale", dist.LogNormal(self.gene_pair_scale_loc,
                                                              _positive(self.gene_pair_scale_raw_scale)))
                if self.n_pairs:
                    with pyro.plate("gene_pairs", self.n_pairs, dim=-2), pyro.plate("pair_genes", G, dim=-1):
                        pyro.sample("gene_pair_effect", dist.Normal(self.gene_pair_loc, _positive(self.gene_pair_raw_scale)))
        with pyro.plate("genes", G, dim=-1):
            pyro.sample("theta", dist.LogNormal(self.theta_loc, _positive(self.theta_raw_scale)))

        batch = x.shape[0]
        with pyro.plate("cells", n_cells, subsample=torch.arange(batch, device=x.device), dim=-2):
            with poutine.scale(scale=kl_weight):
                xn = lognormalize(x)
                inv_loc, inv_scale = self.inv_encoder(xn)
                if self.training and x_ctrl is not None and cfg.alpha > 0:
                    self.guide_inv_loc = (x, inv_loc)
                pyro.sample("z_inv", dist.Normal(inv_loc.unsqueeze(-2), inv_scale.unsqueeze(-2)).to_event(1))
                center = self.control_center(x_ctrl, u)
                shift = self.shift(u, delta, self.composition(u, c2, pair_log_c), pair_effect) \
                    if cfg.parameterisation == "centered" else 0.0
                eps_loc, eps_scale = self.eps_posterior(xn, u, W, shift, center)
                pyro.sample("eps", dist.Normal(eps_loc.unsqueeze(-2), eps_scale.unsqueeze(-2)).to_event(1))

    def global_prior_scale(self, kl_weight):
        """Weight of the effects', composition's and DAG's priors: ``kl_weight`` when their data
        term is the eps KL (centered), 1 when it is the likelihood (group, noncentered)."""
        return kl_weight if self.cfg.parameterisation == "centered" else 1.0

    def control_center(self, x_ctrl, u) -> torch.Tensor:
        """Mean encoder location h(x_c, 0) of the batch's paired control cells (training), or
        its running average (evaluation / prediction). Measuring z_pert from the control
        population pins its origin, so delta is the shift *from control* (without it, a common
        offset can sit in both the controls' eps and every delta)."""
        if x_ctrl is None or not self.training:
            return self.running_control_center
        h = self.pert_encoder(torch.cat([lognormalize(x_ctrl), torch.zeros_like(u)], -1))[0].mean(0)
        with torch.no_grad():
            self.running_control_center.mul_(0.95).add_(0.05 * h)
        return h

    def group_ids(self, u: torch.Tensor) -> torch.Tensor:
        """Per cell: p for a single of perturbation p, P + pair index for a training pair, -1
        otherwise (controls, pairs unseen in training, more targets)."""
        n = u.sum(-1)
        pid = self.pair_ids(u)
        return torch.where(n == 1, u.argmax(-1), torch.where(pid >= 0, self.n_perts + pid, -1))

    def group_reference(self, z_loc: torch.Tensor, u: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """(B, K) origin of each cell's z_pert deviation. ``parameterisation="group"``: the
        running mean encoder location of its training group (``group_centers``, updated from
        the batch in training), ``center`` for cells of no training group (controls, pairs
        unseen in training); otherwise ``center`` for every cell."""
        if self.cfg.parameterisation != "group":
            return center
        gid = self.group_ids(u)
        known = gid >= 0
        if self.training and known.any():
            with torch.no_grad():
                g = gid[known]
                sums = torch.zeros_like(self.group_centers).index_add_(0, g, z_loc[known].detach())
                counts = torch.bincount(g, minlength=self.group_centers.shape[0]).unsqueeze(-1)
                present = counts.squeeze(-1) > 0
                mean = sums[present] / counts[present]
                first = ~self.group_seen[present].unsqueeze(-1)
                self.group_centers[present] = torch.where(first, mean, 0.9 * self.group_centers[present] + 0.1 * mean)
                self.group_seen[present] = True
        return torch.where(known.unsqueeze(-1), self.group_centers[gid.clamp(min=0)], center)

    def eps_posterior(self, xn, u, W, shift, center):
        """loc, scale of q(eps | x, u) = N((I - W)(h(x, u) - center) - shift, s(x, u))."""
        z_loc, scale = self.pert_encoder(torch.cat([xn, u], dim=-1))
        center = self.group_reference(z_loc, u, center)
        scale = (scale.pow(2) @ self.eps_rotation.pow(2).T).sqrt()
        A = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - W
        return (z_loc - center) @ A.T - shift, scale

    # ---- posterior summaries -------------------------------------------------------------
    def pi_concentrations(self):
        return _positive(self.pi_raw[0], 1e-3), _positive(self.pi_raw[1], 1e-3)

    def hold_gene_interactions(self, hold: bool) -> None:
        """With ``model.gene_interactions``, hold the pairs' gene-level interactions at 0 (``hold``)
        or free them. The trainer frees them at the rotation (``train.interaction_steps=0``) or
        holds them through training and then fits them alone (``interaction_steps > 0``);
        freed from the start, the kappa of the training pairs took their whole departure from
        the singles and c_2 fell from 0.62 to 0.20 on ``norman_effects``."""
        self.gene_interactions_on.fill_(0.0 if hold else 1.0)

    def gene_interaction_parameters(self) -> list[nn.Parameter]:
        """The variational parameters of kappa and b_I (:data:`GENE_INTERACTION_PARAMS`)."""
        return [p for n, p in self.named_parameters() if n in GENE_INTERACTION_PARAMS]

    def pair_pi_concentrations(self):
        return _positive(self.pair_pi_raw[0], 1e-3), _positive(self.pair_pi_raw[1], 1e-3)

    def composition_mean(self) -> float:
        """Posterior mean of c_2 (1 when composition is not learned)."""
        if not self.cfg.learn_composition:
            return 1.0
        return float((self.c2_loc + _positive(self.c2_raw_scale) ** 2 / 2).exp().detach())

    def pi_mean(self) -> torch.Tensor:
        a, b = self.pi_concentrations()
        return a / (a + b)

    def pip(self, n_draws: int = 256) -> torch.Tensor:
        """Posterior inclusion probabilities PIP[p, k] (ones for the dense prior).

        straight-through: q(gate = 1); marginal: E_q(delta)[p(gate = 1 | delta, E[pi])], a
        Monte-Carlo average over a fixed set of standard-normal draws (deterministic)."""
        cfg = self.cfg
        if cfg.effect_prior == "dense":
            return torch.ones_like(self.slab_loc)
        if cfg.gate_inference == "straight_through":
            return torch.sigmoid(self.gate_logits)
        noise = torch.randn((n_draws, 1, 1), generator=torch.Generator().manual_seed(0)).to(self.slab_loc)
        delta = self.slab_loc + _positive(self.slab_raw_scale) * noise
        return inclusion_probability(delta, self.pi_mean(), cfg.spike_scale, cfg.slab_scale).mean(0)

    def effect_mean(self) -> torch.Tensor:
        """Posterior mean of delta (straight-through: PIP * E[slab])."""
        return self.pip() * self.slab_loc if self.cfg.gate_sites else self.slab_loc

    def w_mean(self) -> torch.Tensor:
        return self.w_loc * self.tril_mask

    def global_means(self) -> dict[str, torch.Tensor]:
        """Posterior means of the global sites, in the form of one draw of :func:`sample_globals`."""
        out = {"slab": self.slab_loc, "W": self.w_mean(), "theta": (self.theta_loc + _positive(
            self.theta_raw_scale) ** 2 / 2).exp()}
        if self.cfg.effect_prior == "spike_slab":
            out["pi"] = self.pi_mean()
        if self.cfg.gate_sites:
            out["gate"] = self.pip()
        if self.cfg.learn_composition:
            out["c2"] = torch.tensor(self.composition_mean())
        if self.cfg.pair_effects:
            a, b = self.pair_pi_concentrations()
            out.update(pair_pi=a / (a + b), pair_scale=self.pair_scale_loc.exp(), pair_effect=self.pair_loc)
        if self.per_pair_composition:
            out.update(c_spread=self.c_spread_loc.exp(), pair_log_c=self.pair_log_c_loc)
        if self.cfg.gene_effects:
            out.update(gene_scale=self.gene_scale_loc.exp(), gene_effect=self.gene_effect_loc)
        if self.cfg.gene_pair_sites:
            out.update(gene_pair_scale=self.gene_pair_scale_loc.exp(), gene_pair_effect=self.gene_pair_loc)
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor, u: torch.Tensor, refine_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means of z_inv and of z_pert: the encoder location from the control centre
        (group: from the cell's group centre), plus (group, noncentered) the cell's shift
        ``(I - W)^{-1} shift(u)`` at the posterior means. Call in eval mode (training mode
        would move the group centres). ``refine_steps > 0``: the means of each cell's refined
        posterior (:meth:`refine_local_posteriors`), ``z_pert = (I - W)^{-1}(e + shift(u))``."""
        g = self.global_means()
        shift = self.shift(u, self.effect_mean(), self.composition(u, g.get("c2"), g.get("pair_log_c")),
                           g.get("pair_effect"))
        if refine_steps > 0:
            m, _, e, _ = self.refine_local_posteriors(x, u, refine_steps)
            return m, propagate(e + shift, g["W"])
        xn = lognormalize(x)
        z_loc = self.pert_encoder(torch.cat([xn, u], -1))[0]
        z_pert = z_loc - self.group_reference(z_loc, u, self.running_control_center)
        if self.cfg.parameterisation != "centered":
            z_pert = z_pert + propagate(shift, g["W"])
        return self.inv_encoder(xn)[0], z_pert

    def refine_local_posteriors(self, x: torch.Tensor, u: torch.Tensor, steps: int = 300, lr: float = 0.05,
                                seed: int = 0) -> tuple[torch.Tensor, ...]:
        r"""Semi-amortised inference: each cell's ``q(z_inv) = N(m, s)`` and ``q(eps) = N(e, s')``,
        started at the encoders' outputs, moved towards a maximum of that cell's own ELBO with the
        globals at their posterior means,

        .. math::

            \mathbb E_q[\log p(x \mid z_{inv}, (I - W)^{-1}(\varepsilon + c\,u\,\delta))]
            - \mathrm{KL}(q(z_{inv}) \| \mathcal N(0, I)) - \mathrm{KL}(q(\varepsilon) \| \mathcal N(0, I)),

        by ``steps`` Adam steps on ``(m, log s, e, log s')`` (one reparameterised draw per step,
        learning rate decaying linearly to 0). The encoders are one network for all cells, trained
        beside the alignment penalty, so their outputs are not each cell's optimum (the
        amortisation gap); the refined posterior is the model's, without the alignment. The
        likelihood is :meth:`model`'s own (every option), run with the globals and the cell's draws
        conditioned. Returns ``(m, s, e, s')``, each (cells, dim)."""
        glob = {k: v for k, v in self.global_means().items() if k in GLOBAL_SITES}
        n = x.shape[0]
        with torch.no_grad():
            q = poutine.trace(poutine.condition(self.guide, data=glob)).get_trace(x, u, n_cells=n).nodes
            start = [(q[k]["fn"].base_dist.loc.squeeze(-2), q[k]["fn"].base_dist.scale.squeeze(-2)) for k in LOCAL_SITES]
        params = [t.detach().clone().requires_grad_(True) for loc, scale in start for t in (loc, scale.log())]
        opt = torch.optim.Adam(params, lr=lr)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
        gen = torch.Generator(device=x.device).manual_seed(seed)
        standard = dist.Normal(torch.zeros((), device=x.device), 1.0)

        with torch.enable_grad():
            for _ in range(steps):
                draws = {name: (loc + log_scale.exp() * torch.randn(loc.shape, generator=gen, device=x.device,
                                                                  dtype=loc.dtype)).unsqueeze(-2)
                         for name, loc, log_scale in zip(LOCAL_SITES, params[0::2], params[1::2])}
                run = poutine.trace(poutine.condition(self.model, data={**glob, **draws})).get_trace(x, u, n_cells=n)
                loss = -run.nodes["x"]["fn"].log_prob(x).sum() + sum(
                    kl_divergence(dist.Normal(loc, log_scale.exp()), standard).sum()
                    for loc, log_scale in zip(params[0::2], params[1::2]))
                grads = torch.autograd.grad(loss, params)  # the module's own parameters stay untouched
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                decay.step()
        m, log_s, e, log_s_eps = (p.detach() for p in params)
        return m, log_s.exp(), e, log_s_eps.exp()

    # ---- re-expression in another z_pert basis -------------------------------------------
    @torch.no_grad()
    def rotate_latents(self, O: torch.Tensor) -> torch.Tensor:
        r"""Re-express the module exactly in the z_pert basis ``z' = M z``, ``M = O (I - W)``
        (``O`` orthogonal, ``W`` the posterior mean DAG), with ``W' = 0``.

        Then ``z' = O (eps + shift)``: ``eps' = O eps`` is still N(0, I), ``delta'_p = O
        delta_p``, and the DAG folds into the decoder. Rewritten: decoder input columns
        ``F[:, D:] <- F[:, D:] M^{-1}``; encoder location rows ``h <- M h`` and the control
        centre; effects ``delta <- delta O^T`` with their mean-field sds the square roots of
        the diagonal of the rotated covariance; q(W) collapsed onto 0 (its sd set to the
        floor, 1e-4); q(eps) scales those of ``O eps`` (:attr:`eps_rotation`, diagonal of
        the rotated covariance). Posterior means of latents, effects and decoded expression
        are unchanged up to the rotation. Returns ``M``."""
        K, D = self.cfg.latent_pert, self.cfg.latent_inv
        W = self.w_mean()
        M = O @ (torch.eye(K, dtype=W.dtype, device=W.device) - W)
        first = self.decoder.first_layer
        first.weight[:, D:] = first.weight[:, D:] @ torch.linalg.inv(M)
        if self.decoder.loglinear is not None:
            self.decoder.loglinear.weight.copy_(self.decoder.loglinear.weight @ torch.linalg.inv(M))
        last = self.pert_encoder.net[-1]
        last.weight[:K] = M @ last.weight[:K]
        last.bias[:K] = M @ last.bias[:K]
        self.running_control_center.copy_(M @ self.running_control_center)
        self.group_centers.copy_(self.group_centers @ M.T)
        for loc, raw_scale in ((self.slab_loc, self.slab_raw_scale), (self.pair_loc, self.pair_raw_scale)):
            sd = _positive(raw_scale)
            loc.copy_(loc @ O.T)
            raw_scale.copy_(_inverse_positive(((sd ** 2) @ (O ** 2).T).sqrt()))
        self.w_loc.zero_()
        self.w_raw_scale.fill_(-30.0)  # softplus(-30) ~ 1e-13: sd = the 1e-4 floor
        self.eps_rotation.copy_(O @ self.eps_rotation)
        return M

    @property
    def rotatable(self) -> bool:
        """``model.sparse_rotation`` is on and the basis is free (not straight-through gates,
        whose fitted gates fix it)."""
        return self.cfg.sparse_rotation and not self.cfg.gate_sites

    @torch.no_grad()
    def rotate_to_sparse_effects(self, n_restarts: int = 16, seed: int = 0) -> tuple[torch.Tensor, float, float]:
        """:meth:`rotate_latents` by the :func:`sparse_rotation` of the effect means; returns
        ``M`` and sum |delta| before and after."""
        l1_before = float(self.slab_loc.abs().sum())
        M = self.rotate_latents(sparse_rotation(self.slab_loc, n_restarts=n_restarts, seed=seed))
        return M, l1_before, float(self.slab_loc.abs().sum())

    # ---- prediction: the model run forward -------------------------------------------------
    @torch.no_grad()
    def sample_cells(self, x_start: torch.Tensor, u: torch.Tensor, global_draw: dict[str, torch.Tensor],
                     local_latents: str = "counterfactual", novel_pairs: str = "draw",
                     u_start: torch.Tensor | None = None) -> torch.Tensor:
        """Counts drawn from :meth:`model` with its observation released, given one draw of the
        global sites. The cells keep the library sizes of ``x_start`` (with ``model.library_model``
        a counterfactual cell's library moves by its condition's library effects: :meth:`model`).

        ``local_latents``: ``"counterfactual"`` (prediction): z_inv and eps of the cells
        ``x_start`` encoded as they are observed, under their own labels ``u_start`` (None:
        control cells), then moved to condition ``u`` (with ``model.library_model`` their
        library first moves back by their own condition's library effects); ``"posterior"`` (posterior-predictive
        check): z_inv and eps from q(. | x_start, u); ``"prior"``: from N(0, I). Cells of a
        pair unseen in training get one interaction draw per pair from its fitted prior
        (``novel_pairs="draw"``) or its mean, zero (``"mean"``).

        Counterfactual ``u`` may hold ``k`` blocks of labels for the same cells (``k * len(x_start)``
        rows): every block then starts from the same draw of the cells' local latents (common random
        numbers for the changes between conditions)."""
        n_start = x_start.shape[0]
        k = u.shape[0] // n_start
        if u.shape[0] != k * n_start or (k > 1 and local_latents != "counterfactual"):
            raise ValueError(f"sample_cells: {u.shape[0]} label rows for {n_start} cells (counterfactual "
                             "prediction takes a whole number of blocks of labels, other modes one)")
        glob = {k_: v for k_, v in global_draw.items() if k_ in GLOBAL_SITES}
        locals_ = {}
        if local_latents != "prior":
            if local_latents == "counterfactual":
                u_guide = torch.zeros_like(u[:n_start]) if u_start is None else u_start
            else:
                u_guide = u
            trace = poutine.trace(poutine.condition(self.guide, data=glob)).get_trace(x_start, u_guide, n_cells=n_start)
            locals_ = {name: torch.cat([trace.nodes[name]["value"]] * k) for name in LOCAL_SITES}
        model = poutine.condition(poutine.uncondition(self.model), data={**glob, **locals_})
        novel = self.novel_pair_effects(u, glob) if novel_pairs == "draw" else {}
        library = "counterfactual" if local_latents == "counterfactual" else "keep"
        if library == "counterfactual" and u_start is not None and "library_effect" in glob:
            # from the start cells' own conditions back to control depth (only the totals of x are used)
            c = self.composition(u_start, glob.get("c2"), glob.get("pair_log_c"))
            x_start = x_start * torch.exp(-self.shift(u_start, glob["library_effect"], c))
        return model(x_start.repeat(k, 1), u, **novel, n_cells=u.shape[0], library=library)

    def novel_pair_effects(self, u: torch.Tensor, global_draw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Interactions of cells whose pair was not in training, one draw per such pair from the
        fitted priors: ``novel_pair_effect`` (B, K) from (1 - pi_I) N(0, spike^2) + pi_I N(0,
        tau^2), with gene effects ``novel_gene_pair_effect`` (B, G) from Laplace(0, b_I), with
        per-pair composition ``novel_pair_log_c`` (B, 1) from N(log c_2, s_c^2);
        empty without pair effects or novel pairs."""
        novel = self.pair_ids(u) == -1 if self.cfg.pair_effects else None
        if novel is None or not novel.any():
            return {}
        priors = {"novel_pair_effect": spike_slab_mixture(global_draw["pair_pi"], self.cfg.spike_scale,
                                                          global_draw["pair_scale"], (self.cfg.latent_pert,))}
        if self.cfg.gene_pair_sites:
            priors["novel_gene_pair_effect"] = dist.Laplace(torch.zeros(self.n_genes, device=u.device),
                                                            global_draw["gene_pair_scale"])
        if self.per_pair_composition:
            priors["novel_pair_log_c"] = dist.Normal(global_draw["c2"].log().reshape(1), global_draw["c_spread"])
        i, j = u.topk(2, dim=-1).indices.sort(-1).values.unbind(-1)
        key = i * self.n_perts + j
        out = {}
        for name, prior in priors.items():
            out[name] = u.new_zeros(u.shape[0], prior.batch_shape[-1])
            for k in key[novel].unique():
                out[name][novel & (key == k)] = prior.sample()
        return out

@torch.no_grad()
def sample_globals(module: PerturbedVAEModule, n_draws: int) -> dict[str, torch.Tensor]:
    """``n_draws`` joint draws of the global sites from the guide (``pi, gate, slab, W,
    theta``, those the model has), each with a leading draw axis, plus ``delta``, the
    effects. With the gate summed out (``gate_inference='marginal'``) ``slab`` is the effect
    and gates are drawn from ``p(gate | delta, pi)``. The only place global draws are made:
    prediction, effects, posterior-predictive checks and the ArviZ export use it."""
    cfg = module.cfg
    dev = module.slab_loc.device
    x = torch.ones(1, module.n_genes, device=dev)
    u = torch.zeros(1, module.n_perts, device=dev)
    hidden = poutine.block(module.guide, hide=list(LOCAL_SITES))
    draws: dict[str, list] = {}
    for _ in range(n_draws):
        trace = poutine.trace(hidden).get_trace(x, u, n_cells=1)
        for name in GLOBAL_SITES:
            if name in trace.nodes:
                draws.setdefault(name, []).append(trace.nodes[name]["value"].detach())
    out = {k: torch.stack(v) for k, v in draws.items()}
    if "gate" in out:  # straight-through gates: delta = gate * slab
        return {**out, "delta": out["gate"] * out["slab"]}
    if cfg.effect_prior == "spike_slab":  # gate summed out: draw it from p(gate | delta, pi)
        prob = inclusion_probability(out["slab"], out["pi"].reshape(-1, 1, 1), cfg.spike_scale, cfg.slab_scale)
        out["gate"] = torch.bernoulli(prob)
    return {**out, "delta": out["slab"]}
