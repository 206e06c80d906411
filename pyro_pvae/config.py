"""Settings: one dataclass per section, presets, and the data/split a config describes.

The dataclasses below (``DataConfig``, ``SplitConfig``, ``ModelConfig``, ``TrainConfig``,
``OutputConfig``, ``BenchmarkConfig``, together :class:`Settings`) are the one source of
defaults. Every field carries its type and allowed values (:func:`setting`); they are checked
when a dataclass is built (``ModelConfig(**kw)``, ``ModelConfig.from_dict(d)``) and when
``--config NAME key=value ...`` is composed, before any data are read or a directory is made.

Presets are ``pyro_pvae/configs/NAME.yaml`` inside the package (found with importlib.resources);
each holds only its differences from the dataclasses, which are registered with Hydra's
ConfigStore (``settings``, ``model/default``, ``train/default``). ``--config`` is our own flag
(Hydra's is ``--config-name``): we take it, hand the ``key=value`` overrides to Hydra and turn
Hydra's errors into one-line messages that list what exists.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: presets ``NAME.yaml`` and preset groups ``model/``, ``train/``, shipped inside the package
CONFIG_DIR = Path(str(files(__package__) / "configs"))
PRESET_GROUPS = ("model", "train")


class ConfigError(ValueError):
    """A config name or key that does not exist, or a value of the wrong type or range."""


# ---- checking one value ---------------------------------------------------------------------

def setting(default=dataclasses.MISSING, *, factory=None, gt=None, ge=None, lt=None, le=None,
            choices=None, rule=None):
    """A dataclass field with its allowed values: bounds ``gt``/``ge``/``lt``/``le`` (for a
    tuple: on each element), ``choices``, or ``rule=(predicate, description)``."""
    limits = dict(gt=gt, ge=ge, lt=lt, le=le, choices=choices, rule=rule)
    metadata = {k: v for k, v in limits.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUNDS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _describe(next(a for a in args if a is not type(None))) + " or null"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        return "a list of strings"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp):
    """``value`` as type ``tp`` (an int where a float is expected, a list for a tuple, a number
    for a string); TypeError if it is not of that type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)))
    if tp is Any:
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
                (origin is tuple and len(value) != len(args)):
            raise TypeError
        return origin(_coerce(v, args[i] if origin is tuple else args[0]) for i, v in enumerate(value))
    if origin is dict and isinstance(value, Mapping):
        return dict(value)
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # data.path=123 is the path '123'
    if tp in (int, float) and isinstance(value, int) and not isinstance(value, bool):
        return tp(value)
    if tp is float and isinstance(value, float) and math.isfinite(value):
        return value
    raise TypeError


def _one_of(choices) -> str:
    quoted = [repr(c) for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _range_text(limits) -> str:
    lower = [(k, limits[k]) for k in ("gt", "ge") if k in limits]
    upper = [(k, limits[k]) for k in ("lt", "le") if k in limits]
    if lower and upper:
        (lo_kind, lo), (hi_kind, hi) = lower[0], upper[0]
        return f"in {'(' if lo_kind == 'gt' else '['}{lo}, {hi}{')' if hi_kind == 'lt' else ']'}"
    kind, bound = (lower or upper)[0]
    return f"{ {'gt': '>', 'ge': '>=', 'lt': '<', 'le': '<='}[kind]} {bound}"


def check_value(key: str, value, tp, limits: Mapping = {}):
    """``value`` of setting ``key`` converted to type ``tp``; ConfigError (one line) if it has
    another type or lies outside ``limits`` (see :func:`setting`)."""
    try:
        value = _coerce(value, tp)
    except TypeError:
        raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}") from None
    if value is None:
        return value
    shown = list(value) if isinstance(value, tuple) else value
    if "choices" in limits and value not in limits["choices"]:
        raise ConfigError(f"{key} must be {_one_of(limits['choices'])}, got {shown!r}")
    if "rule" in limits and not limits["rule"][0](value):
        raise ConfigError(f"{key} must be {limits['rule'][1]}, got {shown!r}")
    for x in value if isinstance(value, tuple) else (value,):
        if not all(op(x, limits[k]) for k, op in _BOUNDS.items() if k in limits):
            each = " (each value)" if isinstance(value, tuple) else ""
            raise ConfigError(f"{key} must be {_range_text(limits)}{each}, got {shown!r}")
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


