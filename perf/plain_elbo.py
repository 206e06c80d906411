"""Plain-PyTorch yardstick: the SAME ELBO as ``TraceMeanField_ELBO`` on
``PerturbedVAEModule.model`` / ``PerturbedVAEModule.guide``, written by hand (for the model
without the composition extras: ``learn_composition=False``, ``pair_effects=False``, a
nonlinear or linear decoder, see :func:`check_supported`).

Used only as a reference for speed (``perf/throughput.py`` reports the Pyro/plain
ratio) and checked for correctness in ``tests/test_plain_elbo.py``: for the same parameters
and the same random draws (same seed, draws taken in the guide's order) the value and the
gradients agree with Pyro's to float tolerance.

What it mirrors, site by site (``s = n_cells / B`` is the subsample scale, ``w`` the KL weight):

* globals, drawn in the guide's order: ``pi`` (Beta), then either ``slab`` (Normal; the
  default marginal spike-and-slab, Monte-Carlo KL to the mixture prior) or ``gate``
  (straight-through Gumbel sigmoid, one ``torch.rand``) and ``slab`` (Normal, the prior when
  the gate is off), then ``W``
  (Normal, masked to the strict lower triangle), ``theta`` (LogNormal); each enters with its
  analytic KL (Beta-Beta, Bernoulli-Bernoulli, Normal-Normal, Normal-Laplace masked,
  LogNormal-LogNormal), unscaled;
* locals: ``z_inv`` and ``eps`` with analytic KL to N(0, I), scaled by ``w * s``;
* likelihood: NB(total_count=theta, logits=log mu - log theta) summed, scaled by ``s``;
* alignment factor ``-alpha * penalty`` (group-mean or pairwise, as the model), scaled by ``s``;
* the guide's eps location is measured from the paired controls' mean encoder location (with
  ``parameterisation="group"`` from the running centre of the cell's training group), and
  (``"centered"``) minus the shift.

``loss = -ELBO``, one particle. ``dedupe=True`` reuses the guide's ``m(x)`` in the alignment
factor instead of running the invariant encoder on ``x`` a second time (same value and
gradient; shows what removing the duplicate costs/saves).

``amp(module, dtype)`` runs the three MLPs under ``torch.autocast`` (bf16) and hands
back float32 outputs, so the distributions, KLs and the NB log-likelihood stay in float32.
It patches the modules, so Pyro's ELBO and this one both see it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributions as td
from torch.nn.functional import log_softmax, softplus


def _lognorm(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(x / x.sum(-1, keepdim=True).clamp(min=1.0) * 1e4)


def check_supported(cfg) -> None:
    """The yardstick covers the model without the composition extras (c2 site, pair effects,
    hybrid decoder): speed comparisons use that configuration for both."""
    if cfg.learn_composition or cfg.pair_effects or cfg.decoder == "hybrid":
        raise ValueError("plain_loss needs learn_composition=False, pair_effects=False and a nonlinear or "
                         "linear decoder")


def plain_loss(module, x, u, x_ctrl=None, kl_weight=1.0, temperature=0.5, *, n_cells: int,
               dedupe: bool = False, return_parts: bool = False):
    """-ELBO of one batch (a scalar tensor with a graph), like TraceMeanField_ELBO's loss."""
    cfg = module.cfg
    check_supported(cfg)
    model = g = module
    P, K, D, G = module.n_perts, cfg.latent_pert, cfg.latent_inv, module.n_genes
    B = x.shape[0]
    s = n_cells / B
    dev, dt = x.device, x.dtype
    zero = x.new_zeros(())

    # ---------------- global sites (guide order: pi, gate, slab, W, theta) --------------
    kl_global = zero
    if cfg.effect_prior == "spike_slab":
        q_pi = td.Beta(softplus(g.pi_raw[0]) + 1e-3, softplus(g.pi_raw[1]) + 1e-3)
        pi = q_pi.rsample()
        kl_global = kl_global + td.kl_divergence(q_pi, td.Beta(zero + cfg.pi_prior[0], zero + cfg.pi_prior[1]))
    slab_scale = softplus(g.slab_raw_scale) + 1e-4
    if cfg.effect_prior == "spike_slab" and cfg.gate_inference == "straight_through":
        # straight-through Bernoulli: hard 0/1 forward, Gumbel-sigmoid gradient
        logits = g.gate_logits
        noise = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + noise.log() - (-noise).log1p()) / temperature)
        gate = (soft > 0.5).to(soft.dtype) + (soft - soft.detach())
        kl_global = kl_global + td.kl_divergence(td.Bernoulli(logits=logits),
                                                 td.Bernoulli(probs=pi.expand(P, K))).sum()
        q_s = td.Normal(gate * g.slab_loc, gate * slab_scale + (1 - gate) * cfg.slab_scale)
        slab = q_s.rsample()
        kl_global = kl_global + td.kl_divergence(q_s, td.Normal(zero.expand(P, K), cfg.slab_scale)).sum()
        delta = gate * slab
    elif cfg.effect_prior == "spike_slab":
        # gate summed out: Monte-Carlo KL to the spike/slab mixture, log q - log p at the draw
        q_s = td.Normal(g.slab_loc, slab_scale)
        delta = q_s.rsample()
        mix = td.MixtureSameFamily(td.Categorical(probs=torch.stack([1 - pi, pi]).expand(P, K, 2)),
                                   td.Normal(zero.expand(P, K, 2), torch.tensor([cfg.spike_scale, cfg.slab_scale],
                                                                                dtype=dt, device=dev)))
        kl_global = kl_global + (q_s.log_prob(delta) - mix.log_prob(delta)).sum()
    else:
        q_s = td.Normal(g.slab_loc, slab_scale)
        delta = q_s.rsample()
        kl_global = kl_global + td.kl_divergence(q_s, td.Normal(zero.expand(P, K), cfg.dense_scale)).sum()
    mask = g.tril_mask
    q_w = td.Normal(g.w_loc, softplus(g.w_raw_scale) + 1e-4)
    W = q_w.rsample() * mask
    kl_w = td.kl_divergence(q_w, td.Laplace(zero.expand(K, K), cfg.w_prior_scale))
    kl_global = kl_global + torch.where(mask.bool(), kl_w, zero).sum()
    q_t = td.LogNormal(g.theta_loc, softplus(g.theta_raw_scale) + 1e-4)
    theta = q_t.rsample()
    kl_effects = kl_global
    kl_theta = td.kl_divergence(
        q_t, td.LogNormal(zero.expand(G) + cfg.theta_prior[0], cfg.theta_prior[1])).sum()

    # ---------------- local sites -------------------------------------------------------
    xn = _lognorm(x)
    inv_loc, inv_scale = g.inv_encoder(xn)
    q_z = td.Normal(inv_loc, inv_scale)
    z_inv = q_z.rsample()
    shift = u @ delta
    A = torch.eye(K, dtype=dt, device=dev) - W
    z_loc, e_scale = g.pert_encoder(torch.cat([xn, u], dim=-1))
    if g.training and x_ctrl is not None:  # z_pert measured from the paired controls' mean location
        center = g.pert_encoder(torch.cat([_lognorm(x_ctrl), torch.zeros_like(u)], -1))[0].mean(0)
    else:
        center = g.running_control_center
    e_scale = (e_scale.pow(2) @ g.eps_rotation.pow(2).T).sqrt()
    center = g.group_reference(z_loc, u, center)  # the running centre of a cell's training group (group)
    centered = cfg.parameterisation == "centered"
    q_e = td.Normal((z_loc - center) @ A.T - (shift if centered else 0.0), e_scale)
    eps = q_e.rsample()
    kl_local = (td.kl_divergence(q_z, td.Normal(zero, 1.0)).sum()
                + td.kl_divergence(q_e, td.Normal(zero, 1.0)).sum())

    z_pert = torch.linalg.solve_triangular(A, (eps + shift).unsqueeze(-1), upper=False).squeeze(-1)
    log_mu = x.sum(-1).log().unsqueeze(-1) + log_softmax(model.decoder(z_inv, z_pert), -1)
    if cfg.likelihood == "poisson":
        recon = td.Poisson(log_mu.exp()).log_prob(x).sum()
    else:
        recon = td.NegativeBinomial(total_count=theta, logits=log_mu - theta.log()).log_prob(x).sum()

    align = zero
    if cfg.alpha > 0 and x_ctrl is not None:
        enc = g.inv_encoder
        m = inv_loc if dedupe else enc(_lognorm(x))[0]
        m_ctrl = enc(_lognorm(x_ctrl))[0]
        if cfg.alignment == "pairwise":
            perturbed = (u.sum(-1) > 0).to(dt)
            penalty = (perturbed * (m - m_ctrl).pow(2).sum(-1)).sum()
        else:  # group_mean, unbiased: groups with >= 2 cells, each group's own spread subtracted
            penalty = zero
            for p in range(P):
                rows = u[:, p] > 0
                n_p = int(rows.sum())
                if n_p < 2:
                    continue
                m_p = m[rows]
                d2 = (m_p.mean(0) - m_ctrl.mean(0)).pow(2).sum()
                bias = m_p.var(0).sum() / n_p + m_ctrl.var(0).sum() / m_ctrl.shape[0]
                penalty = penalty + n_p * (d2 - bias)
        align = -cfg.alpha * penalty

    # the effect and DAG sites: full weight (noncentered, their data term is the likelihood) or
    # the local latents' kl_weight (centered, their data term is the eps KL); theta: full weight
    w_effects = kl_weight if centered else 1.0
    elbo = s * (recon + align) - kl_weight * s * kl_local - w_effects * kl_effects - kl_theta
    if return_parts:
        return -elbo, {"recon": s * recon, "align": s * align, "kl_local": kl_weight * s * kl_local,
                       "kl_global": w_effects * kl_effects + kl_theta}
    return -elbo


