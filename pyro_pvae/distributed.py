"""Multi-GPU (or multi-process CPU) data-parallel training with ``torch.distributed``.

    torchrun --nproc_per_node=N -m pyro_pvae.distributed --config NAME [key=value ...]

or, from Python, :func:`fit_ddp` in each process (see :func:`spawn` for a local launcher).

How it works: Pyro's ``TraceMeanField_ELBO()(model, guide)`` is an ``nn.Module`` (an
``ELBOModule``) whose forward returns the differentiable -ELBO; the model and guide modules
are registered on it so that ``DistributedDataParallel`` sees (and all-reduces) their
parameters, and a plain torch Adam with ClippedAdam's element-wise gradient clamp and per-step
learning-rate decay steps them. Each rank reads its own shard of the training cells
(``train_idx[rank::world]``, cut to equal length) with batch ``batch_size // world``; every
rank uses the global ``n_cells`` as the subsample scale, so each rank's loss is an unbiased
estimate of the full -ELBO and DDP's gradient average equals the gradient of the global-batch
estimate (the global sites get one draw per rank: ``world`` particles instead of one).
Control cells for the alignment pairing are all the training controls on every rank.

Schedules (KL warm-up, gate temperature, learning-rate decay) are those of ``train.Trainer``,
as functions of the global step. Rank 0 keeps the history and, from the CLI, writes the run
directory (``model.pt`` loadable with ``PerturbedVAE.load``, ``metrics.csv``).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time


import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .train import ClampAdam, elbo_module, kl_weight_at, param_groups, temperature_at

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(idx, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s share of the cells ``idx``: every ``world``-th, all shards equally long."""
    idx = np.asarray(idx)
    n = (len(idx) // world) * world
    return idx[:n][rank::world]


def train_loop(model, guide, batchers, train_cfg, n_cells: int, device, ddp: bool = False,
               rng_states=None, rank: int = 0, world: int = 1, max_steps: int | None = None):
    """The training loop shared by the DDP ranks and the one-process emulation.

    ``batchers``: one batcher (a DDP rank) or a list of per-rank batchers (emulation in one
    process: their losses are averaged, each with its own RNG state from ``rng_states``,
    which reproduces DDP's averaged gradient). Returns the history: per step the loss
    averaged over ranks (per cell), per epoch the mean.
    """
    import pyro

    emulate = isinstance(batchers, (list, tuple))
    parts = list(batchers) if emulate else [batchers]
    loss_module = elbo_module(model, guide)
    if ddp:
        dev_ids = [device.index] if device.type == "cuda" else None
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=dev_ids)
    steps_per_epoch = max(min(len(b) for b in parts), 1)
    total = steps_per_epoch * train_cfg.epochs
    if max_steps is not None:
        total = min(total, max_steps)
    lrd = train_cfg.lr_final_fraction ** (1.0 / max(steps_per_epoch * train_cfg.epochs, 1))
    opt = ClampAdam(param_groups(model, guide, train_cfg), train_cfg.clip_norm, lrd)
    schedule_steps = steps_per_epoch * train_cfg.epochs
    pyro.clear_param_store()
    pyro.enable_validation(train_cfg.validate_args)  # as Trainer (a KL weight of 0 is valid here)
    history = {"step_loss": [], "epoch": []}
    step = 0
    epoch = 0
    while step < total:
        t0 = time.perf_counter()
        for b in parts:
            b.set_epoch(epoch)
        iters = [iter(b) for b in parts]
        ep_losses = []
        for i in range(steps_per_epoch):
            if step >= total:
                break
            kl = torch.tensor(kl_weight_at(train_cfg, epoch + i / steps_per_epoch), device=device)
            temp = torch.tensor(temperature_at(train_cfg, step, schedule_steps), device=device)
            losses = []
            for r, it in enumerate(iters):
                batch = next(it)
                if emulate and rng_states is not None:
                    torch.set_rng_state(rng_states[r])
                loss = loss_module(batch.x, batch.u, batch.x_ctrl, kl, temp, n_cells=n_cells)
                (loss / len(parts)).backward()
                if emulate and rng_states is not None:
                    rng_states[r] = torch.get_rng_state()
                losses.append(loss.detach())
            opt.step()
            local = torch.stack(losses).mean()
            if ddp:
                dist.all_reduce(local)
                local = local / world
            value = float(local) / n_cells
            if not math.isfinite(value):
                raise RuntimeError(f"non-finite loss at epoch {epoch}, step {step} (rank {rank})")
            history["step_loss"].append(value)
            ep_losses.append(value)
            step += 1
        history["epoch"].append({"epoch": epoch, "train_loss": float(np.mean(ep_losses)) if ep_losses else math.nan,
                                 "seconds": time.perf_counter() - t0,
                                 "cells_per_s": sum(len(b.cell_idx) for b in parts) * (world if ddp else 1)
                                 / max(time.perf_counter() - t0, 1e-9) * len(ep_losses) / steps_per_epoch})
        epoch += 1
    return history


