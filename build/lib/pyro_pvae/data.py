"""Perturbation data layer: canonical AnnData, readers, validation, preprocessing, splits, batching.

Canonical form (see docs/ARCHITECTURE.md): CSR float32 raw counts in ``X``, unique gene
symbols in ``var_names``, ``obs['condition']`` = ``"control"`` or sorted targets joined by
``"+"``, ``obs['n_targets']``.

Entry points
------------
- ``read_perturbseq(path, format="auto", label_key=None, control_label=None, sep=None)``
- ``to_canonical(adata, format="auto", ...)`` for an in-memory AnnData
- ``validate_canonical(adata)``
- ``select_hvg``, ``library_size``, ``lognormalize``
- ``perturbation_vocabulary``, ``perturbation_matrix``
- ``Split`` and ``split_norman_discrepancy``, ``split_combo_seen``,
  ``split_complete_doubles``, ``split_iid``, ``make_split``
- ``Batch``, ``CellBatcher``, ``BackedBatcher``, ``make_batcher``
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import tempfile

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

CONTROL = "control"
SEP = "+"

#: Norman 2019 single perturbations whose first 96 cells are held out (REFERENCE.md).
NORMAN_HELDOUT_SINGLES = (
    "KLF1", "BAK1", "CEBPE", "UBASH3B", "ETS2", "OSR2", "SLC4A1", "SET", "ELMSAN1",
    "MAP2K6", "FOXF1", "C19orf26", "FOXA1", "UBASH3A",
)


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


# ----------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _FormatSpec:
    label_key: str
    control_label: str
    sep: str
    drop_tokens: tuple[str, ...] = ()   # tokens meaning "no target" inside a combination
    allow_empty_tokens: bool = False    # CPA: '' is control, stray empty tokens dropped


FORMATS: dict[str, _FormatSpec] = {
    "cpa": _FormatSpec("guide_ids", "", ",", allow_empty_tokens=True),
    "gears": _FormatSpec("condition", "ctrl", "+", drop_tokens=("ctrl",)),
    "scperturb": _FormatSpec("perturbation", "control", "_"),
    "canonical": _FormatSpec("condition", CONTROL, SEP),
    "replogle": _FormatSpec("gene", "non-targeting", "+"),
}
_FORMAT_ALIASES = {"own": "canonical", "pyro_pvae": "canonical", "shipped": "canonical",
                   "scperturb-style": "scperturb"}
_CONTROL_CANDIDATES = ("control", "ctrl", "non-targeting", "non_targeting", "NT", "")


def _detect_format(adata, only: str | None = None) -> str:
    """Format from obs columns/labels; ``only``: look at that column alone (user's label_key)."""
    cols = list(adata.obs.columns)
    if only is not None:
        cols = [c for c in cols if c == only]
    if "guide_ids" in cols:
        return "cpa"
    if "condition" in cols:
        labels = set(map(str, pd.unique(adata.obs["condition"].astype(str))))
        has_ctrl = "ctrl" in labels or any("ctrl" in lab.split("+") for lab in labels)
        if has_ctrl and CONTROL not in labels:
            return "gears"
        return "canonical"
    if "perturbation" in cols:
        return "scperturb"
    if "gene" in cols:
        labels = set(map(str, pd.unique(adata.obs["gene"].astype(str))))
        if "non-targeting" in labels:
            return "replogle"
    raise DataError(
        "could not detect the perturbation format: none of the known label columns "
        "('guide_ids' [CPA], 'condition' [GEARS/canonical], 'perturbation' [scPerturb], "
        f"'gene' [Replogle]) is in obs. obs columns: {cols}. Pass label_key=, control_label= "
        "and sep= (config keys data.label_key, data.control_label, data.sep)."
    )


def _resolve_spec(adata, format, label_key, control_label, sep) -> tuple[str, _FormatSpec]:
    fmt = (format or "auto").lower()
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt == "auto":
        try:
            fmt = _detect_format(adata, only=label_key)
        except DataError:
            if label_key is None:
                raise
            fmt = "generic"
    if fmt == "generic":
        if label_key is None:
            raise DataError("format='generic' needs label_key= (the obs column holding the "
                            f"perturbation labels); obs columns: {list(adata.obs.columns)}")
        base = _FormatSpec(label_key, control_label if control_label is not None else "",
                           sep if sep is not None else SEP)
        if control_label is None:
            if label_key not in adata.obs.columns:
                raise DataError(f"label column obs[{label_key!r}] not found; obs columns: "
                                f"{list(adata.obs.columns)}")
            seen = set(map(str, pd.unique(adata.obs[label_key].astype(str))))
            guess = next((c for c in _CONTROL_CANDIDATES if c in seen), None)
            if guess is None:
                raise DataError(
                    f"format='generic' without control_label=: none of the usual control "
                    f"labels {list(_CONTROL_CANDIDATES)} occurs in obs[{label_key!r}]; most "
                    f"common labels: {_top_labels(adata.obs[label_key])}")
            logger.info("generic format: using control label %r", guess)
            base = _FormatSpec(label_key, guess, base.sep)
        return fmt, base
    if fmt not in FORMATS:
        raise DataError(f"unknown format {format!r}; known: "
                        f"{['auto', 'generic', *FORMATS]}")
    spec = FORMATS[fmt]
    spec = _FormatSpec(
        label_key if label_key is not None else spec.label_key,
        control_label if control_label is not None else spec.control_label,
        sep if sep is not None else spec.sep,
        spec.drop_tokens, spec.allow_empty_tokens)
    return fmt, spec


def _top_labels(labels: pd.Series, k: int = 8) -> list[str]:
    vc = labels.astype(str).value_counts()
    return [f"{lab!r} ({n})" for lab, n in vc.head(k).items()]


# ----------------------------------------------------------------------------------------
# Label canonicalisation
# ----------------------------------------------------------------------------------------

def _norm_token(tok: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", tok.upper())


def _check_typos(tokens: Iterable[str], where: str) -> None:
    groups: dict[str, set[str]] = {}
    for t in tokens:
        groups.setdefault(_norm_token(t), set()).add(t)
    bad = [sorted(g) for g in groups.values() if len(g) > 1]
    if bad:
        shown = "; ".join(" vs ".join(repr(t) for t in g) for g in sorted(bad)[:10])
        raise DataError(
            f"target names in {where} that differ only in case/punctuation (typo?): {shown}. "
            "Fix the labels so each gene is spelled one way.")


def _canonical_labels(labels: pd.Series, spec: _FormatSpec, where: str) -> tuple[np.ndarray, dict]:
    """Map raw labels -> canonical labels (per unique label). Returns (canon array, map)."""
    raw = labels.astype(object)
    isna = pd.isna(raw).to_numpy()
    if isna.any():
        if spec.control_label == "":
            raw = raw.where(~isna, "")
        else:
            raise DataError(f"{int(isna.sum())} cells have a missing (NaN) label in {where}; "
                            "every cell needs a perturbation label "
                            f"(control label {spec.control_label!r})")
    raw = raw.astype(str)
    mapping: dict[str, str] = {}
    all_tokens: set[str] = set()
    for lab in pd.unique(raw):
        s = lab.strip()
        if s == spec.control_label:
            mapping[lab] = CONTROL
            continue
        if spec.sep:
            toks = [t.strip() for t in s.split(spec.sep)]
        else:
            toks = [s]
        if not spec.allow_empty_tokens and any(t == "" for t in toks):
            raise DataError(f"empty target name in label {lab!r} of {where} (separator "
                            f"{spec.sep!r}); labels must name every target, control cells "
                            f"are labelled {spec.control_label!r}")
        toks = [t for t in toks if t != "" and t not in spec.drop_tokens
                and t != spec.control_label]
        for t in toks:
            if SEP in t:
                raise DataError(f"target name {t!r} in label {lab!r} of {where} contains "
                                f"{SEP!r}; with separator {spec.sep!r} that is not allowed "
                                "(wrong sep= ?)")
            if t in (CONTROL, "ctrl"):
                raise DataError(f"label {lab!r} of {where} combines a control token with "
                                f"targets; control cells must be labelled {spec.control_label!r}")
        all_tokens.update(toks)
        mapping[lab] = format_condition(toks)
    _check_typos(all_tokens, where)
    canon = raw.map(mapping).to_numpy(dtype=object)
    return canon, mapping


# ----------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------

def _matrix_values(m) -> np.ndarray:
    if sp.issparse(m):
        return np.asarray(m.data)
    return np.asarray(m).ravel()


def _inspect_counts(m, key: str) -> tuple[bool, str]:
    """(is_counts, reason). Raises DataError for integer-like data with NaN/inf/negatives."""
    v = _matrix_values(m)
    if v.size == 0:
        return True, "ok"
    if not np.issubdtype(v.dtype, np.number):
        return False, f"non-numeric dtype {v.dtype}"
    if np.issubdtype(v.dtype, np.integer):
        n_neg = int((v < 0).sum())
        if n_neg:
            raise DataError(f"{n_neg} negative values in {key} (e.g. {int(v[v < 0][0])}); "
                            "raw UMI counts must be >= 0")
        return True, "ok"
    finite = np.isfinite(v)
    n_nan = int(np.isnan(v).sum())
    n_inf = int((~finite).sum()) - n_nan
    fv = v[finite]
    nonint = np.abs(fv - np.rint(fv)) > 1e-3
    n_nonint = int(nonint.sum())
    n_neg = int((fv < 0).sum())
    if n_nonint:
        ex = float(fv[nonint][0])
        extra = f", plus {n_nan} NaN / {n_inf} inf" if (n_nan or n_inf) else ""
        return False, (f"{n_nonint} non-integer values (e.g. {ex:.4g}; looks normalised/"
                       f"log-transformed){extra}")
    if n_nan or n_inf or n_neg:
        parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "inf"),
                                               (n_neg, "negative")) if n]
        raise DataError(f"{', '.join(parts)} values in {key}; raw UMI counts must be finite "
                        "and >= 0")
    return True, "ok"


