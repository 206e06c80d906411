"""Small shared helpers: log-normalisation, dense conversion, atomic file writes.

* :func:`lognormalize` -- ``log1p(x / rowsum * target_sum)`` per cell (numpy, scipy sparse,
  torch), the scale the encoders read and the evaluation compares on.
* :func:`to_dense` -- a dense numpy array of a given dtype from a dense or sparse matrix.
* :func:`atomic_write` and friends -- write to a unique temporary file in the target's folder,
  then ``os.replace``: a kill or an error never leaves half a file, concurrent writers never
  share a temporary name, and the result has the permissions of a normally created file.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

__all__ = ["lognormalize", "to_dense", "atomic_write", "atomic_write_text",
           "atomic_write_bytes", "atomic_write_csv", "atomic_torch_save"]


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    return torch is not None and isinstance(x, torch.Tensor)


def lognormalize(x, target_sum: float = 1e4, dtype=np.float32):
    """``log1p(x / rowsum * target_sum)`` per row (the last axis), rowsum clamped at 1 so that
    all-zero rows stay 0.

    torch tensor in -> tensor out (same dtype and device); scipy sparse in -> CSR out (same
    sparsity); array-like in -> ndarray out. numpy and sparse results are computed in float64
    and returned as ``dtype``.
    """
    if _is_tensor(x):
        return (x / x.sum(-1, keepdim=True).clamp(min=1.0) * target_sum).log1p()
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float64, copy=True)
        rowsum = np.asarray(out.sum(axis=1)).ravel()
        scale = target_sum / np.maximum(rowsum, 1.0)
        out.data = np.log1p(out.data * np.repeat(scale, np.diff(out.indptr)))
        return out.astype(dtype)
    a = np.asarray(x, dtype=np.float64)
    scale = target_sum / np.maximum(a.sum(axis=-1, keepdims=True), 1.0)
    return np.log1p(a * scale).astype(dtype, copy=False)


def to_dense(X, dtype=np.float32) -> np.ndarray:
    """Dense ndarray of ``dtype`` from a dense array or a scipy sparse matrix."""
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=dtype)


def _new_file_mode() -> int:
    """Permissions ``open(path, 'w')`` gives a new file: 0o666 minus the process umask."""
    umask = os.umask(0)  # reading the umask means setting it; restore at once
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a unique temporary path in ``path``'s folder, then rename it to
    ``path``. On any exception the temporary file is removed and an existing ``path`` is
    left untouched. The file gets the permissions of a normally created file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_csv(path, df) -> Path:
    """A pandas DataFrame as CSV, without the index."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def atomic_torch_save(obj, path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
