"""Training throughput (cells/s) and peak memory of the full PerturbedVAE model.

    python perf/throughput.py [--device cpu|cuda] [--sizes 10000x2000:64,512 ...]
                                    [--variants pyro_svi,pyro_module,plain ...] [--out CSV]
                                    [--threads N]

Each size ``CELLSxGENES:B1,B2,...`` gets a random NB-like sparse count matrix (made directly,
not by the simulator: gene-specific detection rates, geometric counts) held by
``data.CellBatcher`` on the device, and every variant trains on the same batches:

* ``pyro_svi``     Pyro ``SVI.step`` with ``TraceMeanField_ELBO`` and ``ClippedAdam`` (what
                   ``train.Trainer`` runs, incl. the per-step float loss);
* ``pyro_jit``     the same with ``JitTraceMeanField_ELBO`` (``train.jit=true``);
* ``pyro_module``  Pyro's ``ELBOModule`` (``TraceMeanField_ELBO()(module.model, module.guide)``) with a plain
                   torch Adam (fused on CUDA) and ClippedAdam's element-wise gradient clamp;
* ``plain``        the hand-written ELBO of ``perf/plain_elbo.py`` with the same optimiser;
* ``plain_dedupe`` plain without the duplicated invariant-encoder pass of the alignment term;
* ``*_bf16``       the networks under bf16 autocast (``plain_elbo.amp``);
* ``data``         the batcher alone (densify x and x_ctrl, build u).

Cells/s is averaged over ``--steps`` steps after ``--warmup`` steps (device synchronised).
Peak memory: GPU ``max_memory_allocated`` per variant, RAM as the process's current RSS and
its peak (``ru_maxrss``, monotone over the run). Prints a table, writes CSV, and the
Pyro/plain ratio per (size, batch).
"""
from __future__ import annotations

import argparse
import csv
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.plain_elbo import amp, bytes_per_cell, flops_per_cell, plain_loss  # noqa: E402

DEFAULT_SIZES = {
    "cpu": ["10000x2000:64,512", "10000x5000:512"],
    "cuda": ["10000x2000:512,4096", "100000x5000:64,512,1024,4096", "100000x10000:1024",
             "1000000x5000:4096"],
}
DEFAULT_VARIANTS = {
    "cpu": "pyro_svi,pyro_module,plain,plain_bf16,data",
    "cuda": "pyro_svi,pyro_jit,pyro_module,plain,plain_dedupe,pyro_module_bf16,plain_bf16,data",
}


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------

def random_counts(n_cells: int, n_genes: int, density: float = 0.15, seed: int = 0,
                  chunk: int = 20000):
    """CSR float32 (n_cells, n_genes) of NB-like counts: gene detection rates log-normal
    around ``density``, counts 1 + geometric with gene-specific means; canonical (sorted,
    no duplicates). Made chunk by chunk; yields (row_start, csr_chunk) when iterated via
    :func:`random_count_chunks`, returned whole here."""
    import scipy.sparse as sp

    return sp.vstack([m for _, m in random_count_chunks(n_cells, n_genes, density, seed, chunk)],
                     format="csr")


def random_count_chunks(n_cells, n_genes, density=0.15, seed=0, chunk=20000):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    p_gene = np.clip(density * rng.lognormal(0.0, 0.8, n_genes) / math.exp(0.32), 0.002, 0.95)
    mean_gene = 1.0 + rng.lognormal(0.0, 1.0, n_genes)
    q_gene = (1.0 / mean_gene).astype(np.float32)
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        depth = rng.lognormal(0.0, 0.3, (n, 1)).astype(np.float32)
        mask = rng.random((n, n_genes), dtype=np.float32) < np.minimum(p_gene[None] * depth, 0.98)
        rows, cols = np.nonzero(mask)
        vals = rng.geometric(q_gene[cols]).astype(np.float32)
        m = sp.csr_matrix((vals, (rows, cols)), shape=(n, n_genes), dtype=np.float32)
        m.sort_indices()
        yield start, m


def random_conditions(n_cells: int, n_perts: int, seed: int = 0, control_frac=0.15, double_frac=0.2):
    rng = np.random.default_rng(seed + 1)
    genes = np.array([f"G{i:04d}" for i in range(n_perts)])
    kind = rng.random(n_cells)
    a = rng.integers(0, n_perts, n_cells)
    b = (a + 1 + rng.integers(0, n_perts - 1, n_cells)) % n_perts
    out = np.empty(n_cells, dtype=object)
    single = genes[a]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    double = np.char.add(np.char.add(genes[lo], "+"), genes[hi])
    out[:] = single
    dmask = kind < double_frac
    out[dmask] = double[dmask]
    out[kind > 1 - control_frac] = "control"
    return out


