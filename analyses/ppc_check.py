"""Posterior-predictive check of a tiny-simulation fit, for comparing settings.

    python analyses/ppc_check.py train.epochs=60 model.alpha=20
    python analyses/ppc_check.py train.epochs=60 model.alpha=2

Fits ``--config tiny`` (lr 0.01, one thread, overrides from the command line) into a temporary
run directory, runs :func:`pyro_pvae.ppc.ppc` (60 draws, 1,000 training cells) and prints the
gene-mean statistics (median p-value, 50%/90% coverage), which checks pass, the aggregate zero
fraction, the spread of the invariant latents and c2. (The alignment-weight comparison quoted in
``pyro_pvae/config.py`` comes from these two commands.)
"""
import json
import sys
import tempfile

import torch


def main(overrides):
    from pyro_pvae import ppc as P
    from pyro_pvae.fit import run

    torch.set_num_threads(1)
    run_dir = f"{tempfile.mkdtemp()}/run"
    vae, _ = run("tiny", ["train.lr=0.01", "train.progress=false", "train.device=cpu",
                          f"output.run_dir={run_dir}"] + list(overrides))
    s = P.ppc(run_dir, n_draws=60, max_cells=1000, seed=0, plots=False)
    st = s["statistics"]
    print(json.dumps({"overrides": list(overrides),
                      "gene_mean": {k: st["gene_mean"][k] for k in ("ppp_median", "coverage_90", "coverage_50")},
                      "checks_passed": {k: v["passed"] for k, v in s["checks"].items()},
                      "total_zero_fraction": st["total_zero_fraction"],
                      "invariant_spread": vae.invariant_spread(), "c2": vae.module.composition_mean()},
                     default=float))


if __name__ == "__main__":
    main(sys.argv[1:])
