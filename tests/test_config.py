"""Settings: one source of defaults (dataclasses), presets that hold only their differences,
every value checked with a one-line message, and configs found inside an installed package."""
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pyro_pvae import config as C
from pyro_pvae.config import ConfigError, ModelConfig, Settings, TrainConfig, compose

REPO = Path(__file__).resolve().parents[1]


def _compose_base():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    C.register_configs()
    with initialize_config_dir(config_dir=str(C.CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="base")


def test_the_dataclasses_are_the_defaults_of_the_composed_config():
    cfg = OmegaConf.to_container(_compose_base(), resolve=True)
    assert cfg["model"] == ModelConfig().to_dict()
    assert cfg["train"] == asdict(TrainConfig())
    assert Settings.from_dict(cfg) == Settings()
    assert ModelConfig().hidden == 128  # the value the README's results used


def test_data_derived_sizes_and_benchmark_switches_are_not_settings():
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not {"n_genes", "n_perts"} & model_keys
    assert not {"engine", "jit"} & train_keys
    with pytest.raises(ValueError, match="unknown model config keys \\['n_genes'\\]"):
        ModelConfig.from_dict({"n_genes": 5})


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("path", sorted(p.relative_to(C.CONFIG_DIR).as_posix()
                                        for p in C.CONFIG_DIR.rglob("*.yaml") if p.name != "base.yaml"))
def test_presets_hold_only_their_differences(path):
    """Every key of a preset changes what it would otherwise get: the package defaults, with the
    model / train group presets its defaults list selects laid over them."""
    preset = OmegaConf.to_container(OmegaConf.load(C.CONFIG_DIR / path))
    selected = [next(iter(d.items())) for d in preset.pop("defaults", []) if isinstance(d, dict)]
    group = path.split("/")[0] if "/" in path else None
    defaults = {"model": ModelConfig().to_dict(), "train": asdict(TrainConfig())}.get(group) or \
        OmegaConf.to_container(OmegaConf.structured(Settings))
    for key, name in selected:  # e.g. "override /model": "norman"
        sub = key.split("/")[-1]
        defaults[sub].update(OmegaConf.to_container(OmegaConf.load(C.CONFIG_DIR / sub / f"{name}.yaml")))
    assert preset, path
    for key, value in _leaves(preset):
        default = OmegaConf.select(OmegaConf.create(defaults), key, default="<no default>")
        default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        free = OmegaConf.select(OmegaConf.create(defaults), key.rsplit(".", 1)[0]) == {}  # e.g. split.kwargs
        assert default != "<no default>" or free, f"{path}: {key} is not a setting"
        assert value != default, f"{path}: {key}={value!r} repeats the default"


@pytest.mark.parametrize("name", C.available_configs())
def test_every_config_composes_and_names_its_split(name):
    assert "split" in OmegaConf.load(C.CONFIG_DIR / f"{name}.yaml")
    cfg = compose(name)
    assert cfg.split.name != "none" and cfg.config_name == name


def test_norman_presets_name_their_splits():
    assert compose("norman").split == {"name": "complete_doubles", "seed": 0, "kwargs": {"single_test_fraction": 0.35}}
    full = compose("norman_full")
    assert (full.split.name, dict(full.split.kwargs), full.data.source) == ("norman_discrepancy", {}, "file")
    assert full.model.latent_pert == compose("norman").model.latent_pert == 30


def test_paper_presets_have_the_paper_sizes():
    cfg = compose("norman", ["model=paper", "train=paper"])
    assert (cfg.model.latent_pert, cfg.model.latent_inv, cfg.model.hidden) == (20, 85, 256)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.kl_weight, cfg.train.epochs) == (1e-4, 64, 0.01, 100)
    tiny = compose("tiny", ["model=paper"])  # the preset's own model keys still apply on top
    assert (tiny.model.latent_pert, tiny.model.alpha) == (4, 0.05)


def test_choices_match_what_the_data_module_accepts():
    from pyro_pvae import data as D

    fields = {f.name: f for f in dataclasses.fields(C.SplitConfig)}
    assert set(fields["name"].metadata["choices"]) == set(D.SPLITS) | {"none"}
    fields = {f.name: f for f in dataclasses.fields(C.DataConfig)}
    assert set(fields["format"].metadata["choices"]) == set(D.FORMATS) | {"auto", "generic"}