def random_adata(n_cells, n_genes, n_perts=100, density=0.15, seed=0):
    import anndata as ad
    import pandas as pd

    X = random_counts(n_cells, n_genes, density, seed)
    obs = pd.DataFrame({"condition": random_conditions(n_cells, n_perts, seed)},
                       index=np.arange(n_cells).astype(str))
    var = pd.DataFrame(index=np.array([f"g{i}" for i in range(n_genes)], dtype=object))
    return ad.AnnData(X=X, obs=obs, var=var)


# ---------------------------------------------------------------------------------------
# model + one training step per variant
# ---------------------------------------------------------------------------------------

def build(n_genes, n_perts, device, hidden=128, latent=10, seed=0, **model_kw):
    """The PerturbedVAE module without the composition extras (what ``plain_loss`` mirrors)."""
    from pyro_pvae.config import ModelConfig
    from pyro_pvae.model import PerturbedVAEModule

    torch.manual_seed(seed)
    model_kw = {"learn_composition": False, "pair_effects": False, "decoder": "nonlinear", **model_kw}
    cfg = ModelConfig(latent_inv=latent, latent_pert=latent, hidden=hidden, **model_kw)
    return PerturbedVAEModule(cfg, n_genes=n_genes, n_perts=n_perts).to(device)


class TorchAdamClamp:
    """torch Adam (fused on CUDA, foreach on CPU) after ClippedAdam's element-wise clamp."""

    def __init__(self, params, lr=3e-3, clip=10.0):
        self.params = [p for p in params if p.requires_grad]
        cuda = self.params[0].is_cuda
        self.opt = torch.optim.Adam(self.params, lr=lr, fused=cuda or None, foreach=None if cuda else True)
        self.clip = clip

    def step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_clamp_min_(grads, -self.clip)
        torch._foreach_clamp_max_(grads, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def make_stepper(variant, module, n_cells, lr=3e-3):
    """A function batch_args -> loss (float or 0-dim tensor) that does one training step."""
    import pyro
    from pyro.infer import SVI, JitTraceMeanField_ELBO, TraceMeanField_ELBO
    from pyro.optim import ClippedAdam

    base = variant.replace("_bf16", "")
    pyro.clear_param_store()
    if base in ("pyro_svi", "pyro_jit"):
        elbo = JitTraceMeanField_ELBO(ignore_jit_warnings=True) if base == "pyro_jit" else TraceMeanField_ELBO()
        svi = SVI(module.model, module.guide, ClippedAdam({"lr": lr, "clip_norm": 10.0, "lrd": 1.0}), elbo)

        def step(args):
            loss = svi.step(*args, n_cells=n_cells)
            if not math.isfinite(loss):  # what Trainer.fail_on_nonfinite checks
                raise RuntimeError("non-finite loss")
            return loss
        return step
    params = list(module.parameters())
    opt = TorchAdamClamp(params, lr)
    if base == "pyro_module":
        loss_module = TraceMeanField_ELBO(max_plate_nesting=2)(module.model, module.guide)

        def step(args):
            loss = loss_module(*args, n_cells=n_cells)
            loss.backward()
            opt.step()
            return loss.detach()
        return step
    if base in ("plain", "plain_dedupe"):
        dedupe = base == "plain_dedupe"

        def step(args):
            loss = plain_loss(module, *args, n_cells=n_cells, dedupe=dedupe)
            loss.backward()
            opt.step()
            return loss.detach()
        return step
    raise ValueError(f"unknown variant {variant!r}")


def batch_args(batch, device, kl=1.0, temp=0.5):
    # as train.Trainer.batch_args: two small host->device tensors per step
    return (batch.x, batch.u, batch.x_ctrl, torch.tensor(kl, device=device), torch.tensor(temp, device=device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mb():
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches_forever(batcher):
    epoch = 0
    while True:
        batcher.set_epoch(epoch)
        for b in batcher:
            yield b
        epoch += 1


def time_variant(variant, batcher, n_genes, n_perts, n_cells, device, warmup, steps, hidden, latent):
    module = build(n_genes, n_perts, device, hidden, latent)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    it = batches_forever(batcher)
    bf16 = variant.endswith("_bf16")
    losses = []
    with amp(module, torch.bfloat16, enabled=bf16):
        if variant == "data":
            step = lambda args: float("nan")  # noqa: E731
        else:
            step = make_stepper(variant, module, n_cells)
        for _ in range(warmup):
            step(batch_args(next(it), device))
        sync(device)
        t0 = time.perf_counter()
        cells = 0
        for _ in range(steps):
            b = next(it)
            losses.append(step(batch_args(b, device)))
            cells += b.x.shape[0]
        sync(device)
        dt = time.perf_counter() - t0
    loss = float(np.mean([float(v) for v in losses])) / n_cells if variant != "data" else float("nan")
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    del module
    return {"variant": variant, "cells_per_s": cells / dt, "ms_per_step": 1000 * dt / steps,
            "loss_per_cell": loss, "gpu_peak_mb": gpu_peak, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}


def parse_size(spec: str):
    shape, _, bs = spec.partition(":")
    n, g = shape.lower().split("x")
    return int(float(n)), int(float(g)), [int(b) for b in bs.split(",")] if bs else [512]


def add_paired_ratios(rows: list[dict], refs=("plain", "plain_dedupe", "plain_bf16")) -> None:
    """``ratio_vs_<ref>`` = time of the row's variant / time of ``ref`` in the same round and
    configuration (>1: slower than the reference); rows without ``cells_per_s`` (errors) get none."""
    by = {}
    for r in rows:
        if "cells_per_s" in r:
            by.setdefault((r["cells"], r["genes"], r["batch"], r["round"]), {})[r["variant"]] = r["cells_per_s"]
    for r in rows:
        d = by.get((r["cells"], r["genes"], r["batch"], r["round"]), {})
        for ref in refs:
            if ref in d and "cells_per_s" in r:
                r[f"ratio_vs_{ref}"] = d[ref] / r["cells_per_s"]


def summarise(per_round: list[dict]) -> list[dict]:
    """One row per (cells, genes, batch, variant): medians over rounds of cells/s, ms/step and
    the paired time ratios, plus the ratios' min and max; RSS peaks as their max."""
    groups: dict = {}
    for r in per_round:
        groups.setdefault((r["cells"], r["genes"], r["batch"], r["variant"]), []).append(r)
    out = []
    for rs in groups.values():
        ok = [r for r in rs if "cells_per_s" in r]
        if not ok:
            out.append({**rs[0], "rounds": 0})
            continue
        s = {k: v for k, v in ok[0].items() if k != "round"}
        s["rounds"] = len(ok)
        for k in ("cells_per_s", "ms_per_step", "loss_per_cell"):
            s[k] = float(np.median([r[k] for r in ok]))
        for k in ("gpu_peak_mb", "rss_mb", "peak_rss_mb"):
            s[k] = float(np.max([r[k] for r in ok]))
        for k in ("ratio_vs_plain", "ratio_vs_plain_dedupe", "ratio_vs_plain_bf16"):
            v = [r[k] for r in ok if k in r]
            if v:
                s[k], s[k + "_min"], s[k + "_max"] = float(np.median(v)), float(np.min(v)), float(np.max(v))
        out.append(s)
    return out


def write_csv(rows: list[dict], path) -> None:
    """Rows (dicts, keys in first-seen order) to a CSV file, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="*", default=None, help="CELLSxGENES:B1,B2 (default per device)")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--perts", type=int, default=100)
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--latent", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="skip the remaining configurations after this many seconds")
    ap.add_argument("--out", default="perf/throughput.csv")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every (batch, variant) this many times, interleaved (odd rounds in reverse "
                         "variant order); report medians and the median of the paired per-round ratios")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (intra-op CPU threads); default: torch's own")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import pyro
    from pyro_pvae import data as D

    device = torch.device(args.device)
    kind = device.type
    sizes = args.sizes or DEFAULT_SIZES[kind]
    variants = (args.variants or DEFAULT_VARIANTS[kind]).split(",")
    warmup = args.warmup if args.warmup is not None else (3 if kind == "cpu" else 10)
    steps = args.steps if args.steps is not None else (5 if kind == "cpu" else 30)
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; bf16 is a variant
    pyro.set_rng_seed(0)
    rows = []
    t_start = time.perf_counter()
    dev_name = torch.cuda.get_device_name(0) if kind == "cuda" else "cpu"
    print(f"device {dev_name}; torch {torch.__version__}; pyro {pyro.__version__}; "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    for spec in sizes:
        n, g, bss = parse_size(spec)
        t0 = time.perf_counter()
        adata = random_adata(n, g, args.perts, args.density)
        nnz = adata.X.nnz / n
        cond = adata.obs["condition"].to_numpy().astype(str)
        vocab = D.perturbation_vocabulary(adata)
        ctrl = np.flatnonzero(cond == "control")
        print(f"\n{n} x {g}: {nnz:.0f} nonzeros/cell, {len(vocab)} perturbations, made in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for B in bss:
            batcher = D.CellBatcher(adata, np.arange(n), vocab, ctrl, B, device=device, seed=0)
            for rnd in range(args.rounds):
                # odd rounds run the variants in reverse order, so order effects cancel in the median
                for v in (variants if rnd % 2 == 0 else variants[::-1]):
                    if args.max_seconds and time.perf_counter() - t_start > args.max_seconds:
                        print(f"  (time limit: skipping {v} at B={B}, round {rnd})", flush=True)
                        continue
                    try:
                        r = time_variant(v, batcher, g, len(vocab), n, device, warmup, steps, args.hidden, args.latent)
                    except Exception as e:  # report, keep going
                        r = {"variant": v, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    r = {"device": dev_name, "cells": n, "genes": g, "batch": B, "nnz_per_cell": round(nnz, 1),
                         "threads": torch.get_num_threads(), "round": rnd, **r}
                    rows.append(r)
                    if "error" in r:
                        print(f"  B={B:5d} {v:18s} ERROR {r['error']}", flush=True)
                    else:
                        print(f"  B={B:5d} {v:18s} {r['cells_per_s']:11.0f} cells/s {r['ms_per_step']:8.2f} ms/step "
                              f"loss/cell {r['loss_per_cell']:10.2f} gpu {r['gpu_peak_mb']:8.0f} MB "
                              f"rss {r['rss_mb']:6.0f} MB  (round {rnd})", flush=True)
            del batcher
            if kind == "cuda":
                torch.cuda.empty_cache()
        del adata
    # ratios: paired within a round (the two variants ran back to back), then the median over rounds
    add_paired_ratios(rows)
    per_round = rows
    rows = summarise(per_round) if args.rounds > 1 else per_round
    if args.rounds > 1:
        write_csv(per_round, str(Path(args.out).with_suffix("")) + "_rounds.csv")
    write_csv(rows, args.out)
    print_table(rows, args, device)
    print(f"\nCSV: {args.out}")
    return rows


def print_table(rows, args, device):
    print("\n| cells | genes | batch | variant | cells/s | ms/step | Pyro/plain time | (min-max over rounds) "
          "| time / plain_dedupe | GPU peak MB | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['cells']} | {r['genes']} | {r['batch']} | {r['variant']} | error: {r['error'][:60]} | | | | | | |")
            continue
        key = "ratio_vs_plain_bf16" if r["variant"].endswith("_bf16") else "ratio_vs_plain"
        ratio = r.get(key, float("nan"))
        rng = f"{r[key + '_min']:.2f}-{r[key + '_max']:.2f}" if key + "_min" in r else ""
        dd = r.get("ratio_vs_plain_dedupe", float("nan"))
        print(f"| {r['cells']} | {r['genes']} | {r['batch']} | {r['variant']} | {r['cells_per_s']:.0f} | "
              f"{r['ms_per_step']:.2f} | {ratio:.2f} | {rng} | {dd:.2f} | {r['gpu_peak_mb']:.0f} | {r['rss_mb']:.0f} |")
    # floor per gene count
    print("\nfloor (matrix FLOPs and minimal bytes per cell; H100: ~800 TFLOP/s bf16 dense, ~3.0 TB/s measured copy)")
    for g in sorted({r["genes"] for r in rows}):
        m = build(g, args.perts, "cpu", args.hidden, args.latent)
        f = flops_per_cell(m)
        nnz = np.mean([r["nnz_per_cell"] for r in rows if r["genes"] == g])
        b = bytes_per_cell(m, nnz, dense_passes=40)
        ideal_f, ideal_b, ideal_b40 = 800e12 / f["total"], 3.0e12 / b["minimal"], 3.0e12 / b["with_passes"]
        best = max([r["cells_per_s"] for r in rows if r["genes"] == g and "cells_per_s" in r
                    and r["variant"] != "data"] or [float("nan")])
        print(f"  G={g}: {f['total'] / 1e6:.1f} MFLOP/cell (fwd {f['forward'] / 1e6:.1f}), "
              f"{b['minimal'] / 1e3:.0f} kB/cell minimal, {b['with_passes'] / 1e3:.0f} kB/cell with 40 "
              f"unfused (B,G) fp32 passes -> ideal {ideal_f:.2e} cells/s (FLOPs) / {ideal_b:.2e} (bytes) / "
              f"{ideal_b40:.2e} (bytes, unfused); best measured {best:.3g} cells/s")


if __name__ == "__main__":
    main()