def fit_ddp(rank: int, world: int, adata, split, model_cfg: dict, train_cfg: dict, *, backend: str | None = None,
            init_method: str | None = None, max_steps: int | None = None, seed_per_rank: bool = True):
    """Train on this rank's shard; call in every process (after or instead of torchrun's env).

    Returns (vae, history); ``vae`` holds the trained modules on every rank (identical)."""
    from . import data as D
    from .api import PerturbedVAE
    from .train import resolve_device

    vae = PerturbedVAE(adata, split=split, model=model_cfg, train=train_cfg)
    cfg = vae.train_config
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = resolve_device("cpu" if cfg.device == "auto" else cfg.device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world)
    import pyro

    pyro.set_rng_seed(cfg.seed)
    vae._build_modules()  # same initialisation on every rank (DDP also broadcasts rank 0's)
    model, guide = vae.module_model.to(device), vae.module_guide.to(device)
    train_idx = np.asarray(vae.split.train_idx)
    n_cells = (len(train_idx) // world) * world
    local_batch = max(cfg.batch_size // world, 1)
    batcher = D.make_batcher(adata, cell_idx=shard(train_idx, rank, world), vocabulary=vae.vocabulary,
                             control_idx=vae.control_idx, batch_size=local_batch, device=device,
                             seed=cfg.seed, shuffle=True, drop_last=True)
    if seed_per_rank:
        torch.manual_seed(cfg.seed * 1_000_003 + rank)
    history = train_loop(model, guide, batcher, cfg, n_cells, device, ddp=True, rank=rank, world=world,
                         max_steps=max_steps)
    model.eval(), guide.eval()
    vae.history = history["epoch"]
    return vae, history


def emulate_ddp(adata, split, model_cfg: dict, train_cfg: dict, world: int, max_steps: int | None = None):
    """One process doing exactly what ``world`` DDP ranks do (per-rank shards, batches and RNG
    streams, averaged gradients): the reference for the tests."""
    from . import data as D
    from .api import PerturbedVAE
    import pyro

    vae = PerturbedVAE(adata, split=split, model=model_cfg, train=train_cfg)
    cfg = vae.train_config
    pyro.set_rng_seed(cfg.seed)
    vae._build_modules()
    train_idx = np.asarray(vae.split.train_idx)
    n_cells = (len(train_idx) // world) * world
    batchers = [D.make_batcher(adata, cell_idx=shard(train_idx, r, world), vocabulary=vae.vocabulary,
                               control_idx=vae.control_idx, batch_size=max(cfg.batch_size // world, 1),
                               device="cpu", seed=cfg.seed, shuffle=True, drop_last=True) for r in range(world)]
    states = []
    for r in range(world):
        torch.manual_seed(cfg.seed * 1_000_003 + r)
        states.append(torch.get_rng_state())
    history = train_loop(vae.module_model, vae.module_guide, batchers, cfg, n_cells, torch.device("cpu"),
                         rng_states=states, max_steps=max_steps)
    return vae, history


def spawn(fn, world: int, args=(), port: int | None = None):
    """Run ``fn(rank, world, *args)`` in ``world`` local processes (gloo over localhost)."""
    import torch.multiprocessing as mp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or free_port())
    mp.spawn(fn, args=(world, *args), nprocs=world, join=True)


# ---- CLI (torchrun) ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from .config import ConfigError, compose, load_dataset, make_run_dir, parse_cli, resolve_split, usage
    from .train import write_metrics

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        name, overrides = parse_cli(argv, "pyro_pvae.distributed")
        if name is None:
            print(usage("pyro_pvae.distributed") + "\n\nlaunch: torchrun --nproc_per_node=N -m pyro_pvae.distributed "
                  "--config NAME [key=value ...]")
            return 0
        cfg = compose(name, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    t0 = time.perf_counter()
    vae, history = fit_ddp(rank, world, adata, split, OmegaConf.to_container(cfg.model, resolve=True),
                           OmegaConf.to_container(cfg.train, resolve=True))
    if rank == 0:
        run_dir = make_run_dir(cfg, "ddp")
        write_metrics(run_dir / "metrics.csv", history["epoch"])
        vae._rotate_if_configured()  # as PerturbedVAE.fit does
        vae.save(run_dir / "model.pt")
        print(f"DDP on {world} process(es): {len(history['epoch'])} epochs in {time.perf_counter() - t0:.0f} s; "
              f"final train -ELBO/cell {history['epoch'][-1]['train_loss']:.2f}; outputs in {run_dir}/")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
