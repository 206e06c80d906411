"""Perturbation data layer: canonical AnnData, readers, validation, preprocessing, splits, batching.

- ``formats``: condition labels (``CONTROL``, ``parse_condition``, ``format_condition``),
  ``read_perturbseq`` / ``to_canonical`` (CPA, GEARS, scPerturb, Replogle, generic, canonical),
  ``validate_canonical`` (the readers' checks for an AnnData handed over directly),
  ``filter_genes``, ``select_hvg``, ``library_size``, ``lognormalize``, ``perturbation_vocabulary``,
  ``perturbation_matrix``.
- ``splits``: ``Split`` and ``split_norman_discrepancy``, ``split_combo_seen``,
  ``split_complete_doubles``, ``split_iid``; ``make_split`` by name (``SPLITS``).
- ``batching``: ``Batch``, ``CellBatcher``, ``BackedBatcher``, ``make_batcher``.
"""
from .batching import BackedBatcher, Batch, CellBatcher, make_batcher
from .formats import (
    CONTROL,
    FORMATS,
    SEP,
    DataError,
    condition_labels,
    filter_genes,
    format_condition,
    library_size,
    lognormalize,
    parse_condition,
    perturbation_matrix,
    perturbation_vocabulary,
    read_perturbseq,
    select_hvg,
    to_canonical,
    validate_canonical,
)
from .splits import (
    NORMAN_HELDOUT_SINGLES,
    SPLITS,
    Split,
    make_split,
    split_combo_seen,
    split_complete_doubles,
    split_iid,
    split_norman_discrepancy,
)

__all__ = [
    "CONTROL", "SEP", "FORMATS", "NORMAN_HELDOUT_SINGLES", "DataError",
    "parse_condition", "format_condition", "condition_labels",
    "read_perturbseq", "to_canonical", "validate_canonical",
    "library_size", "lognormalize", "filter_genes", "select_hvg", "perturbation_vocabulary", "perturbation_matrix",
    "Split", "SPLITS", "make_split", "split_norman_discrepancy", "split_combo_seen",
    "split_complete_doubles", "split_iid",
    "Batch", "CellBatcher", "BackedBatcher", "make_batcher",
]