def _find_counts(adata, source: str):
    """Return (matrix aligned to adata.var_names, key) holding raw integer counts."""
    checked = []
    ok, why = _inspect_counts(adata.X, "X") if adata.X is not None else (False, "absent")
    if ok:
        return adata.X, "X"
    checked.append(f"X ({why})")
    if "counts" in adata.layers:
        m = adata.layers["counts"]
        ok, why = _inspect_counts(m, "layers['counts']")
        if ok:
            return m, "layers['counts']"
        checked.append(f"layers['counts'] ({why})")
    else:
        checked.append(f"layers['counts'] (absent; layers: {list(adata.layers.keys())})")
    if adata.raw is not None:
        raw = adata.raw
        pos = raw.var_names.get_indexer(adata.var_names)
        if (pos < 0).any():
            missing = list(adata.var_names[pos < 0][:5])
            checked.append(f"raw ({int((pos < 0).sum())} of the genes missing from raw.var_names, "
                           f"e.g. {missing})")
        else:
            m = raw.X
            m = m[:, pos] if sp.issparse(m) else np.asarray(m)[:, pos]
            ok, why = _inspect_counts(m, "raw.X")
            if ok:
                return m, "raw.X"
            checked.append(f"raw.X ({why})")
    else:
        checked.append("raw (absent)")
    raise DataError(
        f"no raw integer UMI counts found in {source}: checked " + "; ".join(checked) +
        ". PerturbedVAE models raw integer UMI counts (negative-binomial likelihood); "
        "provide them in X, layers['counts'] or .raw — log-normalised values are never "
        "used as counts.")


