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


def _write_results(folder: Path, values: dict) -> None:
    """results.csv in the benchmark's long form: values[(method, group, condition, metric)] = [per seed]."""
    import pandas as pd

    rows = [{"method": m, "condition": c, "group": g, "metric": k, "value": v, "seed": s, "note": ""}
            for (m, g, c, k), vs in values.items() for s, v in enumerate(vs)]
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)


def test_split_robustness_counts_the_model_wins_over_the_splits(tmp_path, capsys):
    import split_robustness as sr

    # per split s: the model's doubles Pearson 0.5 (seeds 0.4 / 0.6) on A and B; linear 0.45 on A, 0.55 on B
    # (model wins A in every split, loses B); RMSE model 0.09, linear 0.08 + 0.02 s (model wins splits 1-4)
    assert list(sr.RUNS) == [0, 1, 2, 3, 4]
    for s, runs in sr.RUNS.items():
        for label, folder in runs.items():
            vals = {}
            for c in ("A", "B"):
                vals[("PerturbedVAE", "seen2", c, "pearson_delta_all")] = [0.4, 0.6]
                vals[("PerturbedVAE", "seen2", c, "pseudobulk_rmse_all")] = [0.09, 0.09]
                vals[("PerturbedVAE", "single", c, "pearson_delta_all")] = [0.3, 0.3]
                vals[("PerturbedVAE", "single", c, "pseudobulk_rmse_all")] = [0.1, 0.1]
                for b in sr.BASELINES:
                    vals[(b, "seen2", c, "pearson_delta_all")] = [0.45 if c == "A" else 0.55]
                    vals[(b, "seen2", c, "pseudobulk_rmse_all")] = [0.08 + 0.02 * s]
                    vals[(b, "single", c, "pearson_delta_all")] = [0.2]
                    vals[(b, "single", c, "pseudobulk_rmse_all")] = [0.2]
            _write_results(tmp_path / folder, vals)
    assert sr.main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "doubles_model_vs_linear.png").stat().st_size > 10_000
    assert ("| linear | 0.500 / 0.0800 | 0.500 / 0.1000 | 0.500 / 0.1200 | 0.500 / 0.1400 | 0.500 / 0.1600 "
            "| **0.500 / 0.1200** |") in text
    assert "| model | " + "0.500 / 0.0900 | " * 5 + "**0.500 / 0.0900** |" in text
    assert ("against linear, per condition and split: pearson_delta_all: model better in 5 of 10, mean difference "
            "+0.0000 ± 0.0167; pseudobulk_rmse_all: model better in 8 of 10, mean difference -0.0300 ± 0.0094") in text
    # per double, the mean over the five splits (model, model without the library-size model, additive, linear)
    assert "| A | 0.500 / 0.0900 | 0.500 / 0.0900 | 0.450 / 0.1200 | 0.450 / 0.1200 |" in text
    assert "| B | 0.500 / 0.0900 | 0.500 / 0.0900 | 0.550 / 0.1200 | 0.550 / 0.1200 |" in text
    # a missing run folder is a clear error naming the step that makes it
    (tmp_path / "benchmark_norman_split2" / "results.csv").unlink()
    assert sr.main(["--results", str(tmp_path), "--out", str(tmp_path / "out2")]) == 2
    assert "reproduce_readme.sh norman splits" in capsys.readouterr().err


def test_level_error_composition_factor_reads_the_scale_of_a_double_on_its_singles():
    """A double that is 0.6 times the sum of its singles reads 0.6; one orthogonal to the sum
    reads 0; noise orthogonal to the sum does not move it."""
    import numpy as np
    from level_error import composition_factor

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500)
    assert composition_factor(0.6 * (a + b), [a, b]) == pytest.approx(0.6)
    s = a + b
    noise = rng.normal(size=500)
    noise -= (noise @ s) / (s @ s) * s
    assert composition_factor(noise, [a, b]) == pytest.approx(0.0, abs=1e-12)
    assert composition_factor(1.2 * s + noise, [a, b]) == pytest.approx(1.2)


def test_level_error_composition_at_scales_the_doubles_only_and_restores_the_fit(tiny_vae, tiny_adata, tiny_split):
    """composition_at(vae, c): a double's predicted change grows with c, and the fitted c2 is restored
    exactly, also when the block raises. (Singles move too, less: start cells of training doubles are
    moved back to control with c.)"""
    import numpy as np
    import torch
    from level_error import composition_at

    from pyro_pvae import data as D

    cond = np.asarray(tiny_adata.obs["condition"]).astype(str)
    double = next(c for c in cond[np.asarray(tiny_split.test_idx)] if len(D.parse_condition(c)) == 2)
    fitted = tiny_vae.module.c2_loc.detach().clone()
    out = {}
    for c2 in (0.5, 1.5):
        with composition_at(tiny_vae, c2):
            assert float(tiny_vae.module.c2_loc.detach().exp()) == pytest.approx(c2)
            prof = tiny_vae.predict_mean([double, D.CONTROL], n_cells=500, n_draws=4, seed=0)
        out[c2] = prof.to_numpy() - prof.loc[[D.CONTROL]].to_numpy()
    assert torch.equal(tiny_vae.module.c2_loc.detach(), fitted)
    assert np.abs(out[1.5][0]).mean() > 1.3 * np.abs(out[0.5][0]).mean()
    with pytest.raises(RuntimeError):
        with composition_at(tiny_vae, 2.0):
            raise RuntimeError("inside")
    assert torch.equal(tiny_vae.module.c2_loc.detach(), fitted)


def _exogenous_coordinates(**overrides):
    """The simulator's controls and singles: labels, true z_pert, (I - W) z_pert (what an exact
    shift-intervention model infers) and the truth."""
    import numpy as np

    from pyro_pvae.simulate import simulate

    adata = simulate("tiny", 3, n_genes=30, n_pert_latents=4, n_singles=8, n_doubles=0, cells_per_single=1000,
                     n_control=600, edge_prob=0.6, **overrides)
    truth = adata.uns["truth"]
    z = adata.obsm["z_pert_true"]
    return adata.obs["condition"].astype(str).to_numpy(), z, z @ (np.eye(4) - np.asarray(truth["W"])).T, truth


def test_hard_intervention_check_reads_the_true_dag_off_exact_exogenous_coordinates():
    import numpy as np

    import hard_intervention_check as hic
    from pyro_pvae.identifiability import mcc

    labels, z, x, truth = _exogenous_coordinates()
    W = np.asarray(truth["W"])
    assert (np.abs(W) > 0).sum() >= 2  # a DAG with edges, each latent hard-intervened by one single
    W_hat, targets, _ = hic.dag_from_hard_interventions(x, labels)
    # the hard interventions on latents with parents, and only those, are found (roots' cuts are shifts)
    assert {(c, k) for k, c in targets.items()} == hic._hard_pairs(truth)
    assert np.abs(W_hat - W).max() < 0.1  # sampling error about 0.03 at 1,000 cells
    T = np.linalg.inv(np.eye(4) - W_hat)
    assert mcc(z, x).value < 0.95 < 0.99 < mcc(z, x @ T.T).value
    # shift interventions only: nothing to read, W stays 0
    labels, z, x, truth = _exogenous_coordinates(intervention_coverage=False)
    assert not np.asarray(truth["hard_targets"]).any()
    W_hat, targets, _ = hic.dag_from_hard_interventions(x, labels)
    assert targets == {} and not W_hat.any()
    with pytest.raises(ValueError, match="no cell is labelled 'control'"):
        hic.condition_regressions(x, np.full(len(x), "A"))
