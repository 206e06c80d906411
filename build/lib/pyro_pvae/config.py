"""Configuration: ``--config NAME`` plus Hydra overrides, composed with Hydra's compose API,
and the data/split a config describes.

``--config`` is our own flag (Hydra's is ``--config-name``): we take it, hand the remaining
``key=value`` overrides to Hydra and turn Hydra's errors into short messages that list what
exists.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MAIN_KEYS = {
    "data.path": "local .h5ad file (CPA, GEARS, scPerturb or generic layout)",
    "data.source": "file | norman19_subset | simulation | norman_effects",
    "data.n_top_genes": "keep this many highly variable genes (targets always kept)",
    "split.name": "auto | norman_discrepancy | combo_seen | complete_doubles | iid | none",
    "model=paper": "the paper's sizes (20 perturbation + 85 invariant latents, hidden 256)",
    "model.latent_pert / model.latent_inv": "latent sizes",
    "model.alpha": "alignment weight (0 turns it off)",
    "model.effect_prior": "spike_slab | dense",
    "train.epochs / train.batch_size / train.lr": "optimisation",
    "train.device": "auto | cpu | cuda",
    "train.resume=true output.run_dir=DIR": "continue a killed run from its last checkpoint",
}


class ConfigError(ValueError):
    """A config name or key that does not exist, or an inconsistent setting."""


# ---- settings (one source of defaults) -----------------------------------------------------

@dataclass
class ModelConfig:
    """Sizes and priors of the model (Hydra group ``model``)."""

    n_genes: int = 0
    n_perts: int = 0
    latent_inv: int = 10
    latent_pert: int = 10
    hidden: int = 256
    n_layers: int = 1
    decoder: str = "nonlinear"  # "nonlinear" (MLP) or "linear"
    effect_prior: str = "spike_slab"  # "spike_slab" or "dense" (Gaussian, ablation)
    likelihood: str = "nb"  # "nb" or "poisson" (a deliberately wrong model, for checks)
    pi_prior: tuple = (1.0, 4.0)  # Beta(a, b) on the inclusion probability
    slab_scale: float = 2.0
    gate_inference: str = "marginal"  # "marginal" (gate summed out) or "straight_through"
    spike_scale: float = 0.05  # marginal: sd of the narrow spike standing in for the point mass
    dense_scale: float = 1.0
    w_prior_scale: float = 0.1  # Laplace scale of DAG edge weights
    theta_prior: tuple = (2.0, 1.5)  # LogNormal(loc, scale) of the NB inverse dispersion
    alpha: float = 20.0  # alignment weight; 0 turns it off
    alignment: str = "group_mean"  # "group_mean" or "pairwise" (see alignment_penalty)
    learn_composition: bool = True
    sparse_rotation: bool = True  # after fit: rotate z_pert to the sparsest effects (sparse_rotation())

    #: allowed values of the string options (a typo would otherwise select a fallback branch)
    CHOICES = {"decoder": ("nonlinear", "linear"), "effect_prior": ("spike_slab", "dense"),
               "likelihood": ("nb", "poisson"), "gate_inference": ("marginal", "straight_through"),
               "alignment": ("group_mean", "pairwise")}

    def __post_init__(self):
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be {' or '.join(map(repr, allowed))}, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("pi_prior", "theta_prior"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @property
    def gate_sites(self) -> bool:
        """True when the Bernoulli gate is a sample site (spike-and-slab with straight-through
        gates); False when it is summed out or the prior is dense."""
        return self.effect_prior == "spike_slab" and self.gate_inference == "straight_through"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pi_prior"], d["theta_prior"] = list(self.pi_prior), list(self.theta_prior)
        return d


@dataclass
class TrainConfig:
    """Optimisation settings (Hydra group ``train``)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 3e-3
    lr_batch_rule: str = "none"  # "none" | "sqrt" | "linear": lr * rule(batch_size / lr_base_batch)
    lr_base_batch: int = 256
    lr_final_fraction: float = 0.1
    global_lr_multiplier: float = 10.0
    clip_norm: float = 10.0
    kl_weight: float = 1.0
    kl_warmup_epochs: float = 10.0
    temperature_start: float = 1.0
    temperature_end: float = 0.2
    init_gate_prob: float = 0.5
    seed: int = 0
    device: str = "auto"
    engine: str = "module"  # "module" (Pyro ELBOModule + torch Adam) or "svi" (pyro.infer.SVI)
    jit: bool = False
    validate_args: bool = False
    early_stopping_patience: int = 20
    min_epochs: int = 10
    checkpoint_every: int = 5
    resume: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        if cfg.lr_batch_rule not in ("none", "sqrt", "linear"):
            raise ValueError(f"train.lr_batch_rule must be 'none', 'sqrt' or 'linear', got {cfg.lr_batch_rule!r}")
        if cfg.lr_base_batch < 1:
            raise ValueError(f"train.lr_base_batch must be a positive batch size, got {cfg.lr_base_batch}")
        return cfg

    @property
    def batch_lr(self) -> float:
        """The networks' learning rate for this batch size: ``lr * rule(batch_size / lr_base_batch)``
        (benchmarks/lr_scaling.py: with as many steps as at the base batch, the sqrt rule keeps the
        held-out ELBO up to a batch of 2048; a larger batch also needs more epochs)."""
        ratio = self.batch_size / self.lr_base_batch
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.lr_batch_rule]