def _to_csr_f32(m) -> sp.csr_matrix:
    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float32)
    else:
        m = sp.csr_matrix(np.asarray(m, dtype=np.float32))
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data = np.rint(m.data).astype(np.float32)
    m.sort_indices()
    return m


# ----------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------

def read_perturbseq(path, format: str = "auto", label_key: str | None = None,
                    control_label: str | None = None, sep: str | None = None):
    """Read a Perturb-seq h5ad file in any supported format and return the canonical AnnData.

    ``format``: 'auto' (default; detected from obs columns/labels, logged), 'cpa', 'gears',
    'scperturb', 'canonical' (our own/shipped), 'replogle' or 'generic' (give ``label_key``,
    ``control_label`` and ``sep``). Explicit ``label_key``/``control_label``/``sep`` override
    the format's defaults.
    """
    import anndata

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"file does not exist: {str(p)!r}")
    if p.is_dir():
        raise DataError(f"{str(p)!r} is a directory, expected an .h5ad file")
    if p.suffix.lower() != ".h5ad":
        raise DataError(f"{str(p)!r} is not an .h5ad file (suffix {p.suffix!r}); convert it "
                        "to AnnData .h5ad first")
    try:
        adata = anndata.read_h5ad(p)
    except Exception as e:  # h5py/anndata errors: re-raise without the deep stack
        raise DataError(f"could not read {str(p)!r} as h5ad ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); is it a valid AnnData "
                        "file?") from None
    return to_canonical(adata, format=format, label_key=label_key,
                        control_label=control_label, sep=sep, source=str(p))


def to_canonical(adata, format: str = "auto", label_key: str | None = None,
                 control_label: str | None = None, sep: str | None = None,
                 source: str = "<in-memory AnnData>"):
    """Convert an in-memory AnnData (any supported format) to the canonical form (a new object)."""
    import anndata

    fmt, spec = _resolve_spec(adata, format, label_key, control_label, sep)
    logger.info("%s: using format %r (labels in obs[%r], control %r, separator %r)",
                source, fmt, spec.label_key, spec.control_label, spec.sep)
    if spec.label_key not in adata.obs.columns:
        raise DataError(f"label column obs[{spec.label_key!r}] not found in {source}; obs "
                        f"columns: {list(adata.obs.columns)}")
    where = f"obs[{spec.label_key!r}] of {source}"
    canon, _ = _canonical_labels(adata.obs[spec.label_key], spec, where)
    if not (canon == CONTROL).any():
        raise DataError(f"no control cells in {where}: expected label "
                        f"{spec.control_label!r}; most common labels: "
                        f"{_top_labels(adata.obs[spec.label_key])}. Pass control_label= "
                        "(config key data.control_label).")

    # gene names
    var = adata.var.copy()
    names = pd.Index(adata.var_names.astype(str))
    if "gene_name" in var.columns and (fmt == "gears" or
                                       all(str(n).startswith("ENS") for n in names[:50])):
        var["gene_id"] = names.to_numpy()
        names = pd.Index(var["gene_name"].astype(str).to_numpy())
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise DataError(f"{len(dup)} duplicate gene names in {source}: {list(dup[:10])}; gene "
                        "names (var_names) must be unique")

    counts, counts_key = _find_counts(adata, source)
    X = _to_csr_f32(counts)

    obs = adata.obs.copy()
    if spec.label_key == "condition":
        obs["condition_original"] = adata.obs["condition"].astype(str).to_numpy()
    cats = sorted(set(canon))
    obs["condition"] = pd.Categorical(canon, categories=pd.Index(cats, dtype=object))
    codes, uniq = pd.factorize(canon)
    obs["n_targets"] = np.array([len(parse_condition(c)) for c in uniq], dtype=np.int64)[codes]
    var.index = names
    var.index.name = None
    out = anndata.AnnData(X=X, obs=_plain_strings(obs), var=_plain_strings(var))
    out.obs_names_make_unique()
    out.uns["pyro_pvae"] = {"format": fmt, "label_key": spec.label_key,
                            "control_label": spec.control_label, "sep": spec.sep,
                            "counts_source": counts_key, "source": source}
    logger.info("%s: %d cells x %d genes, %d conditions, counts from %s", source,
                out.n_obs, out.n_vars, len(cats), counts_key)
    return out


def _plain_strings(df: pd.DataFrame) -> pd.DataFrame:
    """Index and string columns as object dtype: pandas >= 3 infers its new string dtype,
    which anndata refuses to write by default (allow_write_nullable_strings)."""
    df = df.copy()
    df.index = pd.Index(np.asarray(df.index.astype(str), dtype=object), dtype=object)
    for k in df.columns:
        if pd.api.types.is_string_dtype(df[k].dtype) and not isinstance(
                df[k].dtype, pd.CategoricalDtype):
            df[k] = pd.Series(np.asarray(df[k], dtype=object), index=df.index, dtype=object)
    return df


