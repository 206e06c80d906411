"""One PerturbedVAE on the shipped Norman cells, for the analysis scripts (param_check,
quick_real_check, signal_imbalance)."""
from __future__ import annotations

import time


def fit_norman(overrides, fit: bool = True):
    """``--config norman`` with the overrides (progress bar off): returns (adata, split, model,
    seconds of the fit); ``fit=False`` returns the model unfitted (0 seconds)."""
    from omegaconf import OmegaConf

    from pyro_pvae.api import PerturbedVAE
    from pyro_pvae.config import compose, load_dataset, resolve_split

    cfg = compose("norman", list(overrides) + ["train.progress=false"])
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    vae = PerturbedVAE(adata, split=split, model=OmegaConf.to_container(cfg.model),
                       train=OmegaConf.to_container(cfg.train))
    t0 = time.perf_counter()
    if fit:
        vae.fit()
    return adata, split, vae, time.perf_counter() - t0 if fit else 0.0
