"""One PerturbedVAE on the shipped Norman cells, for the analysis scripts (param_check,
quick_real_check, signal_imbalance, level_error, library_diagnostics), and their command line."""
from __future__ import annotations

import sys
import time
from pathlib import Path


def fit_norman(overrides, fit: bool = True):
    """``--config norman`` with the overrides (progress bar off): returns (adata, split, model,
    seconds of the fit); ``fit=False`` returns the model unfitted (0 seconds)."""
    from omegaconf import OmegaConf

    from pyro_pvae.api import PerturbedVAE
    from pyro_pvae.config import compose, load_dataset, resolve_split

    cfg = compose("norman", list(overrides) + ["train.progress=false"])
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    vae = PerturbedVAE(adata, split=split, model=OmegaConf.to_container(cfg.model),
                       train=OmegaConf.to_container(cfg.train))
    t0 = time.perf_counter()
    if fit:
        vae.fit()
    return adata, split, vae, time.perf_counter() - t0 if fit else 0.0


def parse_out(argv) -> tuple[list[str], Path | None]:
    """The overrides in ``argv`` and the directory of its ``--out DIR`` (None without one)."""
    argv = list(argv)
    if "--out" not in argv:
        return argv, None
    i = argv.index("--out")
    if i + 1 == len(argv) or argv[i + 1].startswith("-"):
        raise SystemExit("error: --out needs a directory, e.g. --out analyses/results/level_error")
    return argv[:i] + argv[i + 2:], Path(argv[i + 1])


def fit_norman_one_thread(overrides):
    """:func:`fit_norman` on one thread: (adata, split, model)."""
    import torch

    torch.set_num_threads(1)
    adata, split, vae, _ = fit_norman(overrides)
    return adata, split, vae


def write_summary(out, text: str) -> str:
    """``text`` written atomically to ``out/summary.md`` (``out`` None: not written); returns it."""
    from pyro_pvae.utils import atomic_write_text

    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "summary.md", text)
    return text


def script(doc: str, main) -> None:
    """Command line of an analysis script: ``--help`` prints its docstring, else ``main(argv)``'s text."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(doc)
        sys.exit(0)
    print(main(sys.argv[1:]))