def validate_canonical(adata) -> None:
    """Raise DataError unless ``adata`` is in the canonical form."""
    if "condition" not in adata.obs.columns:
        raise DataError("obs['condition'] missing: run data.to_canonical / read_perturbseq "
                        f"first; obs columns: {list(adata.obs.columns)}")
    cond = adata.obs["condition"].astype(str)
    if not (cond == CONTROL).any():
        raise DataError(f"no control cells (obs['condition'] == {CONTROL!r}); most common "
                        f"labels: {_top_labels(cond)}")
    bad = [c for c in pd.unique(cond) if c != CONTROL and c != format_condition(c.split(SEP))]
    if bad:
        raise DataError(f"non-canonical conditions (need sorted targets joined by '+'): {bad[:10]}")
    if adata.var_names.duplicated().any():
        raise DataError(f"duplicate gene names: {list(adata.var_names[adata.var_names.duplicated()][:10])}")
    ok, why = _inspect_counts(adata.X, "X")
    if not ok:
        raise DataError(f"X does not hold raw integer counts: {why}")


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------

def _counts_matrix(adata_or_matrix):
    if hasattr(adata_or_matrix, "obs") and hasattr(adata_or_matrix, "X"):
        return adata_or_matrix.X
    return adata_or_matrix


def library_size(adata_or_matrix) -> np.ndarray:
    """Total counts per cell, float64 (n,)."""
    m = _counts_matrix(adata_or_matrix)
    return np.asarray(m.sum(axis=1), dtype=np.float64).ravel()


def lognormalize(adata_or_matrix, target_sum: float = 1e4):
    """log1p(counts / total * target_sum), per cell (zero-count cells stay 0).

    Sparse in -> CSR float32 out; dense in -> dense float32 out. Given an AnnData, the result
    is also stored as ``layers['lognorm']``.
    """
    is_ad = hasattr(adata_or_matrix, "obs") and hasattr(adata_or_matrix, "X")
    m = _counts_matrix(adata_or_matrix)
    lib = library_size(m)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    if sp.issparse(m):
        out = sp.csr_matrix(m, dtype=np.float32, copy=True)
        out.data = np.log1p(out.data * np.repeat(scale, np.diff(out.indptr))).astype(np.float32)
    else:
        a = np.asarray(m, dtype=np.float64)
        out = np.log1p(a * scale[:, None]).astype(np.float32)
    if is_ad:
        adata_or_matrix.layers["lognorm"] = out
    return out


def _target_genes(adata) -> list[str]:
    return perturbation_vocabulary(adata)


def select_hvg(adata, n_top_genes: int, keep: Sequence[str] | None = None):
    """Subset to highly variable genes (scanpy flavor 'seurat' on a log-normalised copy),
    always keeping the perturbed target genes present in var_names and the genes in ``keep``.

    Returns a new AnnData (genes in original order) with ``var['highly_variable']`` (ranked
    HVG) and ``var['forced']`` (kept because targeted / requested). Total genes =
    max(n_top_genes, number of forced genes).
    """
    import anndata
    import scanpy as sc

    keep = list(keep or [])
    missing = [g for g in keep if g not in adata.var_names]
    if missing:
        raise DataError(f"genes requested in keep= not in var_names: {missing[:10]}")
    forced = set(keep) | {g for g in _target_genes(adata) if g in adata.var_names}
    tmp = anndata.AnnData(X=lognormalize(adata.X), obs=pd.DataFrame(index=adata.obs_names),
                          var=pd.DataFrame(index=adata.var_names))
    df = sc.pp.highly_variable_genes(tmp, flavor="seurat", inplace=False)
    disp = pd.Series(np.asarray(df["dispersions_norm"], dtype=float), index=adata.var_names)
    order = disp.fillna(-np.inf).sort_values(ascending=False, kind="stable").index
    n_total = max(int(n_top_genes), len(forced))
    chosen = list(forced)
    hv = []
    for g in order:
        if len(chosen) >= n_total:
            break
        if g not in forced:
            chosen.append(g)
            hv.append(g)
    chosen_set = set(chosen)
    mask = np.array([g in chosen_set for g in adata.var_names])
    out = adata[:, mask].copy()
    top = set(order[:int(n_top_genes)]) | set(hv)
    out.var["highly_variable"] = [g in top for g in out.var_names]
    out.var["forced"] = [g in forced for g in out.var_names]
    out.var["dispersions_norm"] = disp[out.var_names].to_numpy()
    return out


# ----------------------------------------------------------------------------------------
# Perturbation encodings
# ----------------------------------------------------------------------------------------

def _conditions(adata) -> np.ndarray:
    if "condition" not in adata.obs.columns:
        raise DataError("obs['condition'] missing: run data.to_canonical / read_perturbseq "
                        f"first; obs columns: {list(adata.obs.columns)}")
    return adata.obs["condition"].astype(str).to_numpy()


def perturbation_vocabulary(adata, idx=None) -> list[str]:
    """Sorted target genes appearing in the conditions of the cells ``idx`` (all if None)."""
    cond = _conditions(adata)
    if idx is not None:
        cond = cond[np.asarray(idx)]
    genes: set[str] = set()
    for c in pd.unique(cond):
        genes.update(parse_condition(c))
    return sorted(genes)


