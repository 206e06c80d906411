"""Canonical AnnData: condition labels, format detection, readers, validation, HVG selection.

Canonical form (see docs/ARCHITECTURE.md): CSR float32 raw counts in ``X``, unique gene
symbols in ``var_names``, ``obs['condition']`` = ``"control"`` or sorted targets joined by
``"+"``, ``obs['n_targets']``. Cells with zero total counts are dropped (with a warning).

The readers (``read_perturbseq``, ``to_canonical``) and ``validate_canonical`` (for an AnnData
handed over directly) run the same checks and raise the same ``DataError`` messages.
"""
from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import utils

logger = logging.getLogger(__name__)

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


def _resolve_spec(adata, format, label_key, control_label, sep, source) -> tuple[str, _FormatSpec]:
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
        if control_label is None:
            _require_column(adata, label_key, source)
            seen = set(map(str, pd.unique(adata.obs[label_key].astype(str))))
            control_label = next((c for c in _CONTROL_CANDIDATES if c in seen), None)
            if control_label is None:
                raise DataError(
                    f"format='generic' without control_label=: none of the usual control "
                    f"labels {list(_CONTROL_CANDIDATES)} occurs in obs[{label_key!r}]; most "
                    f"common labels: {_top_labels(adata.obs[label_key])}")
            logger.info("generic format: using control label %r", control_label)
        return fmt, _FormatSpec(label_key, control_label, SEP if sep is None else sep)
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


def _top_labels(labels, k: int = 8) -> str:
    """The ``k`` most common labels with their cell counts: "'control' (40), 'KLF1' (12)"."""
    vc = pd.Series(labels).astype(str).value_counts()
    return ", ".join(f"{lab!r} ({n})" for lab, n in vc.head(k).items())


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


def _canonical_labels(labels: pd.Series, spec: _FormatSpec, where: str) -> np.ndarray:
    """Raw labels -> canonical labels (object array), mapped once per unique label."""
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
        toks = [t.strip() for t in s.split(spec.sep)] if spec.sep else [s]
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
    return raw.map(mapping).to_numpy(dtype=object)


# ----------------------------------------------------------------------------------------
# Checks shared by the readers and validate_canonical (one message each)
# ----------------------------------------------------------------------------------------

def _require_column(adata, key: str, source: str) -> None:
    if key not in adata.obs.columns:
        raise DataError(f"label column obs[{key!r}] not found in {source}; obs columns: "
                        f"{list(adata.obs.columns)}. Name the column holding the perturbation "
                        "labels with label_key= (read_perturbseq / to_canonical; config key "
                        "data.label_key)")


def _require_control(canon: np.ndarray, raw_labels, where: str, control_label: str) -> None:
    if not (canon == CONTROL).any():
        raise DataError(f"no control cells in {where}: expected label {control_label!r}; most "
                        f"common labels: {_top_labels(raw_labels)}. Pass control_label= "
                        "(read_perturbseq / to_canonical; config key data.control_label).")


def _require_unique_genes(names: pd.Index, source: str) -> None:
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise DataError(f"{len(dup)} duplicate gene names in {source}: {list(dup[:10])}; gene "
                        "names (var_names) must be unique")


def _nonempty_cells(X, labels, source: str) -> np.ndarray:
    """Mask of the cells with positive total counts; logs a warning naming the others."""
    keep = np.asarray(X.sum(axis=1)).ravel() > 0
    n_drop = int((~keep).sum())
    if n_drop:
        logger.warning("%s: dropped %d of %d cells with zero total counts (conditions: %s)",
                       source, n_drop, len(keep),
                       _top_labels(np.asarray(labels)[~keep]))
    return keep


# ----------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------

def _matrix_values(m) -> np.ndarray:
    if sp.issparse(m):
        return np.asarray(m.data)
    return np.asarray(m).ravel()


def _check_sparse_structure(m, key: str, source: str) -> None:
    """Raise DataError unless the index arrays of a CSR/CSC matrix are consistent: index
    pointer of length n_rows + 1 (CSR) running monotonically from 0 to nnz, indices in
    [0, n_cols). Unsorted or duplicate entries are allowed (canonicalised later)."""
    if not sp.issparse(m) or m.format not in ("csr", "csc"):
        return
    n_major, n_minor = m.shape if m.format == "csr" else m.shape[::-1]
    minor = "column" if m.format == "csr" else "row"
    indptr, indices = np.asarray(m.indptr), np.asarray(m.indices)
    problem = None
    if len(indptr) != n_major + 1:
        problem = f"index pointer has {len(indptr)} entries, expected {n_major + 1}"
    elif indptr[0] != 0 or indptr[-1] != len(indices) or len(indices) != len(m.data):
        problem = (f"index pointer runs from {indptr[0]} to {indptr[-1]}, with "
                   f"{len(indices)} indices and {len(m.data)} values")
    elif (np.diff(indptr) < 0).any():
        problem = f"index pointer decreases at {int(np.argmax(np.diff(indptr) < 0))}"
    elif len(indices) and (indices.min() < 0 or indices.max() >= n_minor):
        problem = (f"{minor} indices outside [0, {n_minor}): min {int(indices.min())}, "
                   f"max {int(indices.max())}")
    if problem:
        raise DataError(f"{key} of {source} is a corrupt sparse matrix ({problem}); the file "
                        "is damaged or was written incorrectly: rewrite it from the original data")


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
    if adata.X is None:
        ok, why = False, "absent"
    else:
        _check_sparse_structure(adata.X, "X", source)
        ok, why = _inspect_counts(adata.X, "X")
    if ok:
        return adata.X, "X"
    checked.append(f"X ({why})")
    if "counts" in adata.layers:
        m = adata.layers["counts"]
        _check_sparse_structure(m, "layers['counts']", source)
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
            _check_sparse_structure(raw.X, "raw.X", source)
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
    """Canonical CSR float32 (duplicates summed, indices sorted, explicit zeros removed)."""
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data = np.rint(m.data).astype(np.float32)
    m.sort_indices()
    return m


