"""Shipped real data: 3,375 Norman 2019 cells and Norman 2019 pseudobulk effects.

See SOURCES.md beside this file for provenance and licences.
"""
from __future__ import annotations

from importlib import resources

import numpy as np

SUBSET_FILE = "norman19_subset.h5ad"
EFFECTS_FILE = "norman19_pseudobulk_effects.npz"


def _path(name: str):
    return resources.files(__name__).joinpath(name)


def norman19_subset():
    """The shipped Norman 2019 subset (3,375 cells x 500 genes) in canonical form.

    Read through ``data.read_perturbseq`` (format 'canonical'), so unsorted doubles such as
    'SET+KLF1' come back as 'KLF1+SET'; the file's label is kept in obs['condition_original'].
    """
    from pyro_pvae.data import read_perturbseq

    with resources.as_file(_path(SUBSET_FILE)) as p:
        return read_perturbseq(p, format="canonical")


def norman19_effects() -> dict:
    """Norman 2019 pseudobulk effects: dict of numpy arrays with keys lfc_s, lfc_d,
    sing_labels, doub_labels, genes_hvg, hvg_index, comp_idx, comp_ok, Es, Ed, mu_g, sd_g
    (source, licence and meaning: pyro_pvae/datasets/SOURCES.md)."""
    with resources.as_file(_path(EFFECTS_FILE)) as p:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


__all__ = ["norman19_subset", "norman19_effects"]
