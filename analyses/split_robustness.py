"""The real-subset benchmark over five splits: is a difference between the model and a baseline
a property of the methods or of which 50 controls and which 35% of each single's cells were held out?

    bash analyses/reproduce_readme.sh norman splits variants   # the ten benchmark runs this reads
    python analyses/split_robustness.py [--results analyses/results] [--out analyses/results/norman_splits]

Reads ``results.csv`` of the `norman` benchmark at ``split.seed`` 0 (``benchmark_norman``,
``benchmark_norman_library_off``) and 1-4 (``benchmark_norman_split{1,2,3,4}`` and
``..._library_off``); the five held-out doubles are the same in every split (the doubles whose two
singles are trained), the held-out controls and single cells differ. Writes ``summary.md``: per
split and group, each method's Pearson delta (all genes) and pseudobulk RMSE (the model: mean over
its 3 training seeds), their mean over the splits, and per condition how often the model (the
preset, with the library-size model) beats each baseline over the splits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
METRICS = {"pearson_delta_all": "higher", "pseudobulk_rmse_all": "lower"}
SPLITS = (0, 1, 2, 3, 4)
_FOLDER = {s: "benchmark_norman" + (f"_split{s}" if s else "") for s in SPLITS}  # split 0: the `norman` step's run
RUNS = {s: {"model": _FOLDER[s], "model, no library-size model": f"{_FOLDER[s]}_library_off"}
        for s in SPLITS}  # split seed -> {row label: run folder}
BASELINES = ("additive", "linear")


def per_condition(results: Path) -> pd.DataFrame:
    """Rows (split, method, group, condition, metric, value): seeds averaged per condition."""
    frames = []
    for split, runs in RUNS.items():
        for label, folder in runs.items():
            path = results / folder / "results.csv"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run `bash analyses/reproduce_readme.sh norman splits` "
                                        "(and `variants` for benchmark_norman_library_off) first")
            df = pd.read_csv(path)
            df = df[df["metric"].isin(list(METRICS)) & df["group"].isin(["seen2", "single"])]
            keep = ["PerturbedVAE"] + (list(BASELINES) if label == "model" else [])
            df = df[df["method"].isin(keep)].copy()
            df["method"] = df["method"].replace({"PerturbedVAE": label})
            df = df.groupby(["method", "group", "condition", "metric"], as_index=False)["value"].mean()
            df["split"] = split
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _by_condition(pc: pd.DataFrame, group: str) -> pd.DataFrame:
    """One row per (split, condition) of ``group``, one column per (method, metric)."""
    return pc[pc["group"] == group].pivot_table(index=["split", "condition"], columns=["method", "metric"],
                                                values="value")


def summary(pc: pd.DataFrame) -> str:
    means = pc.groupby(["split", "group", "method", "metric"])["value"].mean().unstack("metric")
    methods = ["model", "model, no library-size model", *BASELINES]
    lines = [f"# The real-subset benchmark over {len(RUNS)} splits", "",
             "Command: `python analyses/split_robustness.py` (after `bash analyses/reproduce_readme.sh norman splits`).",
             "Each split holds out other controls (50) and other cells of each single (35%); the 5 held-out",
             "doubles are the same. The model's values are the mean over its 3 training seeds.", ""]
    for group, title in (("seen2", "Held-out doubles (5)"), ("single", "Held-out cells of the 18 trained singles")):
        lines += [f"## {title}", "", "| method | " + " | ".join(
            f"split {s}: Pearson / RMSE" for s in RUNS) + " | mean over splits |", "|---" * (len(RUNS) + 2) + "|"]
        for m in methods:
            cells = []
            for s in RUNS:
                r = means.loc[(s, group, m)]
                cells.append(f"{r['pearson_delta_all']:.3f} / {r['pseudobulk_rmse_all']:.4f}")
            avg = means.xs((group, m), level=("group", "method")).mean()
            cells.append(f"**{avg['pearson_delta_all']:.3f} / {avg['pseudobulk_rmse_all']:.4f}**")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        wide = _by_condition(pc, group)
        for b in BASELINES:
            parts = []
            for metric, better in METRICS.items():
                diff = wide[("model", metric)] - wide[(b, metric)]
                wins = int((diff > 0).sum() if better == "higher" else (diff < 0).sum())
                se = diff.std(ddof=1) / np.sqrt(len(diff))
                parts.append(f"{metric}: model better in {wins} of {len(diff)}, mean difference "
                             f"{round(diff.mean(), 4) + 0.0:+.4f} ± {se:.4f}")
            lines.append(f"- Model (preset) against {b}, per condition and split: " + "; ".join(parts) + ".")
        lines.append("")
        if group == "seen2":
            lines += per_double_table(wide, methods)
    return "\n".join(lines)


def per_double_table(wide: pd.DataFrame, methods) -> list[str]:
    """Markdown rows: each held-out double's Pearson delta / pseudobulk RMSE, mean over the splits."""
    means = wide.groupby(level="condition").mean()
    lines = ["Per double, mean over the splits (Pearson delta / pseudobulk RMSE):", "",
             "| double | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for c, r in means.iterrows():
        lines.append(f"| {c} | " + " | ".join(f"{r[(m, 'pearson_delta_all')]:.3f} / {r[(m, 'pseudobulk_rmse_all')]:.4f}"
                                           for m in methods) + " |")
    return lines + [""]


def figure(pc: pd.DataFrame, path: Path) -> Path:
    """The held-out doubles, one point per double and split: the model (preset) against linear, Pearson
    delta and pseudobulk RMSE, with the diagonal (above it on the left / below it on the right: the
    model is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = _by_condition(pc, "seen2").reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    markers = dict(zip(RUNS, "os^Dv"))
    for ax, (metric, label) in zip(axes, [("pearson_delta_all", "Pearson delta (all genes)"),
                                          ("pseudobulk_rmse_all", "pseudobulk RMSE")]):
        x, y = wide[("linear", metric)], wide[("model", metric)]
        for split, marker in markers.items():
            rows = wide["split"] == split
            ax.scatter(x[rows], y[rows], marker=marker, label=f"split {split}")
        for _, r in wide[wide["split"] == 0].iterrows():
            ax.annotate(r[("condition", "")], (r[("linear", metric)], r[("model", metric)]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        pad = 0.05 * (hi - lo)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8)
        ax.set_xlabel(f"linear: {label}")
        ax.set_ylabel(f"model (preset): {label}")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Real subset, held-out doubles over {len(RUNS)} splits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO / "analyses" / "results"))
    ap.add_argument("--out", default=str(REPO / "analyses" / "results" / "norman_splits"))
    args = ap.parse_args(argv)
    try:
        pc = per_condition(Path(args.results))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from norman_fit import write_summary
    from pyro_pvae.utils import atomic_write

    out = Path(args.out)
    text = write_summary(out, summary(pc) + "\n")
    atomic_write(out / "per_condition.csv", lambda tmp: pc.to_csv(tmp, index=False))
    figure(pc, out / "doubles_model_vs_linear.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
