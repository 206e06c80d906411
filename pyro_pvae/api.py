"""User-facing API: ``PerturbedVAE`` (fit / predict / effects / save / load) and ``load_run``.

>>> from pyro_pvae import PerturbedVAE, datasets
>>> adata = datasets.norman19_subset()
>>> vae = PerturbedVAE(adata, split="complete_doubles").fit(epochs=50)
>>> pred = vae.predict(["KLF1+MAP2K6"], n_cells=200)      # AnnData of predicted cells
>>> vae.effects().query("lfsr < 0.05")                      # effects whose sign the data pin down
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from . import data as D
from .config import ModelConfig, TrainConfig
from .metrics import IntervalCalibration
from .model import PerturbedVAEModule, sample_globals
from .train import Trainer, TrainingError, load_checkpoint, plot_training_curves, resolve_device
from .utils import atomic_torch_save, lognormalize, to_dense

log = logging.getLogger(__name__)

#: the training cells kept (with the model) for predictions to start from
N_REFERENCE_CELLS = 2000


class PerturbedVAE:
    """PerturbedVAE fitted by amortised SVI.

    Parameters
    ----------
    adata : canonical AnnData (see :func:`pyro_pvae.data.read_perturbseq`), counts in ``X``.
    split : a :class:`~pyro_pvae.data.Split`, a split name (``"norman_discrepancy"``,
        ``"combo_seen"``, ``"complete_doubles"``, ``"iid"``) or ``None`` (train on all cells,
        keeping a small validation share).
    model : dict or :class:`ModelConfig` of sizes and priors; ``train``: dict or
        :class:`TrainConfig`.
    """

    def __init__(self, adata: ad.AnnData | None = None, split=None, model: dict | ModelConfig | None = None,
                 train: dict | TrainConfig | None = None, split_kwargs: dict | None = None):
        self.model_config = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(dict(model or {}))
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(dict(train or {}))
        self.adata = adata
        self.split = None
        self.history: list[dict] = []
        self.genes_without_counts: list[str] = []  # set from the training cells' counts
        #: mean log library size of the training cells (the library-size model's start; a loaded
        #: run takes it from the module's state)
        self.training_log_library = 0.0
        self.module: PerturbedVAEModule | None = None
        self.training_pairs: list[tuple[int, int]] = []
        self.trained_singles: list[str] = []
        self.interval_calibration: IntervalCalibration | None = None
        if adata is not None:
            self._prepare(adata, split, split_kwargs or {})

    # ---- setup -------------------------------------------------------------------------
    def _prepare(self, adata, split, split_kwargs):
        # the readers' checks and messages; cells with zero counts are dropped (logged) unless a
        # ready-made Split's positions refer to them
        adata = D.validate_canonical(adata, drop_empty=not isinstance(split, D.Split))
        self.adata = adata
        seed = self.train_config.seed
        if isinstance(split, str):
            split = D.make_split(adata, split, seed, **split_kwargs)
        elif split is None:
            split = _all_cells_split(adata, seed)
        self.split = split
        self.vocabulary = D.perturbation_vocabulary(adata, split.train_idx)
        self.gene_names = list(map(str, adata.var_names))
        cond = adata.obs["condition"].astype(str).to_numpy()
        train_idx = np.asarray(split.train_idx)
        self.control_idx = train_idx[cond[train_idx] == D.CONTROL]
        #: targets seen alone in training (a double of others is predicted from doubles only)
        self.trained_singles = sorted({c for c in set(cond[train_idx]) if len(D.parse_condition(c)) == 1}
                                      - {D.CONTROL})
        if len(self.control_idx) == 0:
            raise D.DataError("the training split has no control cells; they are needed for alignment and prediction")
        index = {p: i for i, p in enumerate(self.vocabulary)}
        self.training_pairs = sorted({tuple(sorted(index[t] for t in D.parse_condition(c)))
                                      for c in set(cond[train_idx]) if len(D.parse_condition(c)) == 2
                                      and all(t in index for t in D.parse_condition(c))})
        #: genes with no count in any training cell: they carry no information, and the model
        #: predicts them near zero (the shipped real subset, default split: 276 of its 500 genes)
        gene_totals, self.training_log_library = self._scan_training_cells()
        self.genes_without_counts = [g for g, t in zip(self.gene_names, gene_totals) if t == 0]
        if self.genes_without_counts:
            log.warning("%d of %d genes have no count in any training cell (e.g. %s): the fit learns nothing "
                        "about them and predicts them near zero; genes that no cell expresses are best dropped "
                        "first (data.min_cells=1 on the command line, or pyro_pvae.data.filter_genes(adata, 1))",
                        len(self.genes_without_counts), len(self.gene_names), ", ".join(self.genes_without_counts[:3]))
        pool = train_idx if self.model_config.prediction_start == "training" else self.control_idx
        ref = np.sort(np.random.default_rng(seed).choice(pool, size=min(N_REFERENCE_CELLS, len(pool)), replace=False))
        #: the cells predictions start from (``model.prediction_start``): counts and multi-hot labels
        self.reference_cells = sp.csr_matrix(adata.X[ref], dtype=np.float32)
        self.reference_labels = sp.csr_matrix(self.perturbation_matrix(cond[ref]), dtype=np.float32)
        self.build_module()

    def build_module(self) -> PerturbedVAEModule:
        """A freshly initialised module (seeded with ``train.seed``) for these genes and perturbations."""
        torch.manual_seed(self.train_config.seed)
        library = self.training_log_library if self.model_config.library_model else 0.0
        self.module = PerturbedVAEModule(self.model_config, n_genes=len(self.gene_names),
                                         n_perts=len(self.vocabulary), pairs=self.training_pairs,
                                         init_gate_prob=self.train_config.init_gate_prob,
                                         library_log_mean=library)
        return self.module

    def _scan_training_cells(self, chunk: int = 20000) -> tuple[np.ndarray, float]:
        """One pass over the training cells' counts, ``chunk`` rows at a time (a backed AnnData is
        read block by block): each gene's total count and the mean log library size."""
        idx = np.sort(np.asarray(self.split.train_idx))
        gene_totals, log_library = np.zeros(self.adata.n_vars), []
        for s in range(0, len(idx), chunk):
            block = self.adata.X[idx[s:s + chunk]]
            gene_totals += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
            log_library.append(np.log(np.maximum(D.library_size(block), 1.0)))
        return gene_totals, float(np.concatenate(log_library).mean())

    @property
    def device(self) -> torch.device:
        return self.module.slab_loc.device

    # ---- training ----------------------------------------------------------------------
    def fit(self, run_dir: str | Path | None = None, **train_overrides) -> "PerturbedVAE":
        """Fit by SVI on the training split; ``train_overrides`` update the train config
        (e.g. ``epochs=50``). Writes checkpoints and metrics into ``run_dir`` when given."""
        if self.adata is None:
            raise RuntimeError("PerturbedVAE was created without data; pass an AnnData to the constructor")
        self.train_config = TrainConfig.from_dict({**asdict(self.train_config), **train_overrides})
        cfg = self.train_config
        pyro.set_rng_seed(cfg.seed)
        self.build_module()
        device = resolve_device(cfg.device)
        self.module.to(device)
        train_b = D.make_batcher(self.adata, cell_idx=self.split.train_idx, vocabulary=self.vocabulary,
                                 control_idx=self.control_idx, batch_size=min(cfg.batch_size, len(self.split.train_idx)),
                                 device=device, seed=cfg.seed, shuffle=True, drop_last=True)
        val_b = None
        if len(self.split.val_idx):
            val_b = D.make_batcher(self.adata, cell_idx=self.split.val_idx, vocabulary=self.vocabulary,
                                   control_idx=self.control_idx, batch_size=max(cfg.batch_size, 512),
                                   device=device, seed=cfg.seed + 1, shuffle=False, drop_last=False)
        if run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.split.to_json(run_dir / "split.json")
        trainer = Trainer(self.module, train_b, val_b, cfg, run_dir, signature=self._signature())
        log.info("training on %d cells x %d genes, %d perturbations, device %s",
                 train_b.n_cells, self.adata.n_vars, len(self.vocabulary), device)
        self.history = trainer.fit()
        self.module.eval()
        self._rotate_if_configured()
        if run_dir is not None:
            self.save(run_dir / "model.pt")
            if self.history:
                plot_training_curves(self.history, run_dir / "training_curves.png")
        return self

    def _signature(self) -> dict:
        """What shapes the model and its data (a resumed run must match it)."""
        import hashlib

        genes = hashlib.sha1("\n".join(self.gene_names).encode()).hexdigest()[:12]
        return {"model": asdict(self.model_config),
                "data": {"n_genes": len(self.gene_names), "genes_sha1": genes, "perturbations": list(self.vocabulary),
                         "train_cells": len(self.split.train_idx), "split": f"{self.split.name} (seed {self.split.seed})"}}

    def __repr__(self) -> str:
        cfg = self.model_config
        lines = [f"PerturbedVAE: {cfg.latent_pert} perturbation + {cfg.latent_inv} invariant latents, "
                 f"effect prior {cfg.effect_prior}, likelihood {cfg.likelihood}, alignment {cfg.alignment} "
                 f"(alpha {cfg.alpha})" + (", library-size model" if cfg.library_model else "")]
        if self.module is not None:
            lines.append(f"  {len(self.gene_names)} genes, {len(self.vocabulary)} perturbations in the vocabulary")
        if self.adata is not None:
            lines.append(f"  data: {self.adata.n_obs} cells x {self.adata.n_vars} genes")
        if self.split is not None:
            lines.append(f"  split {self.split.name}: {len(self.split.train_idx)} train / {len(self.split.val_idx)} "
                         f"validation / {len(self.split.test_idx)} test cells")
        lines.append(f"  fitted: {len(self.history)} epochs" if self.history else "  not fitted")
        return "\n".join(lines)

    def _rotate_if_configured(self) -> None:
        """``model.sparse_rotation``: rotate after a fit (skipped, with a warning, for
        straight-through gates, whose basis is fixed by the fitted gates)."""
        if self.module.rotatable:
            self.rotate_to_sparse_effects()
        elif self.model_config.sparse_rotation:
            log.warning("model.sparse_rotation is ignored with gate_inference='straight_through'")

    @torch.no_grad()
    def rotate_to_sparse_effects(self, n_restarts: int = 16) -> np.ndarray:
        r"""Re-express the fitted model in the z_pert basis where the effects are sparsest.

        With shift interventions the likelihood cannot tell ``z_pert`` from ``M z_pert`` for
        ``M = O (I - W)``, ``O`` orthogonal: the DAG folds into the decoder and ``O`` rotates
        ``eps`` (still N(0, I)) and every ``delta_p``. ``O`` is chosen by
        :func:`~pyro_pvae.model.sparse_rotation` and the module rewritten exactly by
        :meth:`~pyro_pvae.model.PerturbedVAEModule.rotate_latents`. Returns ``M``.
        Only for the marginal spike-and-slab and the dense prior (not straight-through gates).
        (Training already rotates once, at ``train.rotate_at``, and lets the prior polish the
        rotated effects; this final rotation keeps the sparsest basis of the end state.)"""
        if self.model_config.gate_sites:
            raise ValueError("rotate_to_sparse_effects needs model.gate_inference='marginal' (or the dense prior): "
                             "straight-through gates are tied to the fitted basis")
        M, before, after = self.module.rotate_to_sparse_effects(n_restarts, seed=self.train_config.seed)
        log.info("rotated z_pert to the sparsest effects: sum |delta| %.2f -> %.2f", before, after)
        return M.cpu().numpy()

    # ---- prediction -----------------------------------------------------------------------
    def perturbation_matrix(self, conditions, unknown: str = "error") -> np.ndarray:
        return D.perturbation_matrix(conditions, self.vocabulary, unknown=unknown)

    def _global_draws(self, n_draws: int, posterior_mean: bool = False) -> list[dict[str, torch.Tensor]]:
        """``n_draws`` draws of the global sites (or their posterior mean, the same dict ``n_draws``
        times), one dict each."""
        if posterior_mean:
            return [self.module.global_means()] * n_draws
        draws = sample_globals(self.module, n_draws)
        return [{k: v[s] for k, v in draws.items()} for s in range(n_draws)]

    def _start_block(self, n_cells: int, rng: np.random.Generator):
        """``n_cells`` reference cells drawn with replacement: counts, their own labels, rows."""
        rows = rng.integers(0, self.reference_cells.shape[0], size=n_cells)
        as_tensor = lambda m: torch.as_tensor(m[rows].toarray(), device=self.device)  # noqa: E731
        return as_tensor(self.reference_cells), as_tensor(self.reference_labels), rows

    def _condition_rows(self, condition: str, n_cells: int, unknown: str) -> torch.Tensor:
        u_row = self.perturbation_matrix([condition], unknown=unknown)[0]
        return torch.as_tensor(np.repeat(u_row[None], n_cells, 0), device=self.device)

    @torch.no_grad()
    def predict(self, conditions, n_cells: int = 100, seed: int = 0, unknown: str = "error",
                posterior_mean: bool = False, n_draws: int = 1) -> ad.AnnData:
        """Predicted cells for each condition (``"KLF1"``, ``"BAK1+KLF1"``, ``"control"``).

        Each predicted cell starts from a randomly drawn reference cell (a training cell, or a
        training control with ``model.prediction_start="controls"``): its z_inv, eps and library
        size, encoded under its own label, are kept, and it is drawn from the model under the condition, with one
        posterior draw of the global sites per condition (``posterior_mean=True``: their
        mean). ``n_draws > 1`` splits each condition's cells into that many blocks, each with
        its own posterior draw: the cells are then draws from the posterior predictive, and
        their mean approaches the posterior predictive mean (the point prediction the
        benchmark scores). Returns an AnnData with predicted counts in ``X``, ``layers['lognorm']`` and
        ``obs['condition']``. ``unknown='ignore'`` lets genes absent from training contribute
        no effect."""
        conditions = [D.format_condition(D.parse_condition(c)) for c in _as_list(conditions)]
        if not conditions:
            raise ValueError("predict() needs at least one condition, e.g. ['KLF1'] or ['KLF1+MAP2K6']")
        _check_positive(n_cells=n_cells, n_draws=n_draws)
        if posterior_mean and n_draws > 1:
            raise ValueError("predict(): posterior_mean=True uses the posterior mean once; n_draws must be 1")
        self.perturbation_matrix(conditions, unknown=unknown)  # unknown genes fail before any work
        self._warn_about_unseen_singles(conditions)
        rng = np.random.default_rng(seed)
        self.module.eval()
        blocks, obs = [], []
        novel = "mean" if posterior_mean else "draw"
        sizes = _draw_blocks(n_cells, n_draws)
        with _seeded(seed, self.device):
            for cond in conditions:
                for size in sizes:
                    glob = self._global_draws(1, posterior_mean)[0]
                    x_start, u_start, rows = self._start_block(int(size), rng)
                    u = self._condition_rows(cond, int(size), unknown)
                    blocks.append(self.module.sample_cells(x_start, u, glob, novel_pairs=novel,
                                                           u_start=u_start).cpu().numpy())
                    obs.append(pd.DataFrame({"condition": cond, "start_cell": rows}))
        X = np.concatenate(blocks).astype(np.float32)
        obs = pd.concat(obs, ignore_index=True)
        obs.index = [f"pred_{i}" for i in range(len(obs))]
        obs["condition"] = obs["condition"].astype("category")
        return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=self.gene_names),
                          layers={"lognorm": sp.csr_matrix(lognormalize(X))})

    @torch.no_grad()
    def predict_mean(self, conditions, n_cells: int = 4000, n_draws: int = 50, seed: int = 0,
                     unknown: str = "error", scale: str = "lognorm", posterior_mean: bool = False) -> pd.DataFrame:
        """The posterior predictive mean profile of each condition (rows; columns = genes): the
        average over ``n_cells`` predicted cells spread over ``n_draws`` posterior draws of the
        globals, without keeping the cells. ``scale="lognorm"``: mean of ``log1p(1e4 x / l)``
        (``predict``'s ``layers['lognorm']``); ``"pseudobulk"``: ``log1p(1e6 sum x / sum l)``.

        This is the model's point prediction. From ``predict``'s few hundred cells the mean
        carries their sampling noise (shallow cells: a single's held-out Pearson delta 0.28 from
        200 cells, 0.31 from 2,000 or 10,000; analyses/point_prediction_noise.py). Every condition of a draw starts from the same
        reference cells and the same draw of their local latents (common random numbers),
        so the noise of a change between two rows (e.g. a condition and ``"control"``) is
        smaller still. ``posterior_mean=True``: every block uses the globals' posterior mean
        instead of a draw (a plug-in prediction, as ``predict``'s; not the predictive mean)."""
        conditions = list(dict.fromkeys(D.format_condition(D.parse_condition(c)) for c in _as_list(conditions)))
        if not conditions:
            raise ValueError("predict_mean() needs at least one condition, e.g. ['KLF1', 'control']")
        if scale not in ("lognorm", "pseudobulk"):
            raise ValueError(f"predict_mean(): scale must be 'lognorm' or 'pseudobulk', got {scale!r}")
        _check_positive(n_cells=n_cells, n_draws=n_draws)
        u_rows = torch.as_tensor(self.perturbation_matrix(conditions, unknown=unknown), device=self.device)
        sizes = _draw_blocks(n_cells, n_draws)
        G = len(self.gene_names)
        sums = torch.zeros(len(conditions), G, dtype=torch.float64, device=self.device)
        rng = np.random.default_rng(seed)
        self.module.eval()
        with _seeded(seed, self.device):
            for size, glob in zip(sizes, self._global_draws(len(sizes), posterior_mean)):
                x_start, u_start, _ = self._start_block(int(size), rng)
                # the conditions in one batch of cells, at most ~2^24 values at a time
                step = max(1, (1 << 24) // (int(size) * G))
                for lo in range(0, len(conditions), step):
                    u = u_rows[lo:lo + step].repeat_interleave(int(size), 0)
                    x = self.module.sample_cells(x_start, u, glob, u_start=u_start)  # the same local latents for every condition
                    x = lognormalize(x) if scale == "lognorm" else x
                    sums[lo:lo + step] += x.reshape(-1, int(size), G).sum(1).double()
        prof = sums / n_cells if scale == "lognorm" else lognormalize(sums, 1e6)
        return pd.DataFrame(prof.cpu().numpy(), index=pd.Index(conditions, name="condition"),
                            columns=pd.Index(self.gene_names))

    def _warn_about_unseen_singles(self, conditions) -> list[str]:
        """Log which conditions have a target never seen alone in training (its effect was
        learned only inside other doubles, or not at all); returns those conditions."""
        singles = set(self.trained_singles)
        odd = [c for c in conditions if c != D.CONTROL and not set(D.parse_condition(c)) <= singles]
        if odd:
            log.warning("predicting %d condition(s) with a target never seen alone in training (its effect "
                        "comes only from doubles, or is absent): %s", len(odd), ", ".join(odd[:10]))
        return odd

    @torch.no_grad()
    def predict_change_samples(self, condition: str, n_draws: int = 100, n_cells: int = 100, seed: int = 0,
                               unknown: str = "error", n_control_cells: int | None = None,
                               calibrated: bool = False) -> np.ndarray:
        """Posterior predictive draws (n_draws x genes) of the condition's pseudobulk change of
        log-normalised expression from control, each from one global posterior draw, ``n_cells``
        predicted cells of the condition and the model's own predicted control cells.

        For calibrated intervals of an observed change (mean of ``n`` cells minus the mean of
        ``m`` reference control cells) pass ``n_cells=n, n_control_cells=m``: the control block
        is then drawn independently from other starting cells, so both sampling noises are in
        the draws. ``n_control_cells=None`` uses the same starting cells for both blocks (the
        change of the same cells, without the reference's noise). ``calibrated=True`` stretches
        the draws by :meth:`calibrate_intervals`' fit (run it first)."""
        _check_positive(n_cells=n_cells)
        if calibrated and getattr(self, "interval_calibration", None) is None:
            raise ValueError("predict_change_samples(calibrated=True): no interval calibration; call "
                             "calibrate_intervals() first (it needs training doubles)")
        draws = self.predict_change_draws({condition: [n_cells]}, n_draws, seed, unknown, n_control_cells)[condition][0]
        return self.interval_calibration.apply(draws).astype(np.float32) if calibrated else draws

    def calibrate_intervals(self, n_draws: int = 50, seed: int = 0, level: float = 0.9, min_cells: int = 20,
                            max_pairs: int = 100, cross_fit: bool = True) -> IntervalCalibration | None:
        """Calibrate the predictive intervals of unseen pairs on the training pairs
        (:class:`~pyro_pvae.metrics.IntervalCalibration`). Each training double with at least
        ``min_cells`` training cells is predicted as unseen and its training cells are split in
        two seeded halves, as the benchmark does with held-out cells: the top-20 genes are the
        first half's top DE genes against the training controls (the benchmark's t-test,
        :func:`~pyro_pvae.metrics.top_de_genes`), and the draws (for the second half's number of
        cells, against the training controls) are compared with the second half's observed change
        (mean log-normalised expression minus that of the training controls).

        ``cross_fit`` (default): a copy of the model is refitted without up to half of these
        pairs (:meth:`calibration_model`) and calibrated on them, which it has never seen (one
        more fit; on few pairs, few or none can be held out). Without it the
        model is calibrated on all of them with their own interaction drawn from the fitted prior
        (:meth:`PerturbedVAEModule.pairs_as_unseen`): fast, but optimistic, because those pairs
        also shaped the fit. Stored as ``self.interval_calibration`` (used by
        ``predict_change_samples(..., calibrated=True)`` and saved with the model); None when
        training has no such double."""
        from functools import cache

        from .metrics import top_de_genes

        X = self.adata.X
        cells = lambda g: np.asarray(lognormalize(np.asarray(to_dense(X[np.sort(g)]))))  # noqa: E731

        @cache  # the training controls, log-normalised once and only when there are pairs to calibrate on
        def controls():
            ctrl = cells(self.control_idx)
            return ctrl, ctrl.mean(0)

        def changes(groups):  # mean log-normalised expression minus that of the training controls
            return [cells(g).mean(0) - controls()[1] for g in groups]

        def top_genes(groups):  # the benchmark's top-20 DE genes of each group, as 0/1 per gene
            return [np.isin(self.gene_names, top_de_genes(cells(g), controls()[0], self.gene_names)).astype(float)
                    for g in groups]

        def draws(source, n_cells):
            d = source.predict_change_draws({c: [n] for c, n in n_cells.items()}, n_draws=n_draws, seed=seed,
                                            n_control_cells=len(self.control_idx))
            return [d[c][0] for c in n_cells]

        self.interval_calibration = self.calibrate_on_pairs(changes, draws, seed, level, min_cells, max_pairs, cross_fit,
                                                            select=top_genes)
        return self.interval_calibration

    def calibrate_on_pairs(self, changes, draws, seed: int = 0, level: float = 0.9, min_cells: int = 20,
                           max_pairs: int = 100, cross_fit: bool = True, select=None) -> IntervalCalibration | None:
        """The steps of :meth:`calibrate_intervals` on any scale: ``changes(groups)`` gives the
        observed change of each group of cell positions, ``draws(model, {pair: n_cells})`` the
        change draws (draws x genes) of each pair, in order, for that many cells (called inside
        :meth:`PerturbedVAEModule.pairs_as_unseen`), ``select(groups)`` a per-gene score whose
        largest |values| are each group's top genes (default ``changes``: the largest |change|),
        given each pair's first half. Returns the calibration (not stored)."""
        candidates = self.calibration_pairs(min_cells, max_pairs)
        source, pairs = self.calibration_model(candidates, seed, cross_fit)
        if not pairs:
            if not candidates:
                log.info("no training double with >= %d cells: intervals left uncalibrated", min_cells)
            return None
        cond = self.adata.obs["condition"].astype(str).to_numpy()
        train_idx = np.asarray(self.split.train_idx)
        halves = _halves({c: train_idx[cond[train_idx] == c] for c in pairs}, seed)
        observed = changes([halves[c][1] for c in pairs])
        chosen_by = (select or changes)([halves[c][0] for c in pairs])
        with source.module.pairs_as_unseen():
            drawn = draws(source, {c: len(halves[c][1]) for c in pairs})
        cal = IntervalCalibration.fit(drawn, observed, level=level, select=chosen_by)
        log.info("intervals calibrated on %d training pairs%s: k %.2f, gamma %.2f (coverage there %.2f -> %.2f, "
                 "top-20 %.2f -> %.2f)", len(pairs), " (cross-fitted)" if cross_fit else "", cal.k, cal.gamma,
                 cal.coverage_before, cal.coverage_after, cal.coverage_top_before, cal.coverage_top_after)
        return cal

    def calibration_pairs(self, min_cells: int = 20, max_pairs: int = 100) -> list[str]:
        """Training doubles with at least ``min_cells`` training cells whose targets the model knows."""
        cond = self.adata.obs["condition"].astype(str).to_numpy()
        counts = pd.Series(cond[np.asarray(self.split.train_idx)]).value_counts()
        vocab = set(self.vocabulary)
        return [c for c, n in counts.items() if n >= min_cells and len(D.parse_condition(c)) == 2
                and set(D.parse_condition(c)) <= vocab][:max_pairs]

    def calibration_model(self, pairs: list[str], seed: int = 0, cross_fit: bool = True):
        """The model and the training pairs to calibrate on: ``(self, pairs)``, or with
        ``cross_fit`` a copy refitted (same configs) without up to half of ``pairs`` (at least
        one; their validation cells dropped too) and those held-out pairs. The held pairs are
        taken in a seeded order among those whose targets all stay in another training
        condition (a single or a kept pair), so the copy can still predict them."""
        if not cross_fit or not pairs:
            return self, list(pairs)
        from collections import Counter
        from dataclasses import replace

        cond = self.adata.obs["condition"].astype(str).to_numpy()
        train_idx = np.asarray(self.split.train_idx)
        uses = Counter(t for c in set(cond[train_idx]) - {D.CONTROL} for t in D.parse_condition(c))
        held = []
        for c in np.random.default_rng(seed).permutation(np.asarray(pairs, dtype=object)).tolist():
            if len(held) < max(1, len(pairs) // 2) and all(uses[t] >= 2 for t in D.parse_condition(c)):
                held.append(c)
                uses.subtract(D.parse_condition(c))
        if not held:
            log.info("cross-fitted calibration: every training pair has a target trained in no other condition, "
                     "so a copy without it could not predict it; intervals left uncalibrated")
            return self, []
        held = sorted(held)
        val_idx = np.asarray(self.split.val_idx)
        split = replace(self.split, train_idx=train_idx[~np.isin(cond[train_idx], held)],
                        val_idx=val_idx[~np.isin(cond[val_idx], held)],
                        train_conditions=[c for c in self.split.train_conditions if c not in held])
        log.info("cross-fitted calibration: refitting without %d of the %d training pairs", len(held), len(pairs))
        with torch.enable_grad():  # callers may be inside no_grad
            other = PerturbedVAE(self.adata, split=split, model=self.model_config, train=self.train_config).fit()
        return other, held

    @torch.no_grad()
    def predict_change_draws(self, requests: dict, n_draws: int = 100, seed: int = 0, unknown: str = "error",
                             n_control_cells: int | None = None) -> dict[str, list[np.ndarray]]:
        """:meth:`predict_change_samples` for several conditions and cell counts at once:
        ``requests`` maps a condition to the numbers of cells its draws are for; returns, per
        condition, one (n_draws x genes) array per number. Every condition uses the same posterior
        draws and, with ``n_control_cells``, the same predicted control block per draw, as
        observed changes measured against one set of reference controls share its noise (and
        the control block, often the largest, is drawn once per draw, not once per condition)."""
        _check_positive(n_draws=n_draws, **{f"n_cells of {c}": n for c, sizes in requests.items() for n in sizes})
        if n_control_cells is not None:
            _check_positive(n_control_cells=n_control_cells)
        rows = {c: {n: self._condition_rows(c, n, unknown) for n in sizes} for c, sizes in requests.items()}
        rng = np.random.default_rng(seed)
        self.module.eval()
        out = {c: [np.empty((n_draws, len(self.gene_names)), dtype=np.float32) for _ in sizes]
               for c, sizes in requests.items()}

        def control_mean(x_start, u_start, glob):
            u0 = torch.zeros_like(u_start)
            return lognormalize(self.module.sample_cells(x_start, u0, glob, u_start=u_start)).mean(0)

        with _seeded(seed, self.device):
            for s, glob in enumerate(self._global_draws(n_draws)):
                shared = None if n_control_cells is None else control_mean(*self._start_block(n_control_cells, rng)[:2], glob)
                for c, sizes in requests.items():
                    for j, n in enumerate(sizes):
                        x_start, u_start, _ = self._start_block(n, rng)
                        pert = lognormalize(self.module.sample_cells(x_start, rows[c][n], glob, u_start=u_start)).mean(0)
                        ctrl = shared if shared is not None else control_mean(x_start, u_start, glob)
                        out[c][j][s] = (pert - ctrl).cpu().numpy()
        return out

    # ---- posterior summaries -------------------------------------------------------------
    def effects(self, n_draws: int = 500) -> pd.DataFrame:
        """Tidy posterior of delta[p, k]: mean, sd, 5%/95% quantiles, the PIP and the local false
        sign rate ``lfsr = min(P(delta > 0), P(delta < 0))`` (Stephens 2017; from the draws, so
        resolved to 1 / n_draws): the posterior probability that the sign of the effect's mean is
        wrong. Where the spike is narrower than the effects' estimation noise every PIP is near 1
        (the real subset), while the lfsr still separates the effects the data pin down."""
        with torch.no_grad():
            delta = sample_globals(self.module, n_draws)["delta"].cpu().numpy()
            pip = self.module.pip().cpu().numpy()
        P, K = pip.shape
        q05, q95 = np.quantile(delta, [0.05, 0.95], axis=0)
        positive = (delta > 0).mean(0)
        return pd.DataFrame({
            "perturbation": np.repeat(self.vocabulary, K),
            "latent": np.tile(np.arange(K), P),
            "mean": delta.mean(0).ravel(), "sd": delta.std(0).ravel(),
            "q05": q05.ravel(), "q95": q95.ravel(), "pip": pip.ravel(),
            "lfsr": np.minimum(positive, (delta < 0).mean(0)).ravel(),
        })

    def library_effects(self, n_draws: int = 500) -> pd.DataFrame:
        """Tidy posterior of each perturbation's effect lambda_p on the log library size
        (``model.library_model``): mean, sd, 5%/95% quantiles, and ``fold_change`` = exp(mean),
        the factor by which a single of p multiplies the controls' total counts. Sorted by
        |mean|, largest first."""
        if not self.model_config.library_model:
            raise ValueError("library_effects() needs a model fitted with model.library_model=true; this one keeps "
                             "each predicted cell's start depth and has no library effects")
        with torch.no_grad():
            lam = sample_globals(self.module, n_draws)["library_effect"][..., 0].cpu().numpy()  # draws x P
        q05, q95 = np.quantile(lam, [0.05, 0.95], axis=0)
        out = pd.DataFrame({"perturbation": list(self.vocabulary), "mean": lam.mean(0), "sd": lam.std(0),
                            "q05": q05, "q95": q95, "fold_change": np.exp(lam.mean(0))})
        return out.iloc[np.argsort(-np.abs(out["mean"].to_numpy()), kind="stable")].reset_index(drop=True)

    def pip(self) -> np.ndarray:
        """Posterior inclusion probabilities, perturbations x latents."""
        return self.module.pip().detach().cpu().numpy()

    def dag(self) -> np.ndarray:
        """Posterior mean of the latent DAG weights W (strictly lower triangular; zero after
        :meth:`rotate_to_sparse_effects`, which folds the DAG into the decoder)."""
        return self.module.w_mean().detach().cpu().numpy()

    @torch.no_grad()
    def latents(self, adata: ad.AnnData | None = None, idx=None, refine_steps: int = 0) -> dict[str, np.ndarray]:
        """Posterior means of z_inv and z_pert for cells of ``adata`` (default: the training data).

        ``refine_steps > 0``: each cell's posterior is refined from the encoders' output by that
        many optimisation steps of its own ELBO (semi-amortised inference,
        ``PerturbedVAEModule.refine_local_posteriors``; 100 steps converged on the simulations): closer
        to the model's posterior, at a cost linear in the cells (a progress bar per block of 4,096)."""
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("latents() needs cells: pass adata=..., or load the run with load_run(path, "
                             "with_data=True)")
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, (int, np.integer)) or refine_steps < 0:
            raise ValueError(f"latents(): refine_steps must be a whole number >= 0, got {refine_steps!r}")
        idx = np.arange(adata.n_obs) if idx is None else np.asarray(idx)
        cond = adata.obs["condition"].astype(str).to_numpy()[idx]
        U = self.perturbation_matrix(cond, unknown="ignore")
        self.module.eval()
        z_inv, z_pert = [], []
        starts = range(0, len(idx), 4096)
        for start in tqdm(starts, desc="refining posteriors", disable=refine_steps == 0 or len(starts) < 2,
                          file=sys.stderr):
            rows = idx[start:start + 4096]
            x = torch.as_tensor(to_dense(adata.X[rows]), device=self.device)
            u = torch.as_tensor(U[start:start + 4096], device=self.device)
            zi, zp = self.module.latent_means(x, u, refine_steps=refine_steps)
            z_inv.append(zi.cpu().numpy())
            z_pert.append(zp.cpu().numpy())
        return {"z_inv": np.concatenate(z_inv), "z_pert": np.concatenate(z_pert)}

    def invariant_spread(self, max_cells: int = 2000, seed: int = 0) -> float:
        """Mean over the z_inv dimensions of the across-cell sd of the posterior means m(x) of
        (up to ``max_cells``) training cells: near 0 means the invariant latents collapsed to a
        point and carry no cell state."""
        idx = np.asarray(self.split.train_idx)
        if len(idx) > max_cells:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_cells, replace=False))
        return float(self.latents(self.adata, idx)["z_inv"].std(0).mean())

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save modules, configs, vocabulary, genes, split and reference cells (atomic)."""
        path = Path(path)
        atomic_torch_save({
            "format": "pyro_pvae/4",
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.train_config),
            "module": self.module.state_dict(),
            "vocabulary": self.vocabulary,
            "training_pairs": self.training_pairs,
            "trained_singles": self.trained_singles,
            "gene_names": self.gene_names,
            "reference_cells": self.reference_cells,
            "reference_labels": self.reference_labels,
            "history": self.history,
            "split": self.split.to_dict() if self.split is not None else None,
            "interval_calibration": (None if self.interval_calibration is None
                                     else self.interval_calibration.to_dict()),
        }, path)
        return path

    @classmethod
    def load(cls, path: str | Path, adata: ad.AnnData | None = None, device: str = "cpu") -> "PerturbedVAE":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved model at {path}")
        state = load_checkpoint(path)
        if state.get("format") != "pyro_pvae/4":
            raise TrainingError(f"{path} is not a pyro_pvae model file of this version (format "
                                f"{state.get('format')!r}, expected 'pyro_pvae/4'); refit with this version")
        self = cls(model=ModelConfig.from_dict(state["model_config"]), train=TrainConfig.from_dict(state["train_config"]))
        self.vocabulary, self.gene_names = state["vocabulary"], state["gene_names"]
        self.training_pairs = [tuple(p) for p in state["training_pairs"]]
        self.trained_singles = state["trained_singles"]
        self.reference_cells, self.reference_labels = state["reference_cells"], state["reference_labels"]
        self.history = state["history"]
        self.adata = adata
        if state.get("split") is not None:
            self.split = D.Split(**state["split"])
        if state.get("interval_calibration") is not None:
            self.interval_calibration = IntervalCalibration(**state["interval_calibration"])
        self.build_module()
        self.module.load_state_dict(state["module"])
        self.module.to(resolve_device(device)).eval()
        return self


def load_run(path: str | Path, device: str = "cpu", with_data: bool = False) -> PerturbedVAE:
    """Load the fitted model of a run directory written by ``python -m pyro_pvae.fit``.
    ``with_data=True`` also re-reads the run's data set (from its resolved config)."""
    path = Path(path)
    if not (path / "model.pt").exists():
        raise FileNotFoundError(f"{path} holds no model.pt; is it a pyro_pvae run directory?")
    adata = None
    if with_data:
        from .config import load_dataset
        from omegaconf import OmegaConf
        adata = load_dataset(OmegaConf.load(path / "config.yaml"))
    return PerturbedVAE.load(path / "model.pt", adata=adata, device=device)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Run with torch's global RNG (and the device's) seeded, restoring the caller's state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _halves(cells: dict, seed: int) -> dict:
    """Each condition's cells split in two seeded halves (the first the smaller one)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, idx in cells.items():
        idx = rng.permutation(np.asarray(idx))
        out[c] = (idx[:len(idx) // 2], idx[len(idx) // 2:])
    return out


def _draw_blocks(n_cells: int, n_draws: int) -> np.ndarray:
    """Sizes of the blocks of ``n_cells`` cells that each get their own posterior draw (at most
    ``n_draws`` blocks, sizes differing by at most one)."""
    return np.diff(np.linspace(0, n_cells, min(n_draws, n_cells) + 1).round().astype(int))


def _as_list(x):
    return [x] if isinstance(x, str) else list(x)


def _all_cells_split(adata, seed):
    """All cells for training, 5% kept for validation."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(adata.n_obs)
    n_val = max(1, int(0.05 * adata.n_obs))
    return D.Split(name="all", seed=seed, train_idx=np.sort(idx[n_val:]), val_idx=np.sort(idx[:n_val]),
                   test_idx=np.array([], dtype=int), train_conditions=sorted(set(adata.obs["condition"].astype(str))),
                   test_conditions=[], test_groups={})
