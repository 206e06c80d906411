"""pyro_pvae: PerturbedVAE in Pyro: predict single-cell responses to genetic perturbations.

Main entry points: :class:`PerturbedVAE`, :func:`load_run`, :mod:`pyro_pvae.data`
(readers, splits), :mod:`pyro_pvae.datasets` (shipped real Norman 2019 cells),
:func:`pyro_pvae.simulate.simulate` (ground-truth simulator).
"""
__version__ = "0.1.0"

from .api import PerturbedVAE, load_run  # noqa: E402

__all__ = ["PerturbedVAE", "load_run", "__version__"]
