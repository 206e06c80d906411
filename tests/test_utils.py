"""Tests of pyro_pvae.utils: log-normalisation, dense conversion, atomic writes."""
from __future__ import annotations

import math
import os
import stat
import threading

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_pvae import utils

X = np.array([[1, 0, 3], [0, 0, 0], [2, 2, 0]], dtype=np.float32)
EXPECTED = np.array([[math.log1p(2500), 0, math.log1p(7500)], [0, 0, 0],
                     [math.log1p(5000), math.log1p(5000), 0]])


# ---------------------------------------------------------------------------------------
# lognormalize / to_dense
# ---------------------------------------------------------------------------------------

def test_lognormalize_known_answer_dense():
    out = utils.lognormalize(X)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, EXPECTED, rtol=1e-6)
    np.testing.assert_allclose(utils.lognormalize(X, dtype=np.float64), EXPECTED, rtol=1e-12)
    # other target sum; a single profile (1-D) is one row
    np.testing.assert_allclose(utils.lognormalize(X[0], 1e6, np.float64),
                               np.log1p([250000.0, 0.0, 750000.0]), rtol=1e-12)


def test_lognormalize_sparse_equals_dense():
    out = utils.lognormalize(sp.csr_matrix(X))
    assert sp.isspmatrix_csr(out) and out.dtype == np.float32
    assert out.nnz == sp.csr_matrix(X).nnz  # zeros stay implicit
    np.testing.assert_array_equal(out.toarray(), utils.lognormalize(X))
    csc = utils.lognormalize(sp.csc_matrix(X), dtype=np.float64)
    np.testing.assert_array_equal(csc.toarray(), utils.lognormalize(X, dtype=np.float64))


def test_lognormalize_torch_matches_formula_and_numpy():
    t = torch.as_tensor(X)
    out = utils.lognormalize(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    # the encoders' formula, bit for bit
    assert torch.equal(out, torch.log1p(t / t.sum(-1, keepdim=True).clamp(min=1.0) * 1e4))
    np.testing.assert_allclose(out.numpy(), utils.lognormalize(X), rtol=1e-6)
    t64 = torch.as_tensor(X, dtype=torch.float64)
    np.testing.assert_allclose(utils.lognormalize(t64).numpy(), EXPECTED, rtol=1e-12)
    batch = torch.as_tensor(np.stack([X, 2 * X]))  # any leading shape: rows are the last axis
    np.testing.assert_allclose(utils.lognormalize(batch)[1].numpy(), utils.lognormalize(X), rtol=1e-6)


def test_to_dense():
    d = utils.to_dense(sp.csr_matrix(X))
    assert isinstance(d, np.ndarray) and d.dtype == np.float32
    np.testing.assert_array_equal(d, X)
    d64 = utils.to_dense(X, np.float64)
    assert d64.dtype == np.float64
    np.testing.assert_array_equal(d64, X)


# ---------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------

def _plain_mode(folder) -> int:
    p = folder / "plain.txt"
    with open(p, "w") as fh:
        fh.write("x")
    mode = stat.S_IMODE(p.stat().st_mode)
    p.unlink()
    return mode


def test_atomic_write_content_name_and_mode(tmp_path):
    p = tmp_path / "out.txt"
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("hello")

    assert utils.atomic_write(p, write) == p
    assert p.read_text() == "hello"
    tmp = seen[0]
    assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")
    assert list(tmp_path.iterdir()) == [p]
    assert stat.S_IMODE(p.stat().st_mode) == _plain_mode(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_write_mode_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        p = utils.atomic_write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(p.stat().st_mode) == _plain_mode(tmp_path) == 0o666 & ~umask
    finally:
        os.umask(old)


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "model.pt"
    p.write_text("old")

    def fails(tmp):
        tmp.write_text("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        utils.atomic_write(p, fails)
    assert p.read_text() == "old"
    assert list(tmp_path.iterdir()) == [p]
    with pytest.raises(KeyboardInterrupt):  # also on interrupts
        utils.atomic_write(p, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == [p] and p.read_text() == "old"


def test_concurrent_writers_use_different_temp_names(tmp_path):
    p = tmp_path / "checkpoint.pt"
    both_inside = threading.Barrier(2, timeout=10)
    names = {}

    def writer(tag):
        def write(tmp):
            names[tag] = tmp
            both_inside.wait()  # both temporary files exist at the same time
            tmp.write_text(tag)
        utils.atomic_write(p, write)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(names) == {"a", "b"} and names["a"] != names["b"]
    assert p.read_text() in ("a", "b")
    assert list(tmp_path.iterdir()) == [p]


def test_atomic_helpers_round_trip(tmp_path):
    utils.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    utils.atomic_write_csv(tmp_path / "t.csv", df)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), df)
    utils.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.arange(3))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.bin", "m.pt", "t.csv"]