def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


def usage(prog: str) -> str:
    lines = [f"usage: python -m {prog} --config NAME [key=value ...]", "",
             "configs (in configs/): " + ", ".join(available_configs()), "", "main keys:"]
    lines += [f"  {k:<42} {v}" for k, v in MAIN_KEYS.items()]
    lines += ["", f"example: python -m {prog} --config norman data.path=/data/Norman2019_raw.h5ad "
                  "model.latent_pert=20 train.epochs=100",
              "all keys: see configs/base.yaml, configs/model/default.yaml, configs/train/default.yaml"]
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


def compose(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/NAME.yaml`` with overrides; clear errors for unknown names/keys."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if name not in available_configs():
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(available_configs())}")
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e).splitlines()[0]
        sections = ("data", "split", "model", "train", "output", "benchmark")
        for ov in overrides:
            section = ov.lstrip("+~").split("=", 1)[0].split(".")[0]
            if section not in sections:
                raise ConfigError(f"unknown config section {section!r} in {ov!r}; sections: "
                                  f"{', '.join(sections)} (see --help)") from None
            key = ov.lstrip("+~").split("=", 1)[0]
            section = key.split(".")[0]
            if ("=" in ov and not ov.startswith("+")) and section in sections:
                try:
                    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                        base = hydra_compose(config_name=name)
                    if OmegaConf.select(base, key, default="__missing__") == "__missing__":
                        parent = key.rsplit(".", 1)[0] if "." in key else None
                        known = sorted(OmegaConf.select(base, parent).keys()) if parent and \
                            isinstance(OmegaConf.select(base, parent), DictConfig) else sorted(base.keys())
                        raise ConfigError(f"unknown config key {key!r}; keys under {parent or 'the root'}: "
                                          f"{', '.join(map(str, known))}") from None
                except ConfigError:
                    raise
                except Exception:
                    pass
        raise ConfigError(f"could not compose config {name!r} with overrides {overrides}: {msg}") from None
    _check_values(cfg)
    with open_dict(cfg):
        cfg.config_name = name
    return cfg


def _check_values(cfg: DictConfig) -> None:
    """Model and train values are checked here, before any data are loaded or a run
    directory is made: ``ModelConfig`` / ``TrainConfig`` reject bad values with one line."""
    for section, kind in (("model", ModelConfig), ("train", TrainConfig)):
        if section in cfg:
            try:
                kind.from_dict(OmegaConf.to_container(cfg[section], resolve=True))
            except (ValueError, TypeError) as e:
                raise ConfigError(str(e)) from None


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
    else:
        raise ConfigError(f"unknown data.source {source!r}; use file, norman19_subset, simulation or norman_effects")
    if d.n_top_genes:
        adata = D.select_hvg(adata, int(d.n_top_genes))
    log.info("data: %d cells x %d genes, %d conditions", adata.n_obs, adata.n_vars,
             adata.obs["condition"].nunique())
    return adata


def resolve_split(cfg: DictConfig, adata):
    """The Split named by ``cfg.split`` (``auto``: complete_doubles on the shipped subset,
    norman_discrepancy on a full Norman file, combo_seen otherwise); ``none``: no test set."""
    from . import data as D

    name = cfg.split.name
    kwargs = OmegaConf.to_container(cfg.split.kwargs)
    if name == "none":
        return None
    auto = name == "auto"
    if auto:
        if cfg.data.source == "norman19_subset" and not cfg.data.path:
            name = "complete_doubles"
        elif cfg.data.path and cfg.config_name == "norman":
            name = "norman_discrepancy"
        else:
            name = "combo_seen"
    if auto:  # the config's kwargs were written for one of the candidates: keep those that apply
        import inspect

        accepted = inspect.signature(D.SPLITS[name]).parameters
        dropped = sorted(set(kwargs) - set(accepted))
        if dropped:
            log.info("split %s (auto) does not take %s; ignored", name, dropped)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    log.info("split: %s %s", name, kwargs or "")
    return D.make_split(adata, name, int(cfg.split.seed), **kwargs)


def make_run_dir(cfg: DictConfig, kind: str = "fit") -> Path:
    """``output.run_dir`` if set; else ``runs/<config>-<kind>-<timestamp>``; with
    ``train.resume`` and no run_dir: the latest run of this config."""
    if cfg.output.run_dir:
        run_dir = Path(cfg.output.run_dir)
    else:
        root = Path(cfg.output.root)
        prefix = f"{cfg.config_name}-{kind}-"
        if cfg.train.get("resume"):
            previous = sorted(root.glob(prefix + "*"))
            if not previous:
                raise ConfigError(f"train.resume=true but no earlier run {prefix}* under {root}; "
                                  "give output.run_dir=DIR")
            return previous[-1]
        run_dir = root / (prefix + time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
