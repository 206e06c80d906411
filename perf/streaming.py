"""Streaming: train through data.BackedBatcher on a large h5ad with bounded RAM.

    python perf/streaming.py --cells 1000000 --genes 5000 [--steps 20] [--path /tmp/big.h5ad] [--threads 1]

The file is written chunk by chunk by a separate process (obs/var with anndata, X as an
on-disk CSR group appended with h5py), so the training process's peak RSS (``ru_maxrss``)
is that of streaming alone. Trains the full model (Pyro ELBOModule + torch Adam) for
``--steps`` steps and reports peak RSS, cells/s and the in-memory size it avoided.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write(path, n_cells, n_genes, n_perts=100, density=0.1, chunk=20000, sort_conditions=False):
    import anndata as ad
    import h5py
    import pandas as pd

    from perf.throughput import random_conditions, random_count_chunks

    cond = random_conditions(n_cells, n_perts)
    if sort_conditions:
        # rows are i.i.d., so this only changes the layout: cells grouped by condition, the control
        # cells one contiguous block (before 62c2a22 BackedBatcher read the controls run by run)
        cond = np.sort(cond.astype(str)).astype(object)
    obs = pd.DataFrame({"condition": cond}, index=np.arange(n_cells).astype(str))
    var = pd.DataFrame(index=np.array([f"g{i}" for i in range(n_genes)], dtype=object))
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = np.array([n_cells, n_genes])
        data = g.create_dataset("data", (0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        ind = g.create_dataset("indices", (0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for start, m in random_count_chunks(n_cells, n_genes, density, 0, chunk):
            k = m.nnz
            data.resize((nnz + k,))
            ind.resize((nnz + k,))
            data[nnz:] = m.data
            ind[nnz:] = m.indices
            indptr.append(m.indptr[1:].astype(np.int64) + nnz)
            nnz += k
        g.create_dataset("indptr", data=np.concatenate(indptr))
    return nnz


def train(path, steps, batch, device, chunk_size, buffer_chunks, threads=None):
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)

    from perf.throughput import build, make_stepper, rss_mb
    from pyro_pvae import data as D
    import anndata as ad

    a = ad.read_h5ad(path, backed="r")
    cond = a.obs["condition"].astype(str).to_numpy()
    n, g = a.shape
    a.file.close()
    vocab = sorted({t for c in np.unique(cond) for t in D.parse_condition(c)})
    ctrl = np.flatnonzero(cond == "control")
    rss0 = rss_mb()
    t_init = time.perf_counter()
    b = D.BackedBatcher(path, np.arange(n), vocab, ctrl, batch, device=device, seed=0,
                        chunk_size=chunk_size, buffer_chunks=buffer_chunks)
    t_init = time.perf_counter() - t_init
    rss_batcher = rss_mb()
    module = build(g, len(vocab), device)
    step = make_stepper("pyro_module", module, n)
    it = iter(b)
    t0 = None
    for s in range(steps):
        if s == 2:
            t0 = time.perf_counter()
        bt = next(it)
        step((bt.x, bt.u, bt.x_ctrl, torch.tensor(1.0, device=device), torch.tensor(0.5, device=device)))
    dt = time.perf_counter() - t0
    return {"cells": n, "genes": g, "steps": steps, "batch": batch, "chunk_size": chunk_size,
            "buffer_chunks": buffer_chunks, "cells_per_s": (steps - 2) * batch / dt,
            "rss_before_batcher_mb": rss0, "rss_after_batcher_init_mb": rss_batcher,
            "batcher_init_s": t_init, "rss_end_mb": rss_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_controls": len(ctrl), "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=200000)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--buffer-chunks", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--path", default=None)
    ap.add_argument("--phase", default="all", choices=["all", "write", "train"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default")
    ap.add_argument("--sort-conditions", action="store_true",
                    help="write the rows grouped by condition (controls contiguous) instead of interleaved")
    args = ap.parse_args(argv)
    path = args.path or f"/tmp/stream_{args.cells}x{args.genes}{'_sorted' if args.sort_conditions else ''}.h5ad"
    if args.phase == "write":
        t0 = time.perf_counter()
        nnz = write(path, args.cells, args.genes, density=args.density, sort_conditions=args.sort_conditions)
        print(json.dumps({"written": path, "nnz": int(nnz), "seconds": time.perf_counter() - t0,
                          "file_mb": os.path.getsize(path) / 2**20}))
        return
    if args.phase == "train":
        print(json.dumps(train(path, args.steps, args.batch, args.device, args.chunk_size, args.buffer_chunks,
                               args.threads)))
        return
    me = [sys.executable, __file__, "--cells", str(args.cells), "--genes", str(args.genes), "--path", path,
          "--density", str(args.density)]
    if not os.path.exists(path):
        subprocess.run(me + ["--phase", "write"] + (["--sort-conditions"] if args.sort_conditions else []), check=True)
    out = subprocess.run(me + ["--phase", "train", "--steps", str(args.steps), "--batch", str(args.batch),
                               "--device", args.device, "--chunk-size", str(args.chunk_size),
                               "--buffer-chunks", str(args.buffer_chunks), "--threads", str(args.threads)],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    nnz_mb = os.path.getsize(path) / 2**20
    r["file_mb"] = nnz_mb
    r["dense_in_memory_mb"] = r["cells"] * r["genes"] * 4 / 2**20
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
