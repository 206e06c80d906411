"""SVI training: annealing, progress bar, per-epoch metrics, early stopping, checkpoints, resume.

One epoch = one pass of the training batcher. Schedules are functions of the global step so
that a resumed run follows the same trajectory:

* KL weight: linear warm-up from 0 to ``kl_weight`` over ``kl_warmup_epochs``;
* gate temperature: geometric from ``temperature_start`` to ``temperature_end``;
* learning rate: ClippedAdam with per-step decay so that it ends at ``lr * lr_final_fraction``.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from tqdm.auto import tqdm

from .config import TrainConfig
from .model import LOCAL_SITES
from .utils import atomic_torch_save, atomic_write, atomic_write_csv

log = logging.getLogger(__name__)



class TrainingError(RuntimeError):
    """Training could not continue (e.g. a non-finite loss); the message says where and why."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"train.device={device!r} but CUDA is not available; use device=auto or cpu")
    return torch.device(device)


@contextmanager
def evaluating(module, seed: int | None = None):
    """Evaluation that leaves training untouched: the module in eval mode (no update of the
    running control centre) and torch's RNG forked (seeded with ``seed`` when given)."""
    device = module.slab_loc.device
    was_training = module.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        module.eval()
        try:
            yield
        finally:
            module.train(was_training)


def elbo_parts(module, args, n_cells: int) -> dict[str, float]:
    """Monte-Carlo split of the (annealed) ELBO of one batch into its parts, per cell:
    reconstruction log-likelihood, local KL (z_inv, eps), global KL, alignment factor.
    Evaluated in eval mode on a forked RNG (:func:`evaluating`)."""
    with evaluating(module):
        guide_trace = poutine.trace(module.guide).get_trace(*args, n_cells=n_cells)
        model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*args, n_cells=n_cells)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        parts = {"recon": 0.0, "kl_local": 0.0, "kl_global": 0.0, "alignment": 0.0}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            lp = site["log_prob_sum"]
            if name == "x":
                parts["recon"] += float(lp)
            elif name == "alignment":
                parts["alignment"] += float(lp)
            elif name in guide_trace.nodes:
                kl = float(guide_trace.nodes[name]["log_prob_sum"] - lp)
                parts["kl_local" if name in LOCAL_SITES else "kl_global"] += kl
    parts = {k: v / n_cells for k, v in parts.items()}
    parts["elbo"] = parts["recon"] - parts["kl_local"] - parts["kl_global"] + parts["alignment"]
    return parts


#: train settings that may differ when a run is resumed (they do not change its trajectory)
RESUMABLE_TRAIN_KEYS = ("epochs", "min_steps", "resume", "progress", "checkpoint_every", "device", "early_stopping_patience",
                        "min_epochs")


def resume_signature(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_TRAIN_KEYS}