# ----------------------------------------------------------------------------------------
# Readers and validation
# ----------------------------------------------------------------------------------------

def read_perturbseq(path, format: str = "auto", label_key: str | None = None,
                    control_label: str | None = None, sep: str | None = None):
    """Read a Perturb-seq h5ad file in any supported format and return the canonical AnnData.

    ``format``: 'auto' (default; detected from obs columns/labels, logged), 'cpa', 'gears',
    'scperturb', 'canonical' (our own/shipped), 'replogle' or 'generic' (give ``label_key``,
    ``control_label`` and ``sep``). Explicit ``label_key``/``control_label``/``sep`` override
    the format's defaults. The sparse structure of the counts is checked (a corrupt file
    raises ``DataError``); cells with zero total counts are dropped with a warning.
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


def _gene_names(adata, fmt: str) -> tuple[pd.DataFrame, pd.Index]:
    """(var, gene symbols): GEARS files and Ensembl-ID var_names use var['gene_name']."""
    var = adata.var.copy()
    names = pd.Index(adata.var_names.astype(str))
    if "gene_name" in var.columns and (fmt == "gears" or
                                       all(str(n).startswith("ENS") for n in names[:50])):
        var["gene_id"] = names.to_numpy()
        names = pd.Index(var["gene_name"].astype(str).to_numpy())
    return var, names


def to_canonical(adata, format: str = "auto", label_key: str | None = None,
                 control_label: str | None = None, sep: str | None = None,
                 source: str = "<in-memory AnnData>"):
    """Convert an in-memory AnnData (any supported format) to the canonical form (a new object)."""
    import anndata

    fmt, spec = _resolve_spec(adata, format, label_key, control_label, sep, source)
    logger.info("%s: using format %r (labels in obs[%r], control %r, separator %r)",
                source, fmt, spec.label_key, spec.control_label, spec.sep)
    _require_column(adata, spec.label_key, source)
    where = f"obs[{spec.label_key!r}] of {source}"
    raw_labels = adata.obs[spec.label_key]
    canon = _canonical_labels(raw_labels, spec, where)
    _require_control(canon, raw_labels, where, spec.control_label)
    var, names = _gene_names(adata, fmt)
    _require_unique_genes(names, source)
    counts, counts_key = _find_counts(adata, source)
    X = _to_csr_f32(counts)

    obs = adata.obs.copy()
    if spec.label_key == "condition":
        obs["condition_original"] = raw_labels.astype(str).to_numpy()
    keep = _nonempty_cells(X, canon, source)
    if not keep.all():
        X, obs, canon, raw_labels = X[keep], obs[keep], canon[keep], raw_labels[keep]
        _require_control(canon, raw_labels, where, spec.control_label)
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


def validate_canonical(adata, source: str = "<in-memory AnnData>", drop_empty: bool = True):
    """Check that ``adata`` is in the canonical form the model reads, with the readers' checks
    and messages: ``obs['condition']`` present, canonical labels, control cells labelled
    ``"control"``, unique gene names, raw integer counts (finite, >= 0) in a consistent ``X``.

    Returns ``adata`` itself, or a copy without the cells with zero total counts (logged as a
    warning); ``drop_empty=False`` raises ``DataError`` for such cells instead (e.g. when a
    split's cell positions must stay valid). A backed AnnData gets the label and gene checks
    only (its counts are checked block by block as they are read).
    """
    _require_column(adata, "condition", source)
    where = f"obs['condition'] of {source}"
    raw_labels = adata.obs["condition"]
    canon = _canonical_labels(raw_labels, FORMATS["canonical"], where)
    labels = raw_labels.astype(str).to_numpy()
    bad = sorted(set(labels[canon != labels]))
    if bad:
        raise DataError(f"non-canonical labels in {where}: {bad[:10]}; expected sorted targets "
                        "joined by '+' (e.g. 'KLF1+SET'). Convert with "
                        "pyro_pvae.data.to_canonical(adata)")
    _require_control(canon, raw_labels, where, CONTROL)
    _require_unique_genes(pd.Index(adata.var_names.astype(str)), source)
    if getattr(adata, "isbacked", False):
        return adata
    if adata.X is not None:
        _check_sparse_structure(adata.X, "X", source)
    ok, why = _inspect_counts(adata.X, "X") if adata.X is not None else (False, "absent")
    if not ok:
        _, key = _find_counts(adata, source)  # the readers' error when there are no counts
        raise DataError(f"X of {source} does not hold raw integer counts ({why}); they are in "
                        f"{key}. Convert with pyro_pvae.data.to_canonical(adata)")
    keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    if keep.all():
        return adata
    if not drop_empty:
        raise DataError(f"{int((~keep).sum())} cells of {source} have zero total counts "
                        f"(conditions: {_top_labels(labels[~keep])}); drop them "
                        "before making a split (pyro_pvae.data.validate_canonical(adata) "
                        "returns a copy without them)")
    keep = _nonempty_cells(adata.X, labels, source)
    _require_control(canon[keep], labels[keep], where, CONTROL)
    return adata[keep].copy()


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
    """``utils.lognormalize`` of the counts: log1p(counts / total * target_sum) per cell,
    float32 (CSR for sparse input). Given an AnnData, also stored as ``layers['lognorm']``."""
    out = utils.lognormalize(_counts_matrix(adata_or_matrix), target_sum)
    if hasattr(adata_or_matrix, "layers"):
        adata_or_matrix.layers["lognorm"] = out
    return out


def filter_genes(adata, min_cells: int):
    """The genes detected (count > 0) in at least ``min_cells`` cells, and every perturbed target
    gene present in var_names (as ``scanpy.pp.filter_genes(adata, min_cells=...)``, targets kept);
    logs how many were dropped. Returns ``adata`` itself when none is, else a copy."""
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)) or min_cells < 0:
        raise ValueError(f"filter_genes(): min_cells must be a whole number >= 0, got {min_cells!r}")
    if getattr(adata, "isbacked", False):
        raise DataError("filter_genes() needs the counts in memory, and this AnnData is backed (on disk); "
                        "filter the file once (e.g. with scanpy) and write the result, or load it in memory")
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    targets = set(perturbation_vocabulary(adata))
    keep = (detected >= min_cells) | np.array([g in targets for g in adata.var_names.astype(str)])
    if keep.all():
        return adata
    if not keep.any():
        raise DataError(f"filter_genes(min_cells={min_cells}): no gene is detected in that many cells "
                        f"(at most {int(detected.max())} of {adata.n_obs}); lower min_cells")
    logger.info("filter_genes (min_cells=%d): dropped %d of %d genes detected in fewer cells",
                min_cells, int((~keep).sum()), adata.n_vars)
    return adata[:, keep].copy()


def select_hvg(adata, n_top_genes: int, keep: Sequence[str] | None = None):
    """Subset to highly variable genes (scanpy flavor 'seurat' on a log-normalised copy),
    always keeping the perturbed target genes present in var_names and the genes in ``keep``.

    Returns a new AnnData (genes in original order) with ``var['highly_variable']`` (ranked
    HVG) and ``var['forced']`` (kept because targeted / requested). Total genes =
    max(n_top_genes, number of forced genes). Cells left with zero total counts over the
    chosen genes are dropped with a warning.
    """
    import anndata
    import scanpy as sc

    keep = list(keep or [])
    missing = [g for g in keep if g not in adata.var_names]
    if missing:
        raise DataError(f"genes requested in keep= not in var_names: {missing[:10]}")
    forced = set(keep) | {g for g in perturbation_vocabulary(adata) if g in adata.var_names}
    tmp = anndata.AnnData(X=utils.lognormalize(adata.X), obs=pd.DataFrame(index=adata.obs_names),
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
    cells = _nonempty_cells(out.X, condition_labels(out), f"select_hvg ({out.n_vars} genes)")
    if not cells.all():
        out = out[cells].copy()
    top = set(order[:int(n_top_genes)]) | set(hv)
    out.var["highly_variable"] = [g in top for g in out.var_names]
    out.var["forced"] = [g in forced for g in out.var_names]
    out.var["dispersions_norm"] = disp[out.var_names].to_numpy()
    return out


# ----------------------------------------------------------------------------------------
# Perturbation encodings
# ----------------------------------------------------------------------------------------

def condition_labels(adata) -> np.ndarray:
    """``obs['condition']`` as an array of str (canonical labels)."""
    _require_column(adata, "condition", "the AnnData")
    return adata.obs["condition"].astype(str).to_numpy()


def perturbation_vocabulary(adata, idx=None) -> list[str]:
    """Sorted target genes appearing in the conditions of the cells ``idx`` (all if None)."""
    cond = condition_labels(adata)
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
