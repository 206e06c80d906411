"""Perturbation data layer: canonical AnnData, readers, validation, preprocessing, splits, batching.

Canonical form (see docs/ARCHITECTURE.md): CSR float32 raw counts in ``X``, unique gene
symbols in ``var_names``, ``obs['condition']`` = ``"control"`` or sorted targets joined by
``"+"``, ``obs['n_targets']``.
"""
from __future__ import annotations

from typing import Iterable

CONTROL = "control"
SEP = "+"


class DataError(ValueError):
    """Bad input data: the message says what was wrong and what was expected."""


def parse_condition(label: str) -> tuple[str, ...]:
    """Canonical label -> tuple of target genes (empty for control)."""
    if label == CONTROL:
        return ()
    return tuple(label.split(SEP))


def format_condition(targets: Iterable[str]) -> str:
    """Tuple/set of target genes -> canonical label (sorted, joined by '+')."""
    targets = sorted(set(targets))
    return SEP.join(targets) if targets else CONTROL
