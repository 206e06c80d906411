"""Markdown table from the per-round CSV(s) of ``throughput.py --rounds N``.

    python perf/summarise_throughput.py perf/results/throughput_cpu_10000x2000_rounds.csv [...]

Per (cells, genes, batch, variant): median cells/s and ms/step over rounds, and the median (min-max)
of the paired per-round time ratios against ``plain`` (hand-written ELBO, invariant encoder run
three times as the model did before the alignment reused the guide's pass) and ``plain_dedupe``
(two passes: the same work as the current Pyro model). Time ratio > 1 = slower than the reference.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.throughput import add_paired_ratios, summarise  # noqa: E402

NUM = ("cells", "genes", "batch", "round", "threads", "cells_per_s", "ms_per_step", "loss_per_cell",
       "gpu_peak_mb", "rss_mb", "peak_rss_mb", "nnz_per_cell")


def load(path):
    with open(path) as fh:
        rows = [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(fh)]
    for r in rows:
        for k in NUM:
            if k in r:
                r[k] = float(r[k]) if k not in ("cells", "genes", "batch", "round", "threads") else int(float(r[k]))
        for k in [k for k in r if k.startswith("ratio_vs_")]:
            del r[k]
        if "error" in r:
            r.pop("cells_per_s", None)
    add_paired_ratios(rows, ("plain", "plain_dedupe"))  # recomputed: older CSVs lack plain_dedupe
    return rows


def fmt(r, key):
    if key not in r:
        return ""
    return f"{r[key]:.2f} ({r[key + '_min']:.2f}-{r[key + '_max']:.2f})"


def main(paths):
    print("| cells | genes | batch | variant | rounds | cells/s | ms/step | time / plain | time / plain_dedupe |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        for r in summarise(load(p)):
            if "cells_per_s" not in r or r.get("rounds", 0) == 0:
                print(f"| {r['cells']} | {r['genes']} | {r['batch']} | {r['variant']} | 0 | error | | | |")
                continue
            print(f"| {r['cells']:,} | {r['genes']:,} | {r['batch']} | {r['variant']} | {r['rounds']} | "
                  f"{r['cells_per_s']:,.0f} | {r['ms_per_step']:.0f} | {fmt(r, 'ratio_vs_plain')} | "
                  f"{fmt(r, 'ratio_vs_plain_dedupe')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