class _Section:
    """Every field of a settings dataclass is checked when it is built (``__post_init__``)."""

    SECTION = ""  # the key prefix in messages, e.g. "model"

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls.SECTION}.{name}" if cls.SECTION else name

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), _hints(type(self))[f.name]
            if dataclasses.is_dataclass(tp):
                if isinstance(value, Mapping):
                    value = tp.from_dict(value)
                elif not isinstance(value, tp):
                    raise ConfigError(f"{self._key(f.name)} must be a mapping, got {value!r}")
            else:
                value = check_value(self._key(f.name), value, tp, f.metadata)
            setattr(self, f.name, value)

    @classmethod
    def check(cls, key: str, value, prefix: str | None = None):
        """Check one ``key`` (a field name) and its value; ``prefix`` replaces the section in messages."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        where = prefix or cls.SECTION
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}.{key}'; keys under {where}: {', '.join(fields)}")
        return check_value(f"{where}.{key}", value, _hints(cls)[key], fields[key].metadata)

    @classmethod
    def from_dict(cls, d: Mapping):
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"unknown {cls.SECTION or 'top-level'} config keys {sorted(unknown)}; "
                              f"known: {sorted(known)}")
        return cls(**d)


# ---- settings (one source of defaults; one line per key: default and allowed values) --------

@dataclass
class SimulationConfig(_Section):
    """Simulated data (``data.source=simulation`` or ``norman_effects``)."""

    SECTION = "data.simulation"
    preset: str = "norman_like"  # pyro_pvae.simulate presets (simulation only)
    seed: int = setting(0, ge=0)
    overrides: Dict[str, Any] = setting(factory=dict)  # keyword arguments of the simulator


@dataclass
class DataConfig(_Section):
    """The data set (see :func:`load_dataset`)."""

    SECTION = "data"
    source: str = setting("file", choices=("file", "norman19_subset", "simulation", "norman_effects"))
    path: Optional[str] = None  # local .h5ad (CPA, GEARS, scPerturb or generic layout); implies source=file
    format: str = setting("auto", choices=("auto", "cpa", "gears", "scperturb", "canonical", "replogle", "generic"))
    label_key: Optional[str] = None  # generic format: obs column holding the perturbation label
    control_label: Optional[str] = None  # generic format: label of control cells
    sep: Optional[str] = None  # generic format: separator of combined targets
    min_cells: int = setting(0, ge=0)  # genes detected in fewer cells are dropped first (targets kept); 0 keeps all
    n_top_genes: Optional[int] = setting(None, ge=1)  # highly variable genes kept (targets always kept); null = all
    simulation: SimulationConfig = setting(factory=SimulationConfig)


@dataclass
class SplitConfig(_Section):
    """Held-out conditions (``pyro_pvae.data.make_split``); every preset names its split."""

    SECTION = "split"
    name: str = setting("none", choices=("norman_discrepancy", "combo_seen", "complete_doubles", "iid", "none"))
    seed: int = setting(0, ge=0)
    kwargs: Dict[str, Any] = setting(factory=dict)  # keyword arguments of the split function

    def __post_init__(self):
        super().__post_init__()
        if self.name != "none" and self.kwargs:
            import inspect

            from .data import SPLITS

            accepted = [p for p in inspect.signature(SPLITS[self.name]).parameters if p not in ("adata", "seed")]
            unknown = sorted(set(self.kwargs) - set(accepted))
            if unknown:
                raise ConfigError(f"split.kwargs {unknown} are not arguments of split {self.name!r}; "
                                  f"it takes: {', '.join(accepted)}")


@dataclass
class ModelConfig(_Section):
    """Sizes and priors of the model (Hydra group ``model``). The data-derived sizes (genes,
    perturbations) are not settings."""

    SECTION = "model"
    latent_inv: int = setting(10, ge=1)
    latent_pert: int = setting(10, ge=1)
    hidden: int = setting(128, ge=1)
    n_layers: int = setting(1, ge=0)
    # nonlinear: MLP f([z_inv, z_pert]); linear; hybrid: f([z_inv, z_pert]) + L z_pert (a log-linear path
    # from z_pert, so latent shifts add in log expression; see model.Decoder)
    decoder: str = setting("nonlinear", choices=("nonlinear", "linear", "hybrid"))
    effect_prior: str = setting("spike_slab", choices=("spike_slab", "dense"))  # dense: Gaussian (ablation)
    likelihood: str = setting("nb", choices=("nb", "poisson"))  # poisson: a deliberately wrong model, for checks
    pi_prior: Tuple[float, float] = setting((1.0, 4.0), gt=0)  # Beta(a, b) on the inclusion probability
    slab_scale: float = setting(2.0, gt=0)
    # marginal: gate summed out (spike = narrow Normal); straight_through: gate sample sites
    gate_inference: str = setting("marginal", choices=("marginal", "straight_through"))
    spike_scale: float = setting(0.05, gt=0)  # marginal: sd of the narrow spike standing in for the point mass
    dense_scale: float = setting(1.0, gt=0)
    w_prior_scale: float = setting(0.1, gt=0)  # Laplace scale of the latent DAG edge weights
    # LogNormal(loc, scale) of the NB inverse dispersion
    theta_prior: Tuple[float, float] = setting((2.0, 1.5), rule=(lambda v: v[1] > 0, "[loc, scale] with scale > 0"))
    # alignment weight; 0 turns it off. 10: as good as 2 or better, within the seeds' spread, on every benchmark
    # (README, Results: real subset doubles Pearson delta 0.550 vs 0.535, 3 seeds) and it cuts the
    # identifiability leak of z_pert into z_inv (small grid: 0.02 vs 0.15); the PPC holds (tiny simulation, 60
    # epochs: gene-mean 90% coverage 0.96 at 10, 0.91 at 2, analyses/ppc_check.py). The unbiased group-mean
    # penalty is a noisy batch estimate: at 20 an earlier model version failed the PPC (coverage 0.59)
    alpha: float = setting(10.0, ge=0)
    alignment: str = setting("group_mean", choices=("group_mean", "pairwise"))  # pairwise: the paper's per-pair form
    learn_composition: bool = True  # c_2, the latent composition scale of doubles, a site with a prior (false: 1)
    # LogNormal(loc, scale) prior of c_2, from Norman et al. 2019's genetic-interaction fits of its 125
    # pairs (double ~ c1 single_1 + c2 single_2; Theil-Sen medians 0.74 / 0.69, interquartile range
    # about 0.5-0.9): median exp(-0.33) = 0.72, 50% interval 0.57-0.91
    composition_prior: Tuple[float, float] = setting((-0.33, 0.35), rule=(lambda v: v[1] > 0,
                                                                           "[loc, scale] with scale > 0"))
    pair_effects: bool = True  # a sparse interaction effect per training pair (unseen pairs: the prior)
    # each pair composes with its own c: log c_pair ~ N(log c_2, s_c^2), s_c learned (unseen pairs draw theirs, so
    # their intervals widen by how much the training pairs' composition varies)
    pair_composition: bool = False
    # LogNormal(loc, scale) prior of s_c: the sd of log c over Norman et al. 2019's pairs is about 0.33-0.44
    # (analyses/composition_limits.py: 0.33 on the shipped real effects; the GI fits' interquartile range
    # 0.5-0.9 of the coefficients gives 0.44)
    composition_spread_prior: Tuple[float, float] = setting((-1.05, 0.5), rule=(lambda v: v[1] > 0,
                                                                                "[loc, scale] with scale > 0"))
    pair_pi_prior: Tuple[float, float] = setting((1.0, 1.0), gt=0)  # Beta prior: about half of pairs interact
    # LogNormal(loc, scale) prior of the interactions' slab scale tau
    pair_scale_prior: Tuple[float, float] = setting((-0.7, 1.0), rule=(lambda v: v[1] > 0,
                                                                        "[loc, scale] with scale > 0"))
    # How the guide places a cell's z_pert (model.py docstring). group: the encoder gives the cell's deviation
    # from its training group's mean encoder location and the model adds the shift, so group offsets are carried
    # by the effects alone, learned through the likelihood; noncentered: the deviation from the control centre
    # (the encoder may carry part of a group's offset); centered: z_pert is the encoder's location and the
    # effects follow it through the eps KL only. `python analyses/param_check.py real|sim
    # model.parameterisation=...`, seed 0, measured before train.rotate_at existed: held-out singles / doubles Pearson delta on the shipped cells, group
    # 0.29 / 0.54, noncentered 0.34 / 0.52, centered 0.21 / 0.32; single / double change RMSE on the
    # identifiability base simulation, group 0.25 / 0.64, noncentered 0.80 / 1.12, centered 0.23 / 0.51.
    # group: as good as noncentered on the real cells (their seed-to-seed sd is about 0.06) and near centered on
    # the simulation, where noncentered's encoder keeps the large offsets and the effects stay small.
    parameterisation: str = setting("group", choices=("group", "noncentered", "centered"))
    sparse_rotation: bool = True  # after fit: re-express z_pert in the basis with the sparsest effects
    # gene-level effects beta[p, g] ~ Laplace(0, b) in log expression beside the latent path (b learned;
    # doubles add their singles' times c_2): what a perturbation does that its latent effects and the shared
    # decoder do not reproduce
    gene_effects: bool = False
    # only the gene-level interaction kappa_g ~ Laplace(0, b_I) of each pair (no single's beta): the point
    # prediction of an unseen pair keeps the latent path's (kappa has mean 0), and its draws of kappa widen
    # the intervals by the gene-level departures from composition that the training pairs show
    gene_interactions: bool = False
    # a model of the library size (the panel's total counts): log l_n ~ N(l_0 + c_m sum_p u_np lambda_p, s^2),
    # lambda_p ~ N(0, 0.5^2) (composed in doubles like the latent shift), observed in training; a predicted
    # cell's library is its start cell's times exp(c_m sum_p (u_p - u_start,p) lambda_p). Off: predicted cells keep
    # their start cells' library sizes, so a perturbation that changes the panel's total counts (KLF1
    # raises it from a median of 106 to 188 on the shipped cells) is missed
    library_model: bool = False
    # the cells a prediction starts from (their z_inv, eps and library size; the counterfactual keeps them and
    # changes the label): "training", a sample of all training cells, each encoded with its own label (z_inv is
    # perturbation-invariant, so every training cell is a draw of the invariant state, and the population is
    # larger than the controls alone); "controls", the training controls only (the earlier default). On the
    # shipped cells (benchmark, 3 seeds, same fits): held-out doubles pseudobulk RMSE 0.091 vs 0.094 (lower in
    # every seed), Pearson delta 0.552 vs 0.550, seen singles 0.289 vs 0.280 (README, Real Norman 2019 cells)
    prediction_start: str = setting("training", choices=("training", "controls"))
    gene_scale_prior: Tuple[float, float] = setting((-2.3, 1.0), rule=(lambda v: v[1] > 0,
                                                                        "[loc, scale] with scale > 0"))

    @property
    def gene_pair_sites(self) -> bool:
        """True when each pair has a gene-level interaction kappa (``gene_effects`` or
        ``gene_interactions``, with ``pair_effects``)."""
        return self.pair_effects and (self.gene_effects or self.gene_interactions)

    @property
    def gene_interactions_held(self) -> bool:
        """True for ``gene_interactions`` alone (without ``gene_effects``): the trainer holds the
        pairs' kappa at 0 until the rotation, or until its last phase with ``train.interaction_steps``
        (see ``PerturbedVAEModule.hold_gene_interactions``)."""
        return self.gene_interactions and not self.gene_effects

    @property
    def gate_sites(self) -> bool:
        """True when the Bernoulli gate is a sample site (spike-and-slab with straight-through
        gates); False when it is summed out or the prior is dense."""
        return self.effect_prior == "spike_slab" and self.gate_inference == "straight_through"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class TrainConfig(_Section):
    """Optimisation settings (Hydra group ``train``)."""

    SECTION = "train"
    epochs: int = setting(100, ge=1)
    # at least this many optimiser steps: epochs are raised to ceil(min_steps / steps per epoch) and
    # early stopping waits for them, so that small data sets get enough updates (the norman preset:
    # 8 steps per epoch, min_steps 2000)
    min_steps: int = setting(0, ge=0)
    batch_size: int = setting(256, ge=1)
    lr: float = setting(3e-3, gt=0)
    # lr * rule(batch_size / lr_base_batch) (benchmarks/lr_scaling.py)
    lr_batch_rule: str = setting("none", choices=("none", "sqrt", "linear"))
    lr_base_batch: int = setting(256, ge=1)
    lr_final_fraction: float = setting(0.1, gt=0, le=1)  # the learning rate decays to lr * this
    global_lr_multiplier: float = setting(10.0, gt=0)  # factor of the global parameters' lr (effects, DAG, theta)
    clip_norm: float = setting(10.0, gt=0)
    kl_weight: float = setting(1.0, ge=0)  # final weight of the local KLs (1 = the true ELBO)
    kl_warmup_epochs: float = setting(10.0, ge=0)
    # after this fraction of the epochs z_pert is rotated to the basis of the sparsest effects
    # (model.sparse_rotation) and training goes on in it, so the spike-and-slab prior can pull the
    # near-zero effects of that basis into the spike (1: rotate only after training; the effects are
    # then sparse in shape but few sit in the spike; tests/test_model.py::test_fit_support_is_sparse)
    rotate_at: float = setting(0.5, gt=0, le=1)
    # model.gene_interactions: 0 (default): the pairs' gene-level interactions kappa are held at 0 until the
    # rotation (train.rotate_at), then trained with the rest; N > 0: held through training, then kappa and their
    # scale b_I are fitted alone for N steps, everything else frozen (a cut: the point predictions are the
    # model's without kappa). norman_effects, 50 latents, 3 seeds, Pearson delta / delta RMSE / coverage all:
    # at the rotation 0.580 / 0.463 / 0.83, cut (500) 0.599 / 0.467 / 0.80; with model.pair_composition at the
    # rotation 0.636 / 0.491 / 0.77, cut 0.640 / 0.531 / 0.72 (README, Real effects)
    interaction_steps: int = setting(0, ge=0)
    temperature_start: float = setting(1.0, gt=0)  # gate relaxation temperature, annealed geometrically
    temperature_end: float = setting(0.2, gt=0)
    init_gate_prob: float = setting(0.5, gt=0, lt=1)
    seed: int = setting(0, ge=0)
    device: str = setting("auto", rule=(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                                        "'auto', 'cpu', 'cuda' or 'cuda:N'"))
    validate_args: bool = False
    # keep the module of the best validation epoch at the end (false: the last one; for small data whose
    # tiny validation share stops improving long before the population-level effects do)
    restore_best: bool = True
    early_stopping_patience: int = setting(20, ge=1)  # epochs without a better validation loss
    min_epochs: int = setting(10, ge=0)
    checkpoint_every: int = setting(5, ge=1)  # epochs
    resume: bool = False
    progress: bool = True

    @property
    def batch_lr(self) -> float:
        """The networks' learning rate for this batch size: ``lr * rule(batch_size / lr_base_batch)``
        (benchmarks/lr_scaling.py: with as many steps as at the base batch, the sqrt rule keeps the
        held-out ELBO up to a batch of 2048; a larger batch also needs more epochs)."""
        ratio = self.batch_size / self.lr_base_batch
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.lr_batch_rule]


@dataclass
class OutputConfig(_Section):
    SECTION = "output"
    root: str = "runs"  # run directories are created below this folder
    run_dir: Optional[str] = None  # explicit run directory (needed to resume a particular run)


@dataclass
class BenchmarkConfig(_Section):
    """``python -m pyro_pvae.benchmark`` (see pyro_pvae/benchmark.py)."""

    SECTION = "benchmark"
    seeds: int = setting(1, ge=1)  # repeat every fit with train.seed = 0..seeds-1; mean ± sd over seeds
    methods: List[str] = setting(factory=lambda: [
        "PerturbedVAE", "PerturbedVAE_no_alignment", "PerturbedVAE_dense_prior", "control_mean", "additive",
        "additive_shrink", "linear"])
    n_pred_cells: int = setting(200, ge=2)  # predicted cells per held-out condition
    n_change_draws: int = setting(50, ge=1)  # posterior predictive draws for coverage90_all / _top20de
    # the model's intervals stretched by PerturbedVAE.calibrate_intervals, fitted on training doubles
    # predicted as unseen: cross_fit (by a copy refitted without half of them: one more fit per seed),
    # in_sample (all of them, their own interaction drawn from the prior: fast, optimistic) or off;
    # coverage90_*_uncalibrated keeps the raw intervals' coverage
    calibrate_intervals: str = setting("cross_fit", choices=("cross_fit", "in_sample", "off"))
    n_mean_cells: int = setting(4000, ge=2)  # predicted cells per condition behind the model's point prediction (not kept)
    external: List[str] = setting(factory=list)  # NAME=path/pred.h5ad: another tool's predicted cells, one method row each
    n_plot_conditions: int = setting(4, ge=0)  # conditions in the predicted-vs-observed plot
    train: Dict[str, Any] = setting(factory=dict)  # train.* overrides for the benchmark's fits (train.KEY=... wins)
    torch_threads: Optional[int] = setting(1, ge=1)  # torch intra-op CPU threads (null: torch's default)

    def __post_init__(self):
        super().__post_init__()
        self.train = {k: TrainConfig.check(k, v, prefix="benchmark.train") for k, v in self.train.items()}


@dataclass
class Settings(_Section):
    """Everything ``--config`` composes (Hydra's ``settings`` node)."""

    data: DataConfig = setting(factory=DataConfig)
    split: SplitConfig = setting(factory=SplitConfig)
    model: ModelConfig = setting(factory=ModelConfig)
    train: TrainConfig = setting(factory=TrainConfig)
    output: OutputConfig = setting(factory=OutputConfig)
    benchmark: BenchmarkConfig = setting(factory=BenchmarkConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Settings))