def _unknown_error(unknown_genes: Iterable[str], vocabulary: Sequence[str]) -> DataError:
    lines = []
    for g in sorted(set(unknown_genes))[:10]:
        near = difflib.get_close_matches(g, list(vocabulary), n=3, cutoff=0.5)
        lines.append(f"{g!r} (nearest known: {near})")
    return DataError("condition names genes not in the perturbation vocabulary: "
                     + "; ".join(lines) + f". Vocabulary has {len(vocabulary)} genes; pass "
                     "unknown='ignore' to drop unknown targets.")


def perturbation_matrix(conditions: Sequence[str], vocabulary: Sequence[str],
                        unknown: str = "raise") -> np.ndarray:
    """Multi-hot float32 (n, P) matrix of targets; unknown genes raise unless unknown='ignore'."""
    index = {g: i for i, g in enumerate(vocabulary)}
    conditions = [str(c) for c in conditions]
    u = np.zeros((len(conditions), len(vocabulary)), dtype=np.float32)
    cache: dict[str, list[int]] = {}
    bad: set[str] = set()
    for r, c in enumerate(conditions):
        if c not in cache:
            cols = []
            for g in parse_condition(c):
                if g in index:
                    cols.append(index[g])
                else:
                    bad.add(g)
            cache[c] = cols
        u[r, cache[c]] = 1.0
    if bad and unknown != "ignore":
        raise _unknown_error(bad, vocabulary)
    return u


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------

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

    def __post_init__(self):
        for k in ("train_idx", "val_idx", "test_idx"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.int64))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("train_idx", "val_idx", "test_idx"):
            d[k] = [int(i) for i in getattr(self, k)]
        return d

    def to_json(self, path) -> None:
        """Write atomically (temporary file in the same folder + os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

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
    # loosely stratified validation set carved from training cells (separate RNG stream)
    rng = np.random.default_rng([int(seed), 7919])
    val = []
    if val_fraction > 0 and len(train):
        for c, pos in _groups(cond[train]).items():
            k = int(round(val_fraction * len(pos)))
            k = min(k, len(pos) - 1)
            if k > 0:
                val.append(train[rng.choice(pos, size=k, replace=False)])
        if not val and len(train) >= 2:
            val.append(rng.choice(train, size=1, replace=False))
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(train, val)
    train_conditions = sorted(set(cond[train].tolist()) | set(cond[val].tolist()))
    test_conditions = sorted(test_groups)
    s = Split(name=name, seed=int(seed), train_idx=train, val_idx=val, test_idx=test,
              train_conditions=train_conditions, test_conditions=test_conditions,
              test_groups=dict(sorted(test_groups.items())), n_obs=len(cond),
              params=dict(params, val_fraction=val_fraction))
    s.check()
    return s


def _kinds(groups: dict[str, np.ndarray]):
    singles = {c: p for c, p in groups.items() if len(parse_condition(c)) == 1}
    combos = {c: p for c, p in groups.items() if len(parse_condition(c)) >= 2}
    control = groups.get(CONTROL, np.zeros(0, dtype=np.int64))
    return control, singles, combos


def split_norman_discrepancy(adata, seed: int = 0,
                             heldout_singles: Sequence[str] = NORMAN_HELDOUT_SINGLES,
                             n_heldout: int = 96, val_fraction: float = 0.05) -> Split:
    """Norman 2019 protocol (Discrepancy-VAE / PerturbedVAE): train on controls and singles;
    the first ``n_heldout`` cells (obs order) of each named single present go to test
    (group 'single'); every combination is held out entirely, grouped seen0/1/2 by how many
    of its genes are seen as singles in training."""
    cond = _conditions(adata)
    control, singles, combos = _kinds(_groups(cond))
    train, test, groups = [control], [], {}
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
                         {"heldout_singles": list(heldout_singles), "n_heldout": n_heldout})


def split_combo_seen(adata, seed: int = 0, unseen_gene_fraction: float = 0.2,
                     train_seen2_fraction: float = 0.5, single_test_fraction: float = 0.2,
                     val_fraction: float = 0.05) -> Split:
    """GEARS-style combination split.

    A seeded ``unseen_gene_fraction`` of the genes that have a single condition is unseen:
    their singles go entirely to test (group 'single'). Each remaining ("seen") single keeps
    all but a seeded ``single_test_fraction`` of its cells in training (the held-out cells go
    to test, group 'single'). Combinations are seen0/1/2 by how many of their genes are seen;
    a seeded ``train_seen2_fraction`` of the seen2 combinations goes to training, the other
    seen2 and all seen0/seen1 combinations to test. ``train_seen2_fraction=0`` gives the
    harder split with no combinations in training. ``params['unseen_genes']`` records the
    unseen genes."""
    cond = _conditions(adata)
    control, singles, combos = _kinds(_groups(cond))
    rng = np.random.default_rng(int(seed))
    single_genes = sorted(parse_condition(c)[0] for c in singles)
    n_unseen = int(round(unseen_gene_fraction * len(single_genes)))
    unseen = set(rng.permutation(single_genes)[:n_unseen].tolist()) if n_unseen else set()
    train, test, groups = [control], [], {}
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
                                        "unseen_genes": sorted(unseen)})


def split_complete_doubles(adata, seed: int = 0, single_test_fraction: float = 0.2,
                           val_fraction: float = 0.05) -> Split:
    """Train on control, singles (minus a seeded fraction of each single's cells, test group
    'single') and combinations with some gene not present as a single; test on combinations
    whose genes are all present as singles (group 'seen2')."""
    cond = _conditions(adata)
    control, singles, combos = _kinds(_groups(cond))
    rng = np.random.default_rng(int(seed))
    single_genes = {parse_condition(c)[0] for c in singles}
    train, test, groups = [control], [], {}
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
                         val_fraction, {"single_test_fraction": single_test_fraction})


def split_iid(adata, seed: int = 0, test_fraction: float = 0.2,
              val_fraction: float = 0.05) -> Split:
    """Random split of the cells of every condition (Replogle protocol), controls included.
    Control test cells are in ``test_idx`` but 'control' is not a test condition."""
    cond = _conditions(adata)
    rng = np.random.default_rng(int(seed))
    train, test, groups = [], [], {}
    for c, pos in _groups(cond).items():
        k = _n_take(len(pos), test_fraction)
        sel = rng.permutation(len(pos))
        test.append(pos[sel[:k]])
        train.append(pos[sel[k:]])
        if k and c != CONTROL:
            t = parse_condition(c)
            groups[c] = "single" if len(t) == 1 else "seen2"
    test = np.concatenate(test) if test else np.zeros(0, dtype=np.int64)
    return _finish_split("iid", seed, cond, np.concatenate(train), test, groups, val_fraction,
                         {"test_fraction": test_fraction})


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


# ----------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------

try:  # torch is a hard dependency of the package, but keep the data layer importable
    import torch
    from torch import Tensor
except ImportError:  # pragma: no cover
    torch = None
    Tensor = Any


@dataclass
class Batch:
    x: "Tensor"       # (B, G) float32 counts on device
    u: "Tensor"       # (B, P) float32 multi-hot perturbation indicators
    x_ctrl: "Tensor"  # (B, G) counts of randomly paired training control cells
    idx: "Tensor"     # (B,) long, positions into adata.obs


def _epoch_generator(seed: int, epoch: int) -> "torch.Generator":
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2 ** 63 - 1))
    return g


def _target_table(conditions: np.ndarray, vocabulary: Sequence[str], check_idx=None) -> np.ndarray:
    """(N, max_targets) int64 target indices, -1 padded; unknown genes in check_idx raise."""
    index = {g: i for i, g in enumerate(vocabulary)}
    codes, uniq = pd.factorize(np.asarray(conditions, dtype=object))
    parsed = [parse_condition(str(c)) for c in uniq]
    width = max([len(t) for t in parsed] + [1])
    table_u = np.full((len(uniq), width), -1, dtype=np.int64)
    unknown_by_code = {}
    for j, t in enumerate(parsed):
        for k, g in enumerate(t):
            if g in index:
                table_u[j, k] = index[g]
            else:
                unknown_by_code[j] = g
    if unknown_by_code and check_idx is not None:
        used = set(np.unique(codes[np.asarray(check_idx)]).tolist())
        bad = [g for j, g in unknown_by_code.items() if j in used]
        if bad:
            raise _unknown_error(bad, vocabulary)
    return table_u[codes]


def _check_indices(idx, n: int, what: str) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{what} has positions outside [0, {n}): min {idx.min()}, max {idx.max()}")
    return idx


def _n_batches(n: int, batch_size: int, drop_last: bool) -> int:
    if n == 0:
        return 0
    if drop_last and n >= batch_size:
        return n // batch_size
    return math.ceil(n / batch_size)


def _gather_rows(crow, col, val, idx, n_genes: int):
    """Dense (B, G) rows ``idx`` of a CSR matrix given as (crow, col, val) tensors (same device).

    torch's sparse CSR has no row ``index_select``: gather the rows' slices of col/val by
    position (starts + offsets via repeat_interleave) and scatter them into a zero matrix.
    Assumes no duplicate entries within a row (canonical CSR)."""
    starts = crow[idx]
    lengths = crow[idx + 1] - starts
    B = idx.shape[0]
    dev = val.device
    total = int(lengths.sum())
    out = torch.zeros(B * n_genes, dtype=val.dtype, device=dev)
    if total == 0:
        return out.view(B, n_genes)
    rows = torch.repeat_interleave(torch.arange(B, device=dev), lengths, output_size=total)
    offs = torch.cumsum(lengths, 0) - lengths
    pos = (starts - offs)[rows] + torch.arange(total, device=dev)
    flat = rows * n_genes + col[pos].long()
    out.scatter_(0, flat, val[pos])
    return out.view(B, n_genes)


def _u_from_targets(targets, P: int):
    B = targets.shape[0]
    u = torch.zeros((B, P), dtype=torch.float32, device=targets.device)
    mask = targets >= 0
    rows = torch.arange(B, device=targets.device).unsqueeze(1).expand_as(targets)
    u[rows[mask], targets[mask]] = 1.0
    return u


class CellBatcher:
    """In-memory batcher: the whole count matrix lives as CSR tensors on ``device`` and each
    batch is densified there by a row gather.

    Each epoch's order is a function of (seed, epoch) only; call ``set_epoch(e)`` before
    iterating (the epoch counter also advances by one after each complete pass). With
    ``drop_last=True`` an incomplete final batch is dropped, except when the cells do not fill
    even one batch (then all of them form one batch, so training never silently sees nothing).
    Each batch also draws ``len(batch)`` random control cells (``control_idx``) with the same
    seeded generator for ``x_ctrl``.
    """

    def __init__(self, adata, cell_idx, vocabulary, control_idx, batch_size: int,
                 device="cpu", seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if torch is None:  # pragma: no cover
            raise ImportError("CellBatcher needs torch")
        X = adata.X
        if not sp.issparse(X):
            X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
        X = sp.csr_matrix(X, dtype=np.float32)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        N, G = X.shape
        self.device = torch.device(device)
        self.cell_idx = _check_indices(cell_idx, N, "cell_idx")
        self.control_idx = _check_indices(control_idx, N, "control_idx")
        if self.control_idx.size == 0:
            raise DataError("control_idx is empty: pairing needs training control cells")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.vocabulary = list(vocabulary)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.n_cells, self.n_genes, self.n_obs = len(self.cell_idx), G, N
        self.epoch = 0
        dev = self.device
        self._crow = torch.as_tensor(X.indptr.astype(np.int64), device=dev)
        self._col = torch.as_tensor(X.indices.astype(np.int32), device=dev)
        self._val = torch.as_tensor(X.data.astype(np.float32), device=dev)
        tt = _target_table(_conditions(adata), self.vocabulary, check_idx=self.cell_idx)
        self._targets = torch.as_tensor(tt, device=dev)
        self._cells = torch.as_tensor(self.cell_idx, device=dev)
        self._controls = torch.as_tensor(self.control_idx, device=dev)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return _n_batches(self.n_cells, self.batch_size, self.drop_last)

    def rows(self, idx) -> "Tensor":
        """Dense counts (len(idx), G) of obs positions ``idx`` on device."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)
        return _gather_rows(self._crow, self._col, self._val, idx, self.n_genes)

    def __iter__(self) -> Iterator[Batch]:
        g = _epoch_generator(self.seed, self.epoch)
        n = self.n_cells
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        nb = len(self)
        P = len(self.vocabulary)
        for b in range(nb):
            sel = order[b * self.batch_size:(b + 1) * self.batch_size]
            ctrl_sel = torch.randint(len(self.control_idx), (len(sel),), generator=g)
            idx = self._cells[sel.to(self.device)]
            cidx = self._controls[ctrl_sel.to(self.device)]
            yield Batch(
                x=_gather_rows(self._crow, self._col, self._val, idx, self.n_genes),
                u=_u_from_targets(self._targets[idx], P),
                x_ctrl=_gather_rows(self._crow, self._col, self._val, cidx, self.n_genes),
                idx=idx,
            )
        self.epoch += 1


