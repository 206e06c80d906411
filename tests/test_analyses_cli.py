"""The shared command line of the analysis scripts (analyses/norman_fit.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analyses"))
from norman_fit import parse_out  # noqa: E402


def test_parse_out_splits_the_output_directory_from_the_overrides():
    assert parse_out(["train.seed=1", "--out", "res/x", "model.alpha=2"]) == (
        ["train.seed=1", "model.alpha=2"], Path("res/x"))
    assert parse_out(["train.seed=1"]) == (["train.seed=1"], None)
    for bad in (["--out"], ["--out", "--help"]):
        with pytest.raises(SystemExit, match="--out needs a directory"):
            parse_out(bad)
