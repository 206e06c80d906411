"""Multi-GPU (or multi-process CPU) data-parallel training with ``torch.distributed``.

    torchrun --nproc_per_node=N -m pyro_pvae.distributed --config NAME [key=value ...]

or, from Python, :func:`fit_ddp` in each process (see :func:`spawn` for a local launcher).

How it works: the ordinary :class:`~pyro_pvae.train.Trainer` runs on every rank. Its loss is
Pyro's ``TraceMeanField_ELBO()(module.model, module.guide)``, an ``nn.Module`` (an
``ELBOModule``) whose forward returns the differentiable -ELBO with the PerturbedVAE module
registered on it, wrapped in ``DistributedDataParallel`` (which all-reduces the gradients);
a plain torch Adam with ClippedAdam's element-wise gradient clamp and per-step
learning-rate decay steps them. Each rank reads its own shard of the training cells
(``train_idx[rank::world]``, cut to equal length) with batch ``batch_size // world``; every
rank uses the global ``n_cells`` as the subsample scale, so each rank's loss is an unbiased
estimate of the full -ELBO and DDP's gradient average equals the gradient of the global-batch
estimate (the global sites get one draw per rank: ``world`` particles instead of one).
Control cells for the alignment pairing are all the training controls on every rank.

Schedules (KL warm-up, gate temperature, learning-rate decay) are the Trainer's, as functions
of the global step; the logged loss is averaged over ranks. Rank 0 writes the run directory (``model.pt`` loadable with ``PerturbedVAE.load``, ``metrics.csv``).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time


import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as D
from .train import Trainer

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


class _RankBatches:
    """Per-rank batchers stepped together (one-process emulation): yields one batch per rank."""

    def __init__(self, batchers):
        self.parts = list(batchers)

    def set_epoch(self, epoch: int) -> None:
        for b in self.parts:
            b.set_epoch(epoch)

    def __len__(self) -> int:
        return min(len(b) for b in self.parts)

    def __iter__(self):
        return zip(*self.parts)


class EmulatedDDPTrainer(Trainer):
    """The :class:`~pyro_pvae.train.Trainer` loop doing in one process exactly what ``world``
    DDP ranks do: per-rank shards, batches and RNG streams, gradients averaged over ranks."""

    def __init__(self, module, rank_batchers, cfg, rng_states, n_cells: int, max_steps: int | None = None):
        super().__init__(module, _RankBatches(rank_batchers), None, cfg, None, n_cells=n_cells, max_steps=max_steps)
        self.rng_states = rng_states

    def batch_args(self, batches, step: int, epoch_float: float):
        return [super(EmulatedDDPTrainer, self).batch_args(b, step, epoch_float) for b in batches]

    @staticmethod
    def cells_in(args) -> int:
        return args[0][0].shape[0]

    def diagnostics(self, args) -> dict:
        return {}

    def step(self, rank_args) -> float:
        losses = []
        for r, args in enumerate(rank_args):
            torch.set_rng_state(self.rng_states[r])
            loss = self.loss_module(*args, n_cells=self.n_cells)
            (loss / len(rank_args)).backward()
            self.rng_states[r] = torch.get_rng_state()
            losses.append(loss.detach())
        self.optim.step()
        return float(torch.stack(losses).mean())


def _average_over_ranks(world: int):
    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / world
    return reduce


def fit_ddp(rank: int, world: int, adata, split, model_cfg: dict, train_cfg: dict, *, backend: str | None = None,
            init_method: str | None = None, max_steps: int | None = None, run_dir=None):
    """Train on this rank's shard with :class:`~pyro_pvae.train.Trainer`; call in every
    process (after or instead of torchrun's env). ``run_dir`` is written by rank 0 only.

    Returns (vae, trainer); ``vae`` holds the trained module on every rank (identical)."""
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
    module = vae.build_module().to(device)  # same initialisation on every rank (DDP also broadcasts rank 0's)
    train_idx = np.asarray(vae.split.train_idx)
    batcher = D.make_batcher(adata, cell_idx=shard(train_idx, rank, world), vocabulary=vae.vocabulary,
                             control_idx=vae.control_idx, batch_size=max(cfg.batch_size // world, 1), device=device,
                             seed=cfg.seed, shuffle=True, drop_last=True)
    torch.manual_seed(cfg.seed * 1_000_003 + rank)
    dev_ids = [device.index] if device.type == "cuda" else None
    # the running control and group centres (buffers) are rank 0's: DDP broadcasts buffers at
    # every forward, and each rank then updates its copy from its own batch
    trainer = Trainer(module, batcher, None, cfg, run_dir if rank == 0 else None,
                      n_cells=(len(train_idx) // world) * world, max_steps=max_steps,
                      wrap=lambda m: nn.parallel.DistributedDataParallel(m, device_ids=dev_ids),
                      all_reduce=_average_over_ranks(world))
    vae.history = trainer.fit()
    module.eval()
    return vae, trainer


def emulate_ddp(adata, split, model_cfg: dict, train_cfg: dict, world: int, max_steps: int | None = None):
    """One process doing exactly what ``world`` DDP ranks do (the reference for the tests).
    Returns (vae, trainer)."""
    from .api import PerturbedVAE
    import pyro

    vae = PerturbedVAE(adata, split=split, model=model_cfg, train=train_cfg)
    cfg = vae.train_config
    pyro.set_rng_seed(cfg.seed)
    module = vae.build_module()
    train_idx = np.asarray(vae.split.train_idx)
    batchers = [D.make_batcher(adata, cell_idx=shard(train_idx, r, world), vocabulary=vae.vocabulary,
                               control_idx=vae.control_idx, batch_size=max(cfg.batch_size // world, 1),
                               device="cpu", seed=cfg.seed, shuffle=True, drop_last=True) for r in range(world)]
    states = []
    for r in range(world):
        torch.manual_seed(cfg.seed * 1_000_003 + r)
        states.append(torch.get_rng_state())
    trainer = EmulatedDDPTrainer(module, batchers, cfg, states, n_cells=(len(train_idx) // world) * world,
                                 max_steps=max_steps)
    vae.history = trainer.fit()
    return vae, trainer


def spawn(fn, world: int, args=(), port: int | None = None):
    """Run ``fn(rank, world, *args)`` in ``world`` local processes (gloo over localhost)."""
    import torch.multiprocessing as mp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or free_port())
    mp.spawn(fn, args=(world, *args), nprocs=world, join=True)


# ---- CLI (torchrun) ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from contextlib import nullcontext

    from .config import ConfigError, compose, load_dataset, parse_cli, resolve_split, usage
    from .rundir import claim_run_dir

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
    with claim_run_dir(cfg, "ddp") if rank == 0 else nullcontext() as claim:  # rank 0 writes
        run_dir = claim.path if rank == 0 else None
        vae, trainer = fit_ddp(rank, world, adata, split, OmegaConf.to_container(cfg.model, resolve=True),
                               OmegaConf.to_container(cfg.train, resolve=True), run_dir=run_dir)
        if rank == 0:
            vae._rotate_if_configured()  # as PerturbedVAE.fit does
            vae.save(run_dir / "model.pt")
            print(f"DDP on {world} process(es): {len(vae.history)} epochs in {time.perf_counter() - t0:.0f} s; "
                  f"final train -ELBO/cell {vae.history[-1]['train_loss']:.2f}; outputs in {run_dir}/")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
