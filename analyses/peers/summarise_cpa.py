"""Markdown tables of CPA's rows in a benchmark results.csv (run with any venv that has pandas).

    .venv/bin/python analyses/peers/summarise_cpa.py analyses/results/peers_cpa/benchmark/results.csv \
        [--reference analyses/results/benchmark_norman/results.csv]

Rows: each external file (``CPA_seedK``, ``CPA_sampled_seedK``: scored once each), then
``CPA`` / ``CPA_sampled`` as mean ± sd over the seeds of the per-seed average over conditions,
then the built-in methods of the same run (mean ± sd over benchmark seeds) and, from
``--reference`` (the README's benchmark run on the same split), PerturbedVAE. Groups: held-out
doubles (``seen2``) and held-out singles (``single``). A per-double Pearson table follows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ["pearson_delta_all", "pearson_delta_top20de", "pseudobulk_rmse_all", "delta_rmse_all", "energy_distance"]
GROUPS = {"seen2": "Held-out doubles", "single": "Held-out singles"}


def per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """method, group, metric, seed -> mean over conditions; the CPA_*seedK rows become
    method CPA_* with seed K."""
    d = df[df.metric.isin(METRICS)].copy()
    m = d.method.str.extract(r"^(?P<base>CPA(?:_sampled)?)_seed(?P<s>\d+)$")
    is_ext = m["base"].notna()
    d.loc[is_ext, "seed"] = m.loc[is_ext, "s"].astype(int)
    d.loc[is_ext, "method"] = m.loc[is_ext, "base"]
    return d.groupby(["method", "group", "metric", "seed"], as_index=False)["value"].mean()


def fmt(v: float, digits: int = 3) -> str:
    return "" if not np.isfinite(v) else f"{v:.{digits}f}"


def table(ps: pd.DataFrame, group: str, order: list[str], labels: dict) -> list[str]:
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    g = ps[ps.group == group]
    for meth in order:
        r = g[g.method == meth]
        if r.empty:
            continue
        if meth in ("CPA", "CPA_sampled"):
            for s in sorted(r.seed.unique()):
                rs = r[r.seed == s].set_index("metric")["value"]
                lines.append(f"| {labels.get(meth, meth)}, seed {s} | "
                             + " | ".join(fmt(rs.get(k, np.nan)) for k in METRICS) + " |")
        cells = []
        for k in METRICS:
            v = r[r.metric == k]["value"].to_numpy()
            cells.append("" if not len(v) else
                         (f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"))
        n = r.seed.nunique()
        lines.append(f"| **{labels.get(meth, meth)}** (mean ± sd, {n} seed{'s' if n > 1 else ''}) | "
                     + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--reference", default="analyses/results/benchmark_norman/results.csv",
                   help="a benchmark results.csv on the same split holding PerturbedVAE rows ('' to skip)")
    a = p.parse_args(argv)
    df = pd.read_csv(a.results)
    if a.reference and Path(a.reference).is_file():
        ref = pd.read_csv(a.reference)
        ref = ref[ref.method == "PerturbedVAE"]
        df = pd.concat([df, ref], ignore_index=True)
    ps = per_seed(df)
    labels = {"CPA": "CPA (NB mean)", "CPA_sampled": "CPA (NB draws)",
              "PerturbedVAE": "PerturbedVAE (README run)"}
    order = ["CPA", "CPA_sampled", "PerturbedVAE", "control_mean", "additive", "additive_shrink", "linear"]
    out = []
    for g, title in GROUPS.items():
        n = df[(df.group == g)].condition.nunique()
        out += [f"### {title} ({n})", ""] + table(ps, g, order, labels) + [""]
    # per-double Pearson delta (all genes)
    d = df[(df.group == "seen2") & (df.metric == "pearson_delta_all")].copy()
    d["method"] = d.method.str.replace(r"_seed\d+$", "", regex=True)
    pc = d.groupby(["condition", "method"])["value"].mean().unstack()
    cols = [c for c in order if c in pc.columns]
    out += ["### Per held-out double: pearson_delta_all (mean over seeds)", "",
            "| condition | " + " | ".join(labels.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for c, r in pc[cols].iterrows():
        out.append(f"| {c} | " + " | ".join(fmt(r[k]) for k in cols) + " |")
    missing = df[df.note.fillna("").str.contains("missing") & df.method.str.startswith("CPA")]
    if len(missing):
        out += ["", "Missing CPA predictions: " + ", ".join(sorted(set(missing.condition)))]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