def signature_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested settings dicts (``key: saved -> current``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            show = (lambda v: f"{len(v)} items" if isinstance(v, (list, tuple)) and len(v) > 6 else repr(v))
            out.append(f"{prefix}{key}: {show(a)} -> {show(b)}")
    return out


def load_checkpoint(path: Path) -> dict:
    """A checkpoint or saved model file, or a one-line error if it is truncated or not ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, not a torch file
        raise TrainingError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            "it is truncated or not a pyro_pvae file. Delete it and start a new run.") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path} is not a pyro_pvae checkpoint or model file")
    return state


def kl_weight_at(cfg: "TrainConfig", epoch: float) -> float:
    """KL annealing: linear warm-up from 0 to ``kl_weight`` over ``kl_warmup_epochs``."""
    warm = cfg.kl_warmup_epochs
    return cfg.kl_weight * (min(1.0, epoch / warm) if warm > 0 else 1.0)


def temperature_at(cfg: "TrainConfig", step: int, total_steps: int) -> float:
    """Gate temperature: geometric from ``temperature_start`` to ``temperature_end``."""
    frac = min(1.0, step / max(total_steps, 1))
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** frac


def elbo_module(module) -> torch.nn.Module:
    """``TraceMeanField_ELBO()(module.model, module.guide)``: an ``nn.Module`` whose forward is
    the differentiable -ELBO, with the PerturbedVAE module registered on it (so ``.parameters()``
    and DistributedDataParallel see it)."""
    loss_module = TraceMeanField_ELBO()(module.model, module.guide)
    loss_module.add_module("pvae", module)
    return loss_module


def param_groups(module, cfg: TrainConfig) -> list[dict]:
    """The networks at ``cfg.batch_lr``; the guide's global variational parameters (effects,
    DAG, dispersions; they receive one noisy gradient per step, while the networks are shared
    by every cell) at ``batch_lr * global_lr_multiplier``."""
    glob = [p for p in module.global_parameters() if p.requires_grad]
    ids = {id(p) for p in glob}
    nets = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": nets, "lr": cfg.batch_lr}, {"params": glob, "lr": cfg.batch_lr * cfg.global_lr_multiplier}]


class ClampAdam:
    """torch Adam with ClippedAdam's semantics: gradients clamped element-wise to
    [-clip, clip], every learning rate multiplied by ``lrd`` before each step."""

    def __init__(self, groups: list[dict], clip: float, lrd: float):
        self.params = [p for g in groups for p in g["params"]]
        fused = bool(self.params) and self.params[0].is_cuda
        self.opt = torch.optim.Adam(groups, fused=fused or None, foreach=None if fused else True)
        self.clip, self.lrd = clip, lrd

    def step(self):
        for group in self.opt.param_groups:  # decayed before the step, as ClippedAdam does
            group["lr"] *= self.lrd
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_clamp_min_(grads, -self.clip)
            torch._foreach_clamp_max_(grads, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class Trainer:
    """Runs SVI for a :class:`~pyro_pvae.model.PerturbedVAEModule` over batchers, writing into
    ``run_dir`` (None: nothing is written).

    Data-parallel training (``pyro_pvae.distributed``) uses the same loop: it passes
    ``wrap=DistributedDataParallel`` and ``all_reduce`` to average the logged loss over ranks;
    only ``run_dir`` of rank 0 is set."""

    def __init__(self, module, train_batcher, val_batcher, cfg: TrainConfig, run_dir: Path | None,
                 n_cells: int | None = None, wrap=None, all_reduce=None, max_steps: int | None = None,
                 signature: dict | None = None):
        self.module, self.cfg = module, cfg
        #: settings that shape the model, the data and the trajectory; a resumed run must match
        self.signature = dict(signature or {}, train=resume_signature(cfg))
        self.train_batcher, self.val_batcher = train_batcher, val_batcher
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.n_cells = n_cells if n_cells is not None else train_batcher.n_cells
        self.steps_per_epoch = max(len(train_batcher), 1)
        #: epochs to run: ``train.epochs``, or more when ``train.min_steps`` asks for more updates
        self.epochs = max(cfg.epochs, -(-cfg.min_steps // self.steps_per_epoch))
        self.total_steps = self.steps_per_epoch * self.epochs
        self.max_steps = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        lrd = cfg.lr_final_fraction ** (1.0 / max(self.total_steps, 1))
        self.loss_module = elbo_module(module)
        self.forward = wrap(self.loss_module) if wrap is not None else self.loss_module
        self.all_reduce = all_reduce
        self.optim = ClampAdam(param_groups(module, cfg), cfg.clip_norm, lrd)
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        self.start_epoch = 0
        self.best_val = math.inf
        self.best_state = None
        self.bad_epochs = 0
        #: epoch after which z_pert is rotated to the sparse basis (None: no rotation in training)
        rotate_epoch = math.ceil(cfg.rotate_at * self.epochs)
        self.rotate_epoch = rotate_epoch if module.rotatable and rotate_epoch < self.epochs else None
        self.rotated = False
        #: model.gene_interactions: kappa held through training and fitted alone after it
        self.interactions_last = module.cfg.gene_interactions_held and cfg.interaction_steps > 0
        if module.cfg.gene_interactions_held:  # held until the last phase, or until the rotation
            module.hold_gene_interactions(self.interactions_last or self.rotate_epoch is not None)

    def rotate_to_sparse_effects(self, epoch: int) -> None:
        """Rotate z_pert to the basis of the sparsest effects and go on training in it. Adam's
        moments belong to the old basis and are dropped; the best-validation state restarts, so
        the module kept at the end is a rotated one."""
        _, before, after = self.module.rotate_to_sparse_effects(seed=self.cfg.seed)
        self.optim.opt.state.clear()
        self.best_val, self.best_state, self.bad_epochs = math.inf, None, 0
        self.rotated = True
        if self.module.cfg.gene_interactions_held and not self.interactions_last:
            self.module.hold_gene_interactions(False)
        log.info("epoch %d: rotated z_pert to the sparsest effects (sum |delta| %.2f -> %.2f); training goes on",
                 epoch, before, after)

    def step(self, args) -> float:
        """One optimisation step; returns the -ELBO estimate of the batch (full-data scale),
        averaged over ranks in data-parallel training."""
        loss = self.forward(*args, n_cells=self.n_cells)
        loss.backward()
        self.optim.step()
        loss = loss.detach()
        if self.all_reduce is not None:
            loss = self.all_reduce(loss)
        return float(loss)

    @staticmethod
    def cells_in(args) -> int:
        return args[0].shape[0]

    def diagnostics(self, args) -> dict[str, float]:
        """The ELBO's parts on the epoch's last batch (for the metrics and the progress bar)."""
        return elbo_parts(self.module, args, self.n_cells)

    def evaluate_loss(self, args) -> float:
        return float(self.loss_module(*args, n_cells=self.n_cells))

    # ---- schedules -------------------------------------------------------------------
    def kl_weight(self, epoch: float) -> float:
        return kl_weight_at(self.cfg, epoch)

    def temperature(self, step: int) -> float:
        return temperature_at(self.cfg, step, self.total_steps)

    def batch_args(self, batch, step: int, epoch_float: float):
        device = batch.x.device
        return (batch.x, batch.u, batch.x_ctrl,
                torch.tensor(self.kl_weight(epoch_float), device=device),
                torch.tensor(self.temperature(step), device=device))

    # ---- checkpoints -----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    def save_checkpoint(self, epoch: int) -> None:
        if self.checkpoint_path is None:
            return
        atomic_torch_save({
            "epoch": epoch,
            "module": self.module.state_dict(),
            "optim": self.optim.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
            "best_val": self.best_val,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "rotated": self.rotated,
            "train_config": asdict(self.cfg),
            "signature": self.signature,
        }, self.checkpoint_path)

    def try_resume(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.exists():
            log.warning("resume=true but no checkpoint at %s: starting from scratch", path)
            return False
        ckpt = load_checkpoint(path)
        differences = signature_differences(ckpt.get("signature", {}), self.signature)
        if differences:
            raise TrainingError(f"cannot resume from {path}: the run was started with other settings "
                                f"({'; '.join(differences)}). Resume with the original settings (only "
                                f"{', '.join(RESUMABLE_TRAIN_KEYS)} may change) or start a new run directory.")
        self.module.load_state_dict(ckpt["module"])
        pyro.clear_param_store()
        self.optim.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.history = ckpt["history"]
        self.best_val, self.best_state, self.bad_epochs = ckpt["best_val"], ckpt["best_state"], ckpt["bad_epochs"]
        self.rotated = ckpt.get("rotated", False)
        self.start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s at epoch %d", path, self.start_epoch)
        return True

    # ---- loop ------------------------------------------------------------------------
    def validation_loss(self, epoch: int) -> float:
        """Mean negative ELBO per cell over the validation batches (final KL weight, no
        alignment factor)."""
        total, cells = 0.0, 0
        self.val_batcher.set_epoch(0)  # the same validation pairing every epoch
        step = self.total_steps
        # eval mode, fixed Monte-Carlo noise: comparable across epochs, training untouched
        with evaluating(self.module, seed=self.cfg.seed + 12345):
            for batch in self.val_batcher:
                # without the alignment factor: a noisy batch statistic, not a fit to the cells
                x, u, _, kl, temp = self.batch_args(batch, step, float(self.cfg.kl_warmup_epochs))
                args = (x, u, None, kl, temp)
                # scaled like the training loss: per-cell local terms + global KL / n_cells
                total += self.evaluate_loss(args) * batch.x.shape[0] / self.n_cells
                cells += batch.x.shape[0]
        return total / max(cells, 1)

    @property
    def device(self) -> torch.device:
        return self.module.slab_loc.device

    def fail_on_nonfinite(self, loss: float, batch, args, epoch: int, step: int) -> None:
        if math.isfinite(loss):
            return
        parts = elbo_parts(self.module, args, self.n_cells)
        bad = [k for k, v in parts.items() if not math.isfinite(v)] or ["(gradient or parameter update)"]
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            epoch_kept = load_checkpoint(self.checkpoint_path)["epoch"]
            kept = (f"; the last good checkpoint (epoch {epoch_kept}) is kept at {self.checkpoint_path} "
                    "(resume with train.resume=true after changing nothing but train.epochs)")
        elif self.checkpoint_path is not None:
            kept = "; no checkpoint was written before the failure, so there is nothing to resume from"
        else:
            kept = ""
        raise TrainingError(
            f"non-finite loss ({loss}) at epoch {epoch}, step {step}: bad term(s) {bad} "
            f"(parts per cell: {parts}). Try a smaller train.lr or check the input counts{kept}.")

    def fit(self) -> list[dict]:
        """Train (or resume); returns the per-epoch history. A non-finite loss raises
        ``TrainingError`` (Pyro's own NaN warnings are silenced: the error says more)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(NaN|nan|inf).*", category=UserWarning)
            return self._fit()

    def _fit(self) -> list[dict]:
        cfg = self.cfg
        pyro.enable_validation(cfg.validate_args)
        if cfg.resume:
            self.try_resume()
        else:
            pyro.clear_param_store()
        metrics_path = self.run_dir / "metrics.csv" if self.run_dir else None
        if self.epochs > cfg.epochs:
            log.info("train.min_steps=%d: %d epochs of %d steps instead of train.epochs=%d",
                     cfg.min_steps, self.epochs, self.steps_per_epoch, cfg.epochs)
        bar = tqdm(range(self.start_epoch, self.epochs), desc="PerturbedVAE", disable=not cfg.progress,
                   initial=self.start_epoch, total=self.epochs, unit="epoch")
        step = self.start_epoch * self.steps_per_epoch
        for epoch in bar:
            if step >= self.max_steps:
                break
            t0 = time.perf_counter()
            self.train_batcher.set_epoch(epoch)
            epoch_loss, cells = 0.0, 0
            last_args = None
            for i, batch in enumerate(self.train_batcher):
                if step >= self.max_steps:
                    break
                args = self.batch_args(batch, step, epoch + i / self.steps_per_epoch)
                loss = self.step(args)
                self.fail_on_nonfinite(loss, batch, args, epoch, step)
                self.step_losses.append(loss / self.n_cells)
                epoch_loss += loss * self.cells_in(args) / self.n_cells
                cells += self.cells_in(args)
                last_args = args
                step += 1
            val = self.validation_loss(epoch) if self.val_batcher is not None and len(self.val_batcher) else math.nan
            parts = self.diagnostics(last_args) if last_args else {}
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": epoch_loss / max(cells, 1), "val_loss": val,
                   "kl_weight": self.kl_weight(epoch + 1), "temperature": self.temperature((epoch + 1) * self.steps_per_epoch),
                   "seconds": seconds, "cells_per_s": cells / seconds,
                   **{f"batch_{k}": v for k, v in parts.items()}}
            self.history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.1f}", val=f"{val:.1f}", recon=f"{parts.get('recon', 0):.1f}",
                            kl=f"{parts.get('kl_local', 0):.2f}", align=f"{parts.get('alignment', 0):.3f}")
            if metrics_path is not None:
                write_metrics(metrics_path, self.history)
            # early stopping on the validation loss; the best module is restored at the end
            if math.isfinite(val) and epoch + 1 >= cfg.kl_warmup_epochs:
                if not math.isfinite(self.best_val) or val < self.best_val - 1e-4 * abs(self.best_val):
                    self.best_val, self.bad_epochs = val, 0
                    self.best_state = {n: t.detach().cpu().clone() for n, t in self.module.state_dict().items()}
                else:
                    self.bad_epochs += 1
            stop = self.bad_epochs >= cfg.early_stopping_patience and epoch + 1 >= cfg.min_epochs and step >= cfg.min_steps
            if self.rotate_epoch is not None and not self.rotated and (epoch + 1 >= self.rotate_epoch or stop):
                self.rotate_to_sparse_effects(epoch)
                stop = False  # an early stop waits for the rotated basis' own patience
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == self.epochs:
                self.save_checkpoint(epoch)
            if stop:
                log.info("early stopping at epoch %d (no validation improvement for %d epochs)", epoch, self.bad_epochs)
                self.save_checkpoint(epoch)
                break
        bar.close()
        if self.best_state is not None and cfg.restore_best:
            self.module.load_state_dict(self.best_state)
        if self.interactions_last:
            self.fit_gene_interactions()
        return self.history

    def fit_gene_interactions(self) -> None:
        """``model.gene_interactions``, the last phase: the pairs' kappa and their scale b_I are
        fitted alone for ``train.interaction_steps`` steps (fresh Adam at the global learning
        rate, decaying to ``lr_final_fraction`` of it), every other parameter frozen: kappa take
        what the fitted model leaves over on the training pairs, b_I their spread, and nothing
        else moves. In data-parallel training kappa's gradients are averaged over the ranks."""
        cfg, module = self.cfg, self.module
        params = module.gene_interaction_parameters()
        ids = {id(p) for p in params}
        frozen = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
        saved = self.optim, self.forward
        steps = cfg.interaction_steps
        self.optim = ClampAdam([{"params": params, "lr": cfg.batch_lr * cfg.global_lr_multiplier}], cfg.clip_norm,
                               cfg.lr_final_fraction ** (1.0 / steps))
        hooks = []
        if self.forward is not self.loss_module:  # DDP: its hooks expect the frozen parameters too
            self.forward = self.loss_module
            hooks = [p.register_hook(self.all_reduce) for p in params] if self.all_reduce is not None else []
        module.hold_gene_interactions(False)
        for p in frozen:
            p.requires_grad_(False)
        t0, step, epoch, losses = time.perf_counter(), 0, self.epochs, []
        try:
            with warnings.catch_warnings():  # pyro.module names every frozen parameter it skips
                warnings.filterwarnings("ignore", message=r".*not registered in the param store because requires_grad")
                while step < steps and len(self.train_batcher):
                    self.train_batcher.set_epoch(epoch)
                    for batch in self.train_batcher:
                        if step >= steps:
                            break
                        losses.append(self.step(self.batch_args(batch, self.total_steps, float(self.epochs))))
                        step += 1
                    epoch += 1
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for h in hooks:
                h.remove()
            self.optim, self.forward = saved
        if losses:
            log.info("fitted the pairs' gene-level interactions alone: %d steps in %.1f s, b_I %.3f, loss per cell "
                     "%.1f -> %.1f", step, time.perf_counter() - t0, float(module.gene_pair_scale_loc.detach().exp()),
                     sum(losses[:10]) / len(losses[:10]) / self.n_cells, sum(losses[-10:]) / len(losses[-10:]) / self.n_cells)


def write_metrics(path: Path, history: list[dict]) -> None:
    import pandas as pd

    atomic_write_csv(path, pd.DataFrame(history))


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Training and validation loss per epoch, and the ELBO parts, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2)
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train -ELBO/cell")
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="validation -ELBO/cell")
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("loss per cell"), axes[0].legend()
    for key in ("batch_kl_local", "batch_kl_global", "batch_alignment"):
        if key in history[0]:
            axes[1].plot(epochs, [r[key] for r in history], label=key.replace("batch_", ""))
    axes[1].set_xlabel("epoch"), axes[1].set_ylabel("per cell"), axes[1].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
