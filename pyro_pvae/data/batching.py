"""Training batchers: each batch holds counts ``x``, multi-hot perturbations ``u``, counts of
randomly paired training control cells ``x_ctrl`` and the cells' positions ``idx``.

``CellBatcher`` keeps the whole count matrix on the device; ``BackedBatcher`` streams a
canonical h5ad file in row blocks. Both give batches that depend only on (seed, epoch).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .formats import (DataError, _inspect_counts, _to_csr_f32, _unknown_error, condition_labels,
                      parse_condition)


@dataclass
class Batch:
    x: torch.Tensor       # (B, G) float32 counts on device
    u: torch.Tensor       # (B, P) float32 multi-hot perturbation indicators
    x_ctrl: torch.Tensor  # (B, G) counts of randomly paired training control cells
    idx: torch.Tensor     # (B,) long, positions into adata.obs


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
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


def _check_pairing(control_idx: np.ndarray, batch_size: int) -> None:
    """Both batchers pair every cell with a training control cell, in batches of ``batch_size``."""
    if control_idx.size == 0:
        raise DataError("control_idx is empty: pairing needs training control cells")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")


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
        X = sp.csr_matrix(adata.X, dtype=np.float32)
        if not X.has_canonical_format:  # _gather_rows needs no duplicate entries
            X = X.copy()
            X.sum_duplicates()
        N, G = X.shape
        self.device = torch.device(device)
        self.cell_idx = _check_indices(cell_idx, N, "cell_idx")
        self.control_idx = _check_indices(control_idx, N, "control_idx")
        _check_pairing(self.control_idx, batch_size)
        self.vocabulary = list(vocabulary)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.n_cells, self.n_genes, self.n_obs = len(self.cell_idx), G, N
        self.epoch = 0
        dev = self.device
        self._crow = torch.as_tensor(X.indptr.astype(np.int64), device=dev)
        self._col = torch.as_tensor(X.indices.astype(np.int32), device=dev)
        self._val = torch.as_tensor(X.data.astype(np.float32), device=dev)
        tt = _target_table(condition_labels(adata), self.vocabulary, check_idx=self.cell_idx)
        self._targets = torch.as_tensor(tt, device=dev)
        self._cells = torch.as_tensor(self.cell_idx, device=dev)
        self._controls = torch.as_tensor(self.control_idx, device=dev)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return _n_batches(self.n_cells, self.batch_size, self.drop_last)

    def rows(self, idx) -> torch.Tensor:
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
        _check_pairing(self.control_idx, batch_size)
        self.vocabulary = list(vocabulary)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.chunk_size, self.buffer_chunks = max(int(chunk_size), 1), max(int(buffer_chunks), 1)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.n_cells, self.n_genes, self.n_obs = len(self.cell_idx), G, N
        self.epoch = 0
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.prefetch = bool(prefetch)
        cond = condition_labels(self._ad)
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
