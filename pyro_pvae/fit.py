"""``python -m pyro_pvae.fit --config NAME [key=value ...]``: fit PerturbedVAE, write a run directory.

The run directory holds the resolved config (``config.yaml``), the split (``split.json``),
the checkpoint, ``metrics.csv`` and ``training_curves.png``, the fitted model
(``model.pt``, load with ``pyro_pvae.load_run``), ``effects.csv`` (posterior of the
perturbation effects with PIPs and local false sign rates) and, with ``model.library_model``, ``library_effects.csv`` (each
perturbation's effect on the log library size). While the fit runs, ``.lock`` in the directory names the
process holding it; a second fit refuses to share the directory, and a fit that fails keeps
only what ``train.resume=true`` needs (``pyro_pvae/rundir.py``).
"""
from __future__ import annotations

import json
import sys
import time

from omegaconf import OmegaConf

PROG = "pyro_pvae.fit"


def run(name: str, overrides: list[str]):
    from .api import PerturbedVAE
    from .config import compose, load_dataset, resolve_split
    from .rundir import claim_run_dir
    from .utils import atomic_write, atomic_write_text

    cfg = compose(name, overrides)
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    # claimed only once the data and split are known to load; a failure inside the block
    # removes what the run wrote, except a checkpoint to resume from (pyro_pvae/rundir.py)
    with claim_run_dir(cfg, "fit") as run_dir_claim:
        run_dir = run_dir_claim.path
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        t0 = time.perf_counter()
        vae = PerturbedVAE(adata, split=split, model=OmegaConf.to_container(cfg.model, resolve=True),
                           train=OmegaConf.to_container(cfg.train, resolve=True))
        vae.fit(run_dir=run_dir)
        seconds = time.perf_counter() - t0
        effects = vae.effects()
        atomic_write(run_dir / "effects.csv", lambda tmp: effects.to_csv(tmp, index=False))
        library = vae.library_effects() if vae.model_config.library_model else None
        if library is not None:
            atomic_write(run_dir / "library_effects.csv", lambda tmp: library.to_csv(tmp, index=False))
        spread = vae.invariant_spread()
        n_pip, n_lfsr = int((effects.pip > 0.5).sum()), int((effects.lfsr < 0.05).sum())
        summary = {"cells": adata.n_obs, "genes": adata.n_vars, "perturbations": len(vae.vocabulary),
                   "epochs": len(vae.history), "seconds": round(seconds, 1),
                   "final_val_loss": vae.history[-1]["val_loss"] if vae.history else None,
                   "effects_pip_above_0.5": n_pip, "effects_lfsr_below_0.05": n_lfsr, "invariant_spread": spread,
                   "composition_c2": vae.module.composition_mean(),
                   "genes_without_counts": len(vae.genes_without_counts), "split_notes": vae.split.notes}
        atomic_write_text(run_dir / "fit_summary.json", json.dumps(summary, indent=1, default=float))
    last = vae.history[-1] if vae.history else {}
    print(f"\nfitted PerturbedVAE on {adata.n_obs} cells x {adata.n_vars} genes "
          f"({len(vae.vocabulary)} perturbations) in {seconds:.0f} s, {len(vae.history)} epochs; "
          f"final validation -ELBO/cell {last.get('val_loss', float('nan')):.2f}")
    print(f"{n_pip} of {len(effects)} perturbation-latent effects have PIP > 0.5; "
          f"{n_lfsr} have a local false sign rate below 0.05 (lfsr in effects.csv)")
    if vae.model_config.effect_prior == "spike_slab" and n_pip > 0.9 * len(effects):
        print("  (nearly all PIPs: the effects' estimation noise is wider than the spike, "
              f"model.spike_scale={vae.model_config.spike_scale}, so the PIPs do not separate effects from "
              "noise here; rank effects by their lfsr, or refit with a spike about "
              "1/sqrt(cells per perturbation) wide; README, Signal imbalance)")
    print(f"invariant latents: mean across-cell sd of the z_inv posterior means {spread:.3f} "
          "(near 0: collapsed, carrying no cell state)")
    if library is not None:
        top = ", ".join(f"{r.perturbation} x{r.fold_change:.2f}" for r in library.head(3).itertuples())
        print(f"library size: the perturbations that change the total counts most (library_effects.csv): {top}")
    print(f"outputs in {run_dir}/ : {' '.join(run_dir_claim.files())}")
    print(f"load with: pyro_pvae.load_run('{run_dir}')")
    return vae, run_dir


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from .config import cli_main

    return cli_main(run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
