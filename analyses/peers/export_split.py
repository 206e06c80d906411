"""Export the benchmark's data and split for an external method (run with pyro_pvae's venv).

    OMP_NUM_THREADS=1 .venv/bin/python analyses/peers/export_split.py \
        [--config norman] [--out analyses/results/peers_cpa/norman_split.h5ad] [key=value ...]

Loads the data and builds the split exactly as ``python -m pyro_pvae.benchmark --config NAME``
does (``config.compose`` + ``config.load_dataset`` + ``config.resolve_split``, same overrides),
and writes one h5ad that a tool in another environment (CPA, analyses/peers/run_cpa.py) can read
without importing pyro_pvae:

* ``X``: the raw integer UMI counts (float32, CSR), ``layers['counts']`` the same;
* ``obs['condition']``: canonical labels (``control``, ``KLF1``, ``KLF1+MAP2K6``; genes sorted);
* ``obs['split']``: ``train`` / ``val`` / ``test`` (every cell is in exactly one);
* ``obs['heldout_control']``: True for the held-out reference controls (test cells labelled
  control; no method may train on them);
* ``obs['test_group']``: ``single`` / ``seen2`` / ... for held-out perturbed cells, '' otherwise;
* ``uns['split_json']``: the Split itself (same JSON as the benchmark's ``split.json``), and
  ``uns['test_conditions']``: the held-out conditions the benchmark scores (no control).

The export is checked against the benchmark's own reference (``observed_reference``: the held-out
controls and the scored cells of each condition) before it is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="norman")
    p.add_argument("--out", default="analyses/results/peers_cpa/norman_split.h5ad")
    p.add_argument("overrides", nargs="*", help="config overrides, as given to pyro_pvae.benchmark")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import anndata as ad
    import pandas as pd

    from pyro_pvae import data as D
    from pyro_pvae.benchmark import hydra_overrides, observed_reference
    from pyro_pvae.config import compose, load_dataset, resolve_split
    from pyro_pvae.data.splits import heldout_control_idx
    from pyro_pvae.utils import atomic_write

    cfg = compose(a.config, hydra_overrides(a.overrides))
    adata = load_dataset(cfg)
    split = resolve_split(cfg, adata)
    if split is None:
        raise SystemExit("the config has split.name=none; nothing to export")
    split.check(adata)

    cond = D.condition_labels(adata)
    where = np.full(adata.n_obs, "", dtype=object)
    for name, idx in (("train", split.train_idx), ("val", split.val_idx), ("test", split.test_idx)):
        where[idx] = name  # split.check() above refused overlapping parts
    if np.any(where == ""):
        raise SystemExit(f"split {split.name}: {int(np.sum(where == ''))} cells are in no part")
    ref_ctrl = heldout_control_idx(split, adata)
    held_ctrl = np.zeros(adata.n_obs, dtype=bool)
    held_ctrl[ref_ctrl] = True
    group = np.full(adata.n_obs, "", dtype=object)
    test = np.asarray(split.test_idx)
    for c, g in split.test_groups.items():
        if c != D.CONTROL:
            group[test[cond[test] == c]] = g

    # the same reference the benchmark scores against: check the export agrees with it
    ref = observed_reference(adata.copy(), split)
    assert np.array_equal(np.sort(ref.control_idx), np.flatnonzero(held_ctrl))
    assert set(ref.groups) == {c for c in split.test_groups if c != D.CONTROL}
    for c, idx in ref.score_idx.items():
        assert np.array_equal(np.sort(idx), np.flatnonzero((where == "test") & (cond == c)))
    assert np.array_equal(np.sort(ref.train_control_idx), np.flatnonzero((where == "train") & (cond == D.CONTROL)))

    X = sp.csr_matrix(adata.X, dtype=np.float32)
    vals = X.data
    if vals.size and not np.all(vals == np.round(vals)):
        raise SystemExit("adata.X does not hold integer counts")
    obs = pd.DataFrame({"condition": pd.Categorical(cond), "split": pd.Categorical(where.astype(str)),
                        "heldout_control": held_ctrl, "test_group": group.astype(str)},
                       index=adata.obs_names.astype(str))
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    out.layers["counts"] = X.copy()
    out.uns["split_json"] = json.dumps(split.to_dict())
    out.uns["test_conditions"] = np.array(sorted(ref.groups), dtype=str)
    out.uns["source"] = (f"pyro_pvae config {a.config!r} overrides {a.overrides}; split {split.name} "
                         f"seed {split.seed} {json.dumps(split.params)}")
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, out.write_h5ad)
    counts = pd.crosstab(obs["split"], obs["condition"].astype(str) == D.CONTROL)
    print(f"wrote {path}: {out.n_obs} cells x {out.n_vars} genes; split {split.name} (seed {split.seed})")
    print(f"  train {int(np.sum(where == 'train'))} / val {int(np.sum(where == 'val'))} / test "
          f"{int(np.sum(where == 'test'))} cells; held-out reference controls {len(ref_ctrl)}; training controls "
          f"{len(ref.train_control_idx)}")
    print(f"  test conditions ({len(ref.groups)}): " + ", ".join(f"{c} [{g}]" for c, g in sorted(ref.groups.items())))
    print(counts.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
