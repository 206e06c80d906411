"""Train / validation / test splits of a canonical AnnData (pure functions of the data and a seed).

``Split`` holds cell positions into ``adata.obs`` and round-trips through JSON. ``Split.notes``
records, per condition, anything the split leaves the model unable to learn (a target gene
with no training cell, e.g. a held-out single with too few cells to keep some for training);
the split functions log them as a warning.
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..utils import atomic_write_text
from .formats import CONTROL, DataError, condition_labels, parse_condition

logger = logging.getLogger(__name__)

#: Norman 2019 single perturbations whose first 96 cells are held out (Discrepancy-VAE protocol).
NORMAN_HELDOUT_SINGLES = (
    "KLF1", "BAK1", "CEBPE", "UBASH3B", "ETS2", "OSR2", "SLC4A1", "SET", "ELMSAN1",
    "MAP2K6", "FOXF1", "C19orf26", "FOXA1", "UBASH3A",
)

@dataclass
class Split:
    name: str
    seed: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    train_conditions: list[str]
    test_conditions: list[str]
    test_groups: dict[str, str]
    n_obs: int | None = None
    params: dict = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # condition -> what the model cannot learn

    def __post_init__(self):
        for k in ("train_idx", "val_idx", "test_idx"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.int64))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("train_idx", "val_idx", "test_idx"):
            d[k] = [int(i) for i in getattr(self, k)]
        return d

    def to_json(self, path) -> None:
        """Write atomically (unique temporary file in the same folder + os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path) -> "Split":
        path = Path(path)
        if not path.exists():
            raise DataError(f"split file does not exist: {str(path)!r}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"split file {str(path)!r} is not valid JSON: {e}") from None
        return cls(**d)

    def check(self, adata=None) -> None:
        """Raise DataError if the split is inconsistent (overlaps, or wrong number of cells)."""
        tr, va, te = set(self.train_idx.tolist()), set(self.val_idx.tolist()), set(self.test_idx.tolist())
        if tr & te or va & te or tr & va:
            raise DataError(f"split {self.name!r}: train/val/test overlap")
        if adata is not None and self.n_obs is not None and adata.n_obs != self.n_obs:
            raise DataError(f"split {self.name!r} was made for {self.n_obs} cells, data has "
                            f"{adata.n_obs}")


#: default share of control cells held out as the reference for observed changes: half, so
#: the held-out control mean is about as precise as the training one
CONTROL_TEST_FRACTION = 0.5


def _hold_out_controls(control: np.ndarray, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) control positions: a seeded ``fraction`` of ``control`` (own random
    stream; at least one control cell stays in training)."""
    if not 0 <= fraction < 1:
        raise DataError(f"control_test_fraction must be in [0, 1), got {fraction}")
    k = _n_take(len(control), fraction)
    pick = np.random.default_rng([int(seed), 104729]).permutation(len(control))
    return np.sort(control[pick[k:]]), np.sort(control[pick[:k]])


def heldout_control_idx(split: "Split", adata) -> np.ndarray:
    """Positions of the held-out control cells of ``split``: its test cells labelled control."""
    test = np.asarray(split.test_idx, dtype=np.int64)
    return test[condition_labels(adata)[test] == CONTROL]


def _groups(cond: np.ndarray) -> dict[str, np.ndarray]:
    """condition -> positions (in obs order), conditions sorted."""
    codes, uniq = pd.factorize(cond, sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniq)))
    starts = np.concatenate([[0], bounds[:-1]])
    return {str(u): order[s:e] for u, s, e in zip(uniq, starts, bounds)}


def _n_take(n: int, frac: float) -> int:
    """Number of cells out of n for a fraction: rounded, >=1 if frac>0, <= n-1 (n>=2)."""
    if frac <= 0 or n < 2:
        return 0
    return int(min(max(round(frac * n), 1), n - 1))


def _seen_group(targets: tuple[str, ...], seen: set[str]) -> str:
    k = sum(g in seen for g in targets)
    if k == len(targets):
        return "seen2"
    return f"seen{min(k, 1)}" if len(targets) > 2 and k >= 1 else f"seen{k}"


def _finish_split(name, seed, cond, train, test, test_groups, val_fraction, params) -> Split:
    train = np.sort(np.asarray(train, dtype=np.int64))
    test = np.sort(np.asarray(test, dtype=np.int64))
    # loosely stratified validation set carved from training cells (separate RNG stream);
    # a condition always keeps at least one training cell
    rng = np.random.default_rng([int(seed), 7919])
    val = []
    if val_fraction > 0 and len(train):
        groups = _groups(cond[train])
        for pos in groups.values():
            k = min(int(round(val_fraction * len(pos))), len(pos) - 1)
            if k > 0:
                val.append(train[rng.choice(pos, size=k, replace=False)])
        if not val:  # every condition too small for its fraction: one cell in all
            spare = train[np.isin(cond[train], [c for c, p in groups.items() if len(p) >= 2])]
            if len(spare):
                val.append(rng.choice(spare, size=1, replace=False))
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(train, val)
    train_conditions = sorted(set(cond[train].tolist()) | set(cond[val].tolist()))
    deliberate = set(params.get("unseen_genes", ()))
    notes = _untrained_targets(cond, train, deliberate)
    if notes:
        shown = "; ".join(f"{c}: {r}" for c, r in list(notes.items())[:10])
        more = f" (and {len(notes) - 10} more)" if len(notes) > 10 else ""
        logger.warning("split %s: %d condition(s) name targets without training cells, so the "
                       "model learns no effect for them: %s%s", name, len(notes), shown, more)
    s = Split(name=name, seed=int(seed), train_idx=train, val_idx=val, test_idx=test,
              train_conditions=train_conditions, test_conditions=sorted(test_groups),
              test_groups=dict(sorted(test_groups.items())), n_obs=len(cond),
              params=dict(params, val_fraction=val_fraction), notes=notes)
    s.check()
    return s


def _untrained_targets(cond: np.ndarray, train: np.ndarray, deliberate: set[str]) -> dict[str, str]:
    """{condition: reason} for conditions with target genes that no training cell carries
    (so not in the training vocabulary), other than the genes a split holds out on purpose."""
    vocab = {g for c in set(cond[train].tolist()) for g in parse_condition(c)}
    notes = {}
    for c in sorted(set(cond.tolist()) - {CONTROL}):
        missing = [g for g in parse_condition(c) if g not in vocab and g not in deliberate]
        if missing:
            notes[c] = f"no training cell carries {', '.join(missing)}"
    return notes


def _kinds(groups: dict[str, np.ndarray]):
    singles = {c: p for c, p in groups.items() if len(parse_condition(c)) == 1}
    combos = {c: p for c, p in groups.items() if len(parse_condition(c)) >= 2}
    control = groups.get(CONTROL, np.zeros(0, dtype=np.int64))
    return control, singles, combos


def split_norman_discrepancy(adata, seed: int = 0,
                             heldout_singles: Sequence[str] = NORMAN_HELDOUT_SINGLES,
                             n_heldout: int = 96, val_fraction: float = 0.05,
                             control_test_fraction: float = CONTROL_TEST_FRACTION) -> Split:
    """Norman 2019 protocol (Discrepancy-VAE / PerturbedVAE): train on controls (minus the
    held-out share ``control_test_fraction``) and singles; the first ``n_heldout`` cells (obs
    order) of each named single present go to test (group 'single'); every combination is held
    out entirely, grouped seen0/1/2 by how many of its genes are seen as singles in training."""
    cond = condition_labels(adata)
    control, singles, combos = _kinds(_groups(cond))
    control, ctrl_test = _hold_out_controls(control, seed, control_test_fraction)
    train, test, groups = [control], [ctrl_test], {}
    held = set(heldout_singles)
    for c, pos in singles.items():
        if c in held:
            test.append(pos[:n_heldout])
            train.append(pos[n_heldout:])
            groups[c] = "single"
        else:
            train.append(pos)
    train = np.concatenate(train)
    seen = {parse_condition(c)[0] for c in set(cond[train].tolist()) if c != CONTROL}
    for c, pos in combos.items():
        test.append(pos)
        groups[c] = _seen_group(parse_condition(c), seen)
    test = np.concatenate(test) if test else np.zeros(0, dtype=np.int64)
    return _finish_split("norman_discrepancy", seed, cond, train, test, groups, val_fraction,
                         {"heldout_singles": list(heldout_singles), "n_heldout": n_heldout,
                          "control_test_fraction": control_test_fraction})


def split_combo_seen(adata, seed: int = 0, unseen_gene_fraction: float = 0.2,
                     train_seen2_fraction: float = 0.5, single_test_fraction: float = 0.2,
                     val_fraction: float = 0.05,
                     control_test_fraction: float = CONTROL_TEST_FRACTION) -> Split:
    """GEARS-style combination split.

    A seeded ``unseen_gene_fraction`` of the genes that have a single condition is unseen:
    their singles go entirely to test (group 'single'). Each remaining ("seen") single keeps
    all but a seeded ``single_test_fraction`` of its cells in training (the held-out cells go
    to test, group 'single'). Combinations are seen0/1/2 by how many of their genes are seen;
    a seeded ``train_seen2_fraction`` of the seen2 combinations goes to training, the other
    seen2 and all seen0/seen1 combinations to test. ``train_seen2_fraction=0`` gives the
    harder split with no combinations in training. ``params['unseen_genes']`` records the
    unseen genes. A seeded ``control_test_fraction`` of the controls goes to test."""
    cond = condition_labels(adata)
    control, singles, combos = _kinds(_groups(cond))
    control, ctrl_test = _hold_out_controls(control, seed, control_test_fraction)
    rng = np.random.default_rng(int(seed))
    single_genes = sorted(parse_condition(c)[0] for c in singles)
    n_unseen = int(round(unseen_gene_fraction * len(single_genes)))
    unseen = set(rng.permutation(single_genes)[:n_unseen].tolist()) if n_unseen else set()
    train, test, groups = [control], [ctrl_test], {}
    for c, pos in singles.items():
        if parse_condition(c)[0] in unseen:
            test.append(pos)
        else:
            k = _n_take(len(pos), single_test_fraction)
            sel = rng.permutation(len(pos))
            test.append(pos[sel[:k]])
            train.append(pos[sel[k:]])
            if k == 0:
                continue
        groups[c] = "single"
    seen = set(single_genes) - unseen
    seen2 = [c for c in combos if _seen_group(parse_condition(c), seen) == "seen2"]
    n_tr = int(round(train_seen2_fraction * len(seen2)))
    train_combos = set(rng.permutation(sorted(seen2))[:n_tr].tolist()) if n_tr else set()
    for c, pos in combos.items():
        if c in train_combos:
            train.append(pos)
        else:
            test.append(pos)
            groups[c] = _seen_group(parse_condition(c), seen)
    test = np.concatenate(test) if test else np.zeros(0, dtype=np.int64)
    return _finish_split("combo_seen", seed, cond, np.concatenate(train), test, groups,
                         val_fraction, {"unseen_gene_fraction": unseen_gene_fraction,
                                        "train_seen2_fraction": train_seen2_fraction,
                                        "single_test_fraction": single_test_fraction,
                                        "control_test_fraction": control_test_fraction,
                                        "unseen_genes": sorted(unseen)})


def split_complete_doubles(adata, seed: int = 0, single_test_fraction: float = 0.2,
                           val_fraction: float = 0.05,
                           control_test_fraction: float = CONTROL_TEST_FRACTION) -> Split:
    """Train on control (minus a seeded ``control_test_fraction``, held out to test), singles
    (minus a seeded fraction of each single's cells, test group 'single') and combinations
    with some gene not present as a single; test on combinations whose genes are all present
    as singles (group 'seen2')."""
    cond = condition_labels(adata)
    control, singles, combos = _kinds(_groups(cond))
    control, ctrl_test = _hold_out_controls(control, seed, control_test_fraction)
    rng = np.random.default_rng(int(seed))
    single_genes = {parse_condition(c)[0] for c in singles}
    train, test, groups = [control], [ctrl_test], {}
    for c, pos in singles.items():
        k = _n_take(len(pos), single_test_fraction)
        sel = rng.permutation(len(pos))
        test.append(pos[sel[:k]])
        train.append(pos[sel[k:]])
        if k:
            groups[c] = "single"
    for c, pos in combos.items():
        if all(g in single_genes for g in parse_condition(c)):
            test.append(pos)
            groups[c] = "seen2"
        else:
            train.append(pos)
    test = np.concatenate(test) if test else np.zeros(0, dtype=np.int64)
    return _finish_split("complete_doubles", seed, cond, np.concatenate(train), test, groups,
                         val_fraction, {"single_test_fraction": single_test_fraction,
                                        "control_test_fraction": control_test_fraction})


def split_iid(adata, seed: int = 0, test_fraction: float = 0.2,
              val_fraction: float = 0.05,
              control_test_fraction: float = CONTROL_TEST_FRACTION) -> Split:
    """Random split of the cells of every perturbation condition (Replogle protocol); a seeded
    ``control_test_fraction`` of the controls goes to test. Control test cells are in
    ``test_idx`` but 'control' is not a test condition."""
    cond = condition_labels(adata)
    rng = np.random.default_rng(int(seed))
    control, ctrl_test = _hold_out_controls(_groups(cond).get(CONTROL, np.zeros(0, dtype=np.int64)),
                                            seed, control_test_fraction)
    train, test, groups = [control], [ctrl_test], {}
    for c, pos in _groups(cond).items():
        if c == CONTROL:
            continue
        k = _n_take(len(pos), test_fraction)
        sel = rng.permutation(len(pos))
        test.append(pos[sel[:k]])
        train.append(pos[sel[k:]])
        if k:
            t = parse_condition(c)
            groups[c] = "single" if len(t) == 1 else "seen2"
    test = np.concatenate(test) if test else np.zeros(0, dtype=np.int64)
    return _finish_split("iid", seed, cond, np.concatenate(train), test, groups, val_fraction,
                         {"test_fraction": test_fraction, "control_test_fraction": control_test_fraction})


SPLITS = {
    "norman_discrepancy": split_norman_discrepancy,
    "combo_seen": split_combo_seen,
    "complete_doubles": split_complete_doubles,
    "iid": split_iid,
}


def make_split(adata, name: str, seed: int = 0, **kwargs) -> Split:
    """Dispatch to a split function by name."""
    if name not in SPLITS:
        near = difflib.get_close_matches(str(name), list(SPLITS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DataError(f"unknown split {name!r}{hint}; known splits: {sorted(SPLITS)}")
    return SPLITS[name](adata, seed=seed, **kwargs)