def _choices(cls, name: str) -> str:
    return " | ".join(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["choices"])


MAIN_KEYS = {
    "data.path": "local .h5ad file (CPA, GEARS, scPerturb or generic layout)",
    "data.source": _choices(DataConfig, "source"),
    "data.n_top_genes": "keep this many highly variable genes (targets always kept)",
    "split.name": _choices(SplitConfig, "name") + " (each config names one)",
    "+split.kwargs.KEY=VALUE": "an argument of the split function (e.g. single_test_fraction)",
    "model=paper / train=paper": "the paper's sizes (20 perturbation + 85 invariant latents, hidden 256) / optimisation",
    "model.latent_pert / model.latent_inv": "latent sizes",
    "model.alpha": "alignment weight (0 turns it off)",
    "model.effect_prior": _choices(ModelConfig, "effect_prior"),
    "train.epochs / train.batch_size / train.lr": "optimisation",
    "train.device": "auto | cpu | cuda | cuda:N",
    "train.resume=true output.run_dir=DIR": "continue a killed run from its last checkpoint",
}


# ---- presets and composition ----------------------------------------------------------------

def register_configs() -> None:
    """Register the dataclasses with Hydra's ConfigStore: ``settings`` (every section, the root
    of ``configs/base.yaml``) and ``model/default``, ``train/default`` (the group defaults that
    presets such as ``model=paper`` replace)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="settings", node=Settings)
    cs.store(group="model", name="default", node=ModelConfig)
    cs.store(group="train", name="default", node=TrainConfig)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


def available_presets(group: str) -> list[str]:
    """Presets of a group (``model``, ``train``): ``default`` (the dataclass) and ``configs/GROUP/*.yaml``."""
    return ["default", *sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))]


def usage(prog: str) -> str:
    lines = [f"usage: python -m {prog} --config NAME [key=value ...]", "",
             "configs (pyro_pvae/configs/NAME.yaml): " + ", ".join(available_configs()),
             "; ".join(f"{g} presets ({g}=NAME): {', '.join(available_presets(g))}" for g in PRESET_GROUPS),
             "", "main keys:"]
    lines += [f"  {k:<42} {v}" for k, v in MAIN_KEYS.items()]
    lines += ["", f"example: python -m {prog} --config norman model.latent_pert=20 train.epochs=50",
              f"         python -m {prog} --config norman_full data.path=/data/Norman2019_raw.h5ad model=paper",
              "all keys, their defaults and allowed values: the dataclasses in pyro_pvae/config.py; "
              "a config holds only its differences"]
    return "\n".join(lines)


def parse_cli(argv: list[str], prog: str) -> tuple[str | None, list[str]]:
    """Split ``--config NAME`` (or ``--config=NAME``) from the Hydra overrides.
    Returns (None, []) for --help."""
    name, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return None, []
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a name: " + ", ".join(available_configs()))
            name, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; use --config NAME and key=value overrides (see --help)")
        else:
            overrides.append(arg)
        i += 1
    if name is None:
        raise ConfigError("missing --config NAME; available: " + ", ".join(available_configs()))
    return name, overrides


def _check_override(text: str, key: str, value, delete: bool) -> None:
    """Key known and value of the right type and range, before Hydra sees the override."""
    if key in PRESET_GROUPS:  # model=paper
        if not delete and value not in available_presets(key):
            raise ConfigError(f"unknown {key} preset {value!r}; available: {', '.join(available_presets(key))}")
        return
    parts, cls = key.split("."), Settings
    if parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config section {parts[0]!r} in {text!r}; sections: {', '.join(SECTIONS)} "
                          "(see --help)")
    for i, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if name not in names:
            where = ".".join(parts[:i])
            raise ConfigError(f"unknown config key {key!r}; keys under {where}: {', '.join(names)}")
        tp = _hints(cls)[name]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        rest = parts[i + 1:]  # keys inside a mapping (split.kwargs.KEY) are free, except benchmark.train.KEY
        if delete:
            return
        if not rest:
            cls.check(name, value)
        elif key.startswith("benchmark.train.") and len(rest) == 1:
            TrainConfig.check(rest[0], value, prefix="benchmark.train")
        return


def _check_overrides(overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except HydraException as e:
            raise ConfigError(f"cannot read override {text!r}: {str(e).splitlines()[0].strip()} "
                              "(expected key=value)") from None
        _check_override(text, ov.key_or_group, None if ov.is_delete() else ov.value(), ov.is_delete())


def compose(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/NAME.yaml`` with overrides; every key and value is checked (one-line
    ConfigError) before this returns."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if name not in available_configs():
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(available_configs())}")
    overrides = list(overrides or [])
    _check_overrides(overrides)
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=overrides)
        Settings.from_dict(OmegaConf.to_container(cfg, resolve=True))  # presets' values and interpolations
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"could not compose config {name!r} with overrides {overrides}: "
                          f"{str(e).splitlines()[0]}") from None
    with open_dict(cfg):
        cfg.config_name = name
    return cfg


# ---- what a config describes -------------------------------------------------------------

def load_dataset(cfg: DictConfig):
    """The canonical AnnData described by ``cfg.data`` (announces what it loads)."""
    from . import data as D
    from . import datasets

    d = cfg.data
    source = "file" if d.path else d.source
    if source == "file":
        if not d.path:
            raise ConfigError("data.source=file needs data.path=/path/to/file.h5ad")
        log.info("data: reading %s (format %s)", d.path, d.format)
        adata = D.read_perturbseq(d.path, format=d.format, label_key=d.label_key,
                                  control_label=d.control_label, sep=d.sep)
    elif source == "norman19_subset":
        log.info("data: no data.path given -> the shipped REAL Norman 2019 subset "
                 "(3,375 K562 CRISPRa cells, 500 genes; pyro_pvae/datasets/SOURCES.md)")
        adata = datasets.norman19_subset()
    elif source == "simulation":
        from .simulate import cached_simulation

        sim = d.simulation
        log.info("data: SIMULATED data set, preset %r, seed %d (cached)", sim.preset, sim.seed)
        adata = cached_simulation(sim.preset, seed=sim.seed, **OmegaConf.to_container(sim.overrides))
    elif source == "norman_effects":
        from .simulate import simulate_norman_effects

        sim = d.simulation
        log.info("data: SEMI-SYNTHETIC cells with the real Norman 2019 pseudobulk effects (seed %d)", sim.seed)
        adata = simulate_norman_effects(seed=sim.seed, **OmegaConf.to_container(sim.overrides))
    else:  # a config.yaml written by hand or by an older version
        raise ConfigError(f"unknown data.source {source!r}; use {_choices(DataConfig, 'source')}")
    if d.min_cells:
        adata = D.filter_genes(adata, int(d.min_cells))
    if d.n_top_genes:
        adata = D.select_hvg(adata, int(d.n_top_genes))
    log.info("data: %d cells x %d genes, %d conditions", adata.n_obs, adata.n_vars,
             adata.obs["condition"].nunique())
    return adata


def resolve_split(cfg: DictConfig, adata):
    """The Split named by ``cfg.split`` (``none``: no test set)."""
    from . import data as D

    if cfg.split.name == "none":
        return None
    kwargs = OmegaConf.to_container(cfg.split.kwargs)
    log.info("split: %s %s", cfg.split.name, kwargs or "")
    return D.make_split(adata, cfg.split.name, int(cfg.split.seed), **kwargs)


def cli_main(run, argv: list[str] | None, prog: str, extra_help: str = "",
             errors: tuple[type[Exception], ...] = ()) -> int:
    """Shared front door of ``python -m pyro_pvae.fit`` / ``.benchmark``: ``--config NAME``
    plus overrides, ``--help``, and known errors as one line on stderr (exit 2), no traceback."""
    import sys

    from .data import DataError
    from .train import TrainingError

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        name, overrides = parse_cli(argv, prog)
        if name is None:
            print(usage(prog) + extra_help)
            return 0
        run(name, overrides)
    except (ConfigError, DataError, TrainingError, FileNotFoundError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
