"""Time per epoch and peak GPU memory of the real training loop (``PerturbedVAE.fit`` ->
``train.Trainer``) on a norman_like-shaped data set of random NB-like counts
(default 60k cells x 5,000 genes, 100 perturbation genes with singles and doubles).

    python perf/epoch_time.py [--device cuda] [--cells 60000] [--genes 5000]
                                    [--batches 512,4096] [--epochs 2] [--out CSV]

``--batches`` lists the batch sizes. Seconds per epoch come from the Trainer's history
(they include the validation pass and the per-epoch ELBO split).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf.throughput import write_csv, peak_rss_mb, random_adata  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cells", type=int, default=60000)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--perts", type=int, default=100)
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", default="512,4096")
    ap.add_argument("--out", default="perf/epoch_time.csv")
    args = ap.parse_args(argv)
    from pyro_pvae.api import PerturbedVAE

    t0 = time.perf_counter()
    adata = random_adata(args.cells, args.genes, args.perts, args.density)
    print(f"data {args.cells} x {args.genes}, {adata.X.nnz / args.cells:.0f} nnz/cell, made in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for B in map(int, args.batches.split(",")):
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        vae = PerturbedVAE(adata, split=None, model={"hidden": args.hidden, "latent_inv": 10, "latent_pert": 10,
                                                            "sparse_rotation": False},  # training time only
                           train={"epochs": args.epochs, "batch_size": B, "device": args.device,
                                  "progress": False, "kl_warmup_epochs": 1})
        t0 = time.perf_counter()
        try:
            vae.fit()
        except Exception as e:
            print(f"B={B}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"batch": B, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        total = time.perf_counter() - t0
        gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else float("nan")
        for h in vae.history:
            r = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "cells": args.cells, "genes": args.genes, "batch": B, "epoch": h["epoch"],
                 "seconds": h["seconds"], "cells_per_s": h["cells_per_s"], "train_loss": h["train_loss"],
                 "val_loss": h["val_loss"], "fit_seconds_total": total, "gpu_peak_mb": gpu,
                 "peak_rss_mb": peak_rss_mb()}
            rows.append(r)
            print(f"B={B:5d} epoch {h['epoch']}: {h['seconds']:.2f} s/epoch, "
                  f"{h['cells_per_s']:.0f} cells/s, val -ELBO/cell {h['val_loss']:.1f}, GPU peak {gpu:.0f} MB",
                  flush=True)
    write_csv(rows, args.out)
    print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()
