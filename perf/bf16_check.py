"""bf16 autocast of the networks: effect on the ELBO (same parameters; and after training).

    python perf/bf16_check.py [--device cuda] [--cells 60000] [--genes 5000] [--steps 300]

1. same parameters, same random draws: -ELBO/cell on held-out batches with fp32 networks vs
   bf16-autocast networks (``plain_elbo.amp``; distributions/KL/NB in fp32);
2. two trainings from the same initialisation and batches (plain ELBO + torch Adam), fp32 and
   bf16, then both evaluated in fp32 on the same held-out batches and draws;
3. steps/s of both trainings.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.plain_elbo import amp, plain_loss  # noqa: E402
from perf.throughput import write_csv, TorchAdamClamp, batches_forever, build, random_adata, sync  # noqa: E402


@torch.no_grad()
def heldout(module, batches, n_cells, bf16=False, seed=123):
    tot, cells = 0.0, 0
    with amp(module, torch.bfloat16, enabled=bf16):
        for i, b in enumerate(batches):
            pyro.set_rng_seed(seed + i)
            tot += float(plain_loss(module, b.x, b.u, b.x_ctrl, 1.0, 0.2, n_cells=n_cells)) * b.x.shape[0]
            cells += b.x.shape[0]
    return tot / cells / n_cells


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cells", type=int, default=60000)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--perts", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="perf/bf16_check.csv")
    args = ap.parse_args(argv)
    from pyro_pvae import data as D

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    adata = random_adata(args.cells, args.genes, args.perts)
    cond = adata.obs["condition"].to_numpy().astype(str)
    vocab = D.perturbation_vocabulary(adata)
    rng = np.random.default_rng(0)
    perm = rng.permutation(args.cells)
    n_val = max(args.batch, args.cells // 10)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    ctrl = train_idx[cond[train_idx] == "control"]
    tb = D.CellBatcher(adata, train_idx, vocab, ctrl, args.batch, device=dev, seed=0)
    vb = D.CellBatcher(adata, val_idx, vocab, ctrl, args.batch, device=dev, seed=1, shuffle=False)
    val_batches = list(vb)
    N = len(train_idx)
    module0 = build(args.genes, len(vocab), dev)
    rows = []
    e32 = heldout(module0, val_batches, N)
    e16 = heldout(module0, val_batches, N, bf16=True)
    rows.append({"what": "init_same_params", "fp32_loss_per_cell": e32, "bf16_loss_per_cell": e16,
                 "diff": e16 - e32, "rel_diff": (e16 - e32) / abs(e32)})
    trained = {}
    for bf16 in (False, True):
        module = copy.deepcopy(module0)
        opt = TorchAdamClamp(list(module.parameters()), 3e-3)
        it = batches_forever(tb)
        pyro.set_rng_seed(0)
        with amp(module, torch.bfloat16, enabled=bf16):
            for s in range(args.steps):
                if s == 10:
                    sync(dev)
                    t0 = time.perf_counter()
                b = next(it)
                kl = min(1.0, s / max(1, args.steps // 3))
                loss = plain_loss(module, b.x, b.u, b.x_ctrl, kl, 0.5, n_cells=N)
                loss.backward()
                opt.step()
            sync(dev)
            dt = time.perf_counter() - t0
        trained[bf16] = (module, (args.steps - 10) * args.batch / dt)
    m32, v32 = trained[False]
    m16, v16 = trained[True]
    a, b = heldout(m32, val_batches, N), heldout(m16, val_batches, N)
    rows.append({"what": f"after_{args.steps}_steps_eval_fp32", "fp32_loss_per_cell": a, "bf16_loss_per_cell": b,
                 "diff": b - a, "rel_diff": (b - a) / abs(a), "fp32_cells_per_s": v32, "bf16_cells_per_s": v16})
    a2 = heldout(m32, val_batches, N, bf16=True)
    rows.append({"what": "trained_fp32_params_eval_bf16_vs_fp32", "fp32_loss_per_cell": a, "bf16_loss_per_cell": a2,
                 "diff": a2 - a, "rel_diff": (a2 - a) / abs(a)})
    for r in rows:
        print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