@pytest.mark.parametrize("build, message", [
    (lambda: ModelConfig(latent_pert=0), "model.latent_pert must be >= 1, got 0"),
    (lambda: ModelConfig(hidden="abc"), "model.hidden must be an integer, got 'abc'"),
    (lambda: ModelConfig(likelihood="poison"), "model.likelihood must be 'nb' or 'poisson', got 'poison'"),
    (lambda: ModelConfig.from_dict({"theta_prior": [2.0, 0.0]}), "model.theta_prior must be [loc, scale] with scale > 0"),
    (lambda: ModelConfig.from_dict({"pi_prior": [1.0]}), "model.pi_prior must be a list of 2 numbers, got [1.0]"),
    (lambda: ModelConfig(gene_effects="yes"), "model.gene_effects must be true or false, got 'yes'"),
    (lambda: ModelConfig(gene_interactions="yes"), "model.gene_interactions must be true or false, got 'yes'"),
    (lambda: ModelConfig.from_dict({"gene_scale_prior": [-2.3, -1.0]}),
     "model.gene_scale_prior must be [loc, scale] with scale > 0"),
    (lambda: ModelConfig.from_dict({"composition_spread_prior": [-1.0]}),
     "model.composition_spread_prior must be a list of 2 numbers, got [-1.0]"),
    (lambda: TrainConfig(epochs=0), "train.epochs must be >= 1, got 0"),
    (lambda: TrainConfig(interaction_steps=-1), "train.interaction_steps must be >= 0, got -1"),
    (lambda: TrainConfig.from_dict({"lr": -0.01}), "train.lr must be > 0, got -0.01"),
    (lambda: TrainConfig.from_dict({"batch_size": "abc"}), "train.batch_size must be an integer, got 'abc'"),
    (lambda: TrainConfig.from_dict({"batch_size": 32.5}), "train.batch_size must be an integer, got 32.5"),
    (lambda: TrainConfig(init_gate_prob=1.0), "train.init_gate_prob must be in (0, 1), got 1.0"),
    (lambda: TrainConfig(progress="yes"), "train.progress must be true or false, got 'yes'"),
    (lambda: TrainConfig(lr=float("nan")), "train.lr must be a number, got nan"),
    (lambda: TrainConfig.from_dict({"engine": "svi"}), "unknown train config keys ['engine']"),
    (lambda: C.BenchmarkConfig(train={"lr": 0}), "benchmark.train.lr must be > 0, got 0.0"),
    (lambda: C.BenchmarkConfig(n_mean_cells=1), "benchmark.n_mean_cells must be >= 2, got 1"),
])
def test_the_python_api_refuses_bad_values_with_one_line(build, message):
    with pytest.raises(ValueError) as e:
        build()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_values_are_converted_to_their_types():
    assert ModelConfig.from_dict({"pi_prior": [1, 2]}).pi_prior == (1.0, 2.0)
    lr = TrainConfig(lr=1).lr
    assert lr == 1.0 and isinstance(lr, float)


def test_a_new_key_with_its_range_is_one_line():
    @dataclass
    class Extra(C._Section):
        SECTION = "extra"
        dropout: float = C.setting(0.1, ge=0, lt=1)

    assert Extra().dropout == 0.1
    with pytest.raises(ConfigError, match=r"extra.dropout must be in \[0, 1\), got 1.0"):
        Extra(dropout=1)


@pytest.mark.slow
def test_an_installed_copy_finds_its_configs_outside_the_checkout(tmp_path):
    """Non-editable install into a folder; import it from another folder without the checkout."""
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(REPO / "pyro_pvae", src / "pyro_pvae", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    elsewhere.mkdir()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(site), str(src)], capture_output=True, text=True)
    install_s = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    assert "license" not in done.stderr.lower(), done.stderr  # no setuptools warning about project.license
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import pyro_pvae.config as C; cfg = C.compose('norman'); "
            "print(C.__file__); print(C.CONFIG_DIR / 'norman.yaml'); print(cfg.split.name, cfg.model.latent_pert)")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    module, preset, composed = out.stdout.splitlines()[-3:]
    assert Path(module).is_relative_to(site) and Path(preset).is_relative_to(site) and Path(preset).exists()
    assert composed == "complete_doubles 30"
    out = subprocess.run([sys.executable, "-m", "pyro_pvae.fit", "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "norman, norman_effects, norman_full, replogle, simulation, tiny" in out.stdout
    print(f"install {install_s:.1f} s")


def test_norman_effects_preset_has_50_perturbation_latents_and_the_norman_model():
    cfg = compose("norman_effects")
    assert (cfg.model.latent_pert, cfg.data.source, cfg.train.min_steps) == (50, "norman_effects", 2000)
    assert cfg.model.latent_inv == compose("norman").model.latent_inv


def test_calibrate_intervals_takes_a_mode_and_names_the_choices():
    """benchmark.calibrate_intervals was a bool; it now takes cross_fit | in_sample | off, and a
    wrong value (including the old true/false) is a ConfigError naming what is accepted."""
    assert compose("tiny").benchmark.calibrate_intervals == "cross_fit"
    assert compose("tiny", ["benchmark.calibrate_intervals=off"]).benchmark.calibrate_intervals == "off"
    with pytest.raises(ConfigError, match=r"benchmark.calibrate_intervals must be 'cross_fit', 'in_sample' or 'off', "
                                          r"got 'yes'"):
        compose("tiny", ["benchmark.calibrate_intervals=yes"])
    with pytest.raises(ConfigError, match="benchmark.calibrate_intervals must be a string, got True"):
        compose("tiny", ["benchmark.calibrate_intervals=true"])


def test_prediction_start_takes_training_or_controls():
    """model.prediction_start: 'training' by default; a wrong value (e.g. 'control') is a
    ConfigError naming both choices, raised when the settings are composed, before any data."""
    assert ModelConfig().prediction_start == "training"
    assert compose("norman", ["model.prediction_start=controls"]).model.prediction_start == "controls"
    with pytest.raises(ConfigError, match=r"model.prediction_start must be 'training' or 'controls', got 'control'"):
        compose("norman", ["model.prediction_start=control"])


def test_library_model_is_on_for_the_real_norman_presets_only():
    """The real Norman presets model each cell's library size (a perturbation changes the panel's
    depth there); the simulated presets, whose depth does not depend on the condition, the
    package default and the paper's settings do not."""
    assert ModelConfig().library_model is False
    assert compose("norman").model.library_model and compose("norman_full").model.library_model
    assert not compose("norman_effects").model.library_model
    assert not compose("simulation").model.library_model and not compose("tiny").model.library_model
    assert not compose("norman", ["model=paper"]).model.library_model
    assert not compose("norman", ["model.library_model=false"]).model.library_model
