"""Large batches with a learning-rate rule: final ELBO and held-out -ELBO vs batch size.

    python perf/lr_scaling.py [--batches 32,128,512] [--rules const,sqrt,linear] [--epochs 15]
                              [--min-steps 440]   # same number of steps at every batch size

Simulated 'tiny' data, 20% of cells held out. Same number of epochs for every batch size (so
a larger batch takes fewer steps); lr = base_lr * rule(B / base_batch) with rule const (1),
sqrt or linear, KL warm-up over the first third of the steps. Trained with the plain ELBO
(the same objective as Pyro's, perf/plain_elbo.py) and torch Adam with ClippedAdam's
clamp, for speed on CPU. Reports the final training -ELBO/cell (last epoch, full KL weight)
and the held-out -ELBO/cell (fixed draws).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.bf16_check import heldout  # noqa: E402
from perf.plain_elbo import plain_loss  # noqa: E402
from perf.throughput import TorchAdamClamp, build  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="32,128,512")
    ap.add_argument("--rules", default="const,sqrt,linear")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--min-steps", type=int, default=0,
                    help="train each batch size for at least this many steps (epochs raised to fit)")
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--base-batch", type=int, default=128)
    ap.add_argument("--out", default="perf/results/lr_scaling.csv")
    args = ap.parse_args(argv)
    from pyro_pvae import data as D
    from pyro_pvae.simulate import simulate

    torch.set_num_threads(1)
    adata = simulate("tiny", seed=0, cells_per_single=150, cells_per_double=100, n_control=800)
    cond = adata.obs["condition"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    perm = rng.permutation(adata.n_obs)
    n_val = adata.n_obs // 5
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    vocab = D.perturbation_vocabulary(adata, train_idx)
    ctrl = train_idx[cond[train_idx] == "control"]
    val = list(D.CellBatcher(adata, val_idx, vocab, ctrl, 512, seed=1, shuffle=False))
    N = len(train_idx)
    print(f"{adata.n_obs} cells x {adata.n_vars} genes, {N} train, {n_val} held out", flush=True)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        for rule in args.rules.split(","):
            f = {"const": 1.0, "sqrt": math.sqrt(B / args.base_batch), "linear": B / args.base_batch}[rule]
            lr = args.base_lr * f
            module = build(adata.n_vars, len(vocab), "cpu", hidden=64, latent=4)
            opt = TorchAdamClamp(list(module.parameters()), lr)
            tb = D.CellBatcher(adata, train_idx, vocab, ctrl, B, seed=0)
            epochs = max(args.epochs, math.ceil(args.min_steps / max(len(tb), 1)))
            steps = len(tb) * epochs
            pyro.set_rng_seed(0)
            t0, s, last = time.perf_counter(), 0, []
            for e in range(epochs):
                tb.set_epoch(e)
                for b in tb:
                    kl = min(1.0, s / max(1, steps // 3))
                    temp = 1.0 * (0.2 / 1.0) ** (s / steps)
                    loss = plain_loss(module, b.x, b.u, b.x_ctrl, kl, temp, n_cells=N)
                    loss.backward()
                    opt.step()
                    if e == epochs - 1:
                        last.append(float(loss) / N)
                    s += 1
            r = {"batch": B, "rule": rule, "lr": lr, "epochs": epochs, "steps": steps, "train_loss_last_epoch": float(np.mean(last)),
                 "heldout_loss": heldout(module, val, N), "seconds": time.perf_counter() - t0}
            rows.append(r)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    out = Path(args.out)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| batch | rule | lr | epochs | steps | train -ELBO/cell (last epoch) | held-out -ELBO/cell |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['rule']} | {r['lr']:.2g} | {r['epochs']} | {r['steps']} | {r['train_loss_last_epoch']:.2f} | "
              f"{r['heldout_loss']:.2f} |")


if __name__ == "__main__":
    main()