# ---------------------------------------------------------------------------------------
# bf16 autocast of the networks (both this ELBO and Pyro's see it: the modules are patched)
# ---------------------------------------------------------------------------------------

def _networks(module):
    return [module.inv_encoder.net, module.pert_encoder.net, module.decoder.net]


@contextlib.contextmanager
def amp(module, dtype=torch.bfloat16, enabled: bool = True):
    """Within the block, the encoders' and decoder's MLPs run under ``torch.autocast(dtype)``
    and return float32."""
    if not enabled or dtype is None:
        yield
        return
    nets = _networks(module)
    originals = [n.forward for n in nets]

    def wrap(fwd, device_type):
        def forward(h):
            with torch.autocast(device_type=device_type, dtype=dtype):
                out = fwd(h)
            return out.float()
        return forward

    try:
        for n, f in zip(nets, originals):
            dev = next(n.parameters()).device.type
            n.forward = wrap(f, dev)
        yield
    finally:
        for n in nets:
            if "forward" in n.__dict__:
                del n.forward


# ---------------------------------------------------------------------------------------
# counts of the floor
# ---------------------------------------------------------------------------------------

def flops_per_cell(module) -> dict:
    """Matrix FLOPs per cell of one training step (forward + backward) of the networks.

    Linear n_in -> n_out costs 2*n_in*n_out forward, 2x that backward (input and weight
    gradients) except for the first layer of an encoder (its input needs no gradient: 1x).
    Encoders: invariant on x (guide), again on x and on x_ctrl (alignment; only the loc half
    is used but the layer is computed whole), perturbation encoder on [x, u]; decoder.
    """
    cfg = module.cfg
    G, P, H, D, K, L = module.n_genes, module.n_perts, cfg.hidden, cfg.latent_inv, cfg.latent_pert, cfg.n_layers

    def mlp(n_in, n_out, first_needs_grad):
        dims = [n_in] + [H] * max(L, 1) + [n_out]
        f, b = 0, 0
        for i, (a, c) in enumerate(zip(dims[:-1], dims[1:])):
            f += 2 * a * c
            b += (4 if (i > 0 or first_needs_grad) else 2) * a * c
        return f, b

    parts = {
        "inv_enc": mlp(G, 2 * D, False),
        "inv_enc_align_x": mlp(G, 2 * D, False) if cfg.alpha > 0 else (0, 0),
        "inv_enc_align_ctrl": mlp(G, 2 * D, False) if cfg.alpha > 0 else (0, 0),
        "pert_enc": mlp(G + P, 2 * K, False),
    }
    if cfg.decoder == "linear":
        parts["decoder"] = (2 * (D + K) * G, 4 * (D + K) * G)
    else:
        dims = [D + K] + [H] * L + [G]
        f = sum(2 * a * c for a, c in zip(dims[:-1], dims[1:]))
        parts["decoder"] = (f, 2 * f)
    fwd = sum(p[0] for p in parts.values())
    bwd = sum(p[1] for p in parts.values())
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd,
            "parts": {k: v[0] + v[1] for k, v in parts.items()}}


def bytes_per_cell(module, nnz_per_cell: float, dense_passes: int = 0) -> dict:
    """Lower bound of device-memory bytes per cell: the sparse rows of x and x_ctrl read once
    (float32 value + int32 column), the dense (B, G) float32 inputs written and read back by
    the first layers, and the decoder's (B, G) output written and read once each forward
    and backward (logits, their gradient). ``dense_passes`` adds more full (B, G) float32
    passes (the unfused elementwise chain of log_softmax + NB log-prob and their backward)."""
    G = module.n_genes
    sparse = 2 * nnz_per_cell * 8
    dense_in = 2 * 2 * G * 4            # x and x_ctrl densified: written once, read once
    dec_out = 4 * G * 4                  # logits written + read, grad written + read
    minimal = sparse + dense_in + dec_out
    return {"minimal": minimal, "with_passes": minimal + dense_passes * G * 4}