def _prefetched(read, items: list, prefetch: bool) -> Iterator:
    """Yield ``read(item)`` for each item; with ``prefetch`` the next item is read in a
    background thread while the caller trains on the current one (disk reads overlap compute;
    one extra buffer in RAM). The reads are pure, so batches are identical either way."""
    if not prefetch or len(items) < 2:
        for item in items:
            yield read(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyro_pvae-prefetch") as pool:
        pending = pool.submit(read, items[0])
        for nxt in items[1:] + [None]:
            current = pending.result()
            pending = pool.submit(read, nxt) if nxt is not None else None
            yield current


class BackedBatcher:
    """Streaming batcher over a canonical h5ad file opened with ``backed='r'``.

    The file must hold canonical data (``obs['condition']`` canonical, ``X`` raw counts),
    e.g. one written by ``read_perturbseq(...).write_h5ad(path)``. Training cells are grouped
    into contiguous row blocks of ``chunk_size`` rows; each epoch visits the blocks in a
    seeded shuffled order, reading ``buffer_chunks`` blocks at a time into a buffer that is
    shuffled and cut into batches (leftover cells carry over to the next buffer), so RAM is
    bounded by about ``buffer_chunks * chunk_size`` rows (twice that with ``prefetch``: the next
    buffer is read from disk in a background thread while the current one trains) plus the
    control cells, which are read once and kept (as CSR tensors on ``device``) for pairing.
    Batches are pinned and copied asynchronously to a CUDA device. Same batch semantics as
    ``CellBatcher``.
    """

    def __init__(self, path, cell_idx, vocabulary, control_idx, batch_size: int,
                 device="cpu", seed: int = 0, chunk_size: int = 4096, buffer_chunks: int = 4,
                 shuffle: bool = True, drop_last: bool = True, pin_memory: bool | None = None,
                 prefetch: bool = True):
        import anndata

        if torch is None:  # pragma: no cover
            raise ImportError("BackedBatcher needs torch")
        p = Path(path)
        if not p.exists():
            raise DataError(f"file does not exist: {str(p)!r}")
        try:
            self._ad = anndata.read_h5ad(p, backed="r")
        except Exception as e:
            raise DataError(f"could not open {str(p)!r} as backed h5ad ({type(e).__name__}: "
                            f"{e})") from None
        self.path = p
        N, G = self._ad.shape
        self.device = torch.device(device)
        self.cell_idx = np.sort(_check_indices(cell_idx, N, "cell_idx"))
        self.control_idx = np.sort(_check_indices(control_idx, N, "control_idx"))
        if self.control_idx.size == 0:
            raise DataError("control_idx is empty: pairing needs training control cells")
        self.vocabulary = list(vocabulary)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.chunk_size, self.buffer_chunks = max(int(chunk_size), 1), max(int(buffer_chunks), 1)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.n_cells, self.n_genes, self.n_obs = len(self.cell_idx), G, N
        self.epoch = 0
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.prefetch = bool(prefetch)
        cond = _conditions(self._ad)
        self._targets_np = _target_table(cond, self.vocabulary, check_idx=self.cell_idx)
        # contiguous row blocks of training cells
        block = self.cell_idx // self.chunk_size
        cuts = np.flatnonzero(np.diff(block)) + 1
        self._chunks = np.split(self.cell_idx, cuts) if self.n_cells else []
        # control cells, read once
        C = _to_csr_f32(self._read_rows(self.control_idx))
        dev = self.device
        self._c_crow = torch.as_tensor(C.indptr.astype(np.int64), device=dev)
        self._c_col = torch.as_tensor(C.indices.astype(np.int32), device=dev)
        self._c_val = torch.as_tensor(C.data.astype(np.float32), device=dev)
        self._controls = torch.as_tensor(self.control_idx, device=dev)

    def _read_rows(self, rows: np.ndarray):
        """CSR of the (sorted) rows: one read per ``chunk_size`` block of the file that holds
        any of them (scattered rows, e.g. controls interleaved with perturbed cells, would
        otherwise cost one disk read per contiguous run)."""
        if len(rows) == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        block = rows // self.chunk_size
        parts = []
        for run in np.split(rows, np.flatnonzero(np.diff(block)) + 1):
            lo, hi = int(run[0]), int(run[-1]) + 1
            parts.append(sp.csr_matrix(self._ad.X[lo:hi], dtype=np.float32)[run - lo])
        return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]

    def _read_chunk(self, rows: np.ndarray):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        m = sp.csr_matrix(self._ad.X[lo:hi], dtype=np.float32)
        m = m[rows - lo]
        ok, why = _inspect_counts(m, f"X of {self.path} rows {lo}:{hi}")
        if not ok:
            raise DataError(f"X of {str(self.path)!r} does not hold raw counts: {why}")
        return m

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return _n_batches(self.n_cells, self.batch_size, self.drop_last)

    def _emit(self, m: sp.csr_matrix, idx: np.ndarray, g) -> Batch:
        x = torch.from_numpy(m.toarray())
        if self.pin_memory:
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=self.pin_memory)
        ctrl_sel = torch.randint(len(self.control_idx), (len(idx),), generator=g).to(self.device)
        x_ctrl = _gather_rows(self._c_crow, self._c_col, self._c_val, ctrl_sel, self.n_genes)
        idx_t = torch.as_tensor(idx, device=self.device)
        u = _u_from_targets(torch.as_tensor(self._targets_np[idx], device=self.device),
                            len(self.vocabulary))
        return Batch(x=x, u=u, x_ctrl=x_ctrl, idx=idx_t)

    def __iter__(self) -> Iterator[Batch]:
        g = _epoch_generator(self.seed, self.epoch)
        nb_total = len(self)
        n_chunks = len(self._chunks)
        order = (torch.randperm(n_chunks, generator=g).tolist() if self.shuffle
                 else list(range(n_chunks)))
        B = self.batch_size
        carry_m = sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        carry_i = np.zeros(0, dtype=np.int64)
        emitted = 0
        starts = list(range(0, n_chunks, self.buffer_chunks))
        buffers = [[self._chunks[k] for k in order[s:s + self.buffer_chunks]] for s in starts]
        reads = _prefetched(lambda ids: [self._read_chunk(r) for r in ids], buffers, self.prefetch)
        for ids, chunk_mats in zip(buffers, reads):
            buf_m = sp.vstack([carry_m] + chunk_mats, format="csr")
            buf_i = np.concatenate([carry_i] + ids)
            if self.shuffle:
                perm = torch.randperm(len(buf_i), generator=g).numpy()
                buf_m, buf_i = buf_m[perm], buf_i[perm]
            n_full = len(buf_i) // B
            for b in range(n_full):
                if emitted >= nb_total:
                    break
                yield self._emit(buf_m[b * B:(b + 1) * B], buf_i[b * B:(b + 1) * B], g)
                emitted += 1
            carry_m, carry_i = buf_m[n_full * B:], buf_i[n_full * B:]
        if len(carry_i) and emitted < nb_total:
            yield self._emit(carry_m, carry_i, g)
        self.epoch += 1

    def close(self) -> None:
        try:
            self._ad.file.close()
        except Exception:  # pragma: no cover
            pass


def make_batcher(adata_or_path, cell_idx, vocabulary, control_idx, batch_size: int,
                 device="cpu", seed: int = 0, **kwargs):
    """CellBatcher for an in-memory AnnData, BackedBatcher for a path or a backed AnnData.

    Extra kwargs go to the chosen class (shuffle, drop_last; chunk_size, buffer_chunks,
    pin_memory for the backed one)."""
    if isinstance(adata_or_path, (str, os.PathLike)):
        return BackedBatcher(adata_or_path, cell_idx, vocabulary, control_idx, batch_size,
                             device=device, seed=seed, **kwargs)
    if getattr(adata_or_path, "isbacked", False):
        return BackedBatcher(adata_or_path.filename, cell_idx, vocabulary, control_idx,
                             batch_size, device=device, seed=seed, **kwargs)
    for k in ("chunk_size", "buffer_chunks", "pin_memory"):
        kwargs.pop(k, None)
    return CellBatcher(adata_or_path, cell_idx, vocabulary, control_idx, batch_size,
                       device=device, seed=seed, **kwargs)
