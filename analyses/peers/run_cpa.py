"""Train CPA (cpa-tools 0.8.8) on the benchmark's training cells and write its predictions.

Run with the CPA venv (analyses/peers/install_cpa.sh), NOT with pyro_pvae's venv; this script
does not import pyro_pvae. Its input is the export of analyses/peers/export_split.py:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 /work/cpa-venv/bin/python analyses/peers/run_cpa.py \
        --split analyses/results/peers_cpa/norman_split.h5ad --seed 0 \
        --out analyses/results/peers_cpa/seed0

Protocol (analyses/peers/README.md):

* CPA is set up and trained on the split's ``train`` cells only (the ``val`` cells are CPA's
  validation set, as they are the model's); the held-out reference controls and every test cell
  are not in the AnnData CPA sees at all, so their labels are not in its vocabulary either.
* Hyperparameters: CPA's Norman 2019 tutorial (model_params / trainer_params below), batch 128,
  a FIXED number of epochs (``--epochs``, default 200) keeping the LAST weights: CPA's own
  best-state callback (scvi's SaveBestState, on ``cpa_metric``) would restore the epoch where
  the adversary switches on, and its early stopping would stop there, so the restore is
  disabled (checked after training) and the patience set beyond the run.
* Prediction (counterfactual): for every held-out condition, the TRAINING control cells are
  encoded and decoded with that condition's perturbation(s) (CPA's ``predict`` on an AnnData
  whose X holds the training controls' counts and whose ``perts`` are the target's); the
  ``control`` block is the same cells with the control token (CPA's reconstruction of them),
  the method's own control prediction. CPA's tutorial instead predicts on the real held-out
  perturbed cells' rows, which lets the encoder see the answer.

Outputs in ``--out``:

* ``pred.h5ad``: X = CPA's ``predict`` output, the negative-binomial MEAN (expected counts,
  non-integer, library size of the input control cell), one cell per training control per
  condition; ``obs['condition']`` canonical labels (``control`` included),
  ``obs['control_cell']`` the source cell. The benchmark log-normalises it like counts.
* ``pred_sampled.h5ad`` (unless ``--n-sample-reps 0``): counts drawn from CPA's NB likelihood
  (mean as above, CPA's gene-wise dispersion ``exp(px_r)``), ``--n-sample-reps`` draws per
  training control cell: cells on the same scale as observed cells (for the cell metrics).
* ``history.csv`` (CPA's epoch history), ``run.json`` (settings, versions, wall times).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "control"

# CPA's Norman 2019 tutorial (docs/tutorials/Norman.ipynb of cpa-tools 0.8.x); seed set per run
MODEL_PARAMS = {
    "n_latent": 32,
    "recon_loss": "nb",
    "doser_type": "linear",
    "n_hidden_encoder": 256,
    "n_layers_encoder": 4,
    "n_hidden_decoder": 256,
    "n_layers_decoder": 2,
    "use_batch_norm_encoder": True,
    "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False,
    "use_layer_norm_decoder": False,
    "dropout_rate_encoder": 0.2,
    "dropout_rate_decoder": 0.0,
    "variational": False,
}
TRAINER_PARAMS = {
    "n_epochs_kl_warmup": None,
    "n_epochs_adv_warmup": 50,
    "n_epochs_mixup_warmup": 10,
    "n_epochs_pretrain_ae": 10,
    "mixup_alpha": 0.1,
    "lr": 0.0001,
    "wd": 3.2170178270865573e-06,
    "adv_steps": 3,
    "reg_adv": 10.0,
    "pen_adv": 20.0,
    "adv_lr": 0.0001,
    "adv_wd": 7.051355554517135e-06,
    "n_layers_adv": 2,
    "n_hidden_adv": 128,
    "use_batch_norm_adv": True,
    "use_layer_norm_adv": False,
    "dropout_rate_adv": 0.3,
    "step_size_lr": 25,
    "do_clip_grad": False,
    "adv_loss": "cce",
    "gradient_clip_value": 5.0,
}


def canon(label: str) -> str:
    """Canonical condition label (control, or target genes sorted and joined by '+')."""
    parts = [p.strip() for p in str(label).split("+") if p.strip()]
    genes = sorted({p for p in parts if p.lower() not in ("control", "ctrl")})
    return "+".join(genes) if genes else CONTROL


def lognorm(X) -> np.ndarray:
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    tot = X.sum(1, keepdims=True)
    return np.log1p(X / np.where(tot > 0, tot, 1.0) * 1e4)


def atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a killed run never leaves a half-written file
    (this script runs in CPA's venv and does not import pyro_pvae's own helper)."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # keeps .h5ad
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("cpa-tools", "scvi-tools", "pytorch-lightning", "lightning", "torch", "numpy", "anndata", "scanpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="analyses/results/peers_cpa/norman_split.h5ad",
                   help="export of analyses/peers/export_split.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200, help="fixed number of epochs; the last weights are kept")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--check-val-every", type=int, default=5)
    p.add_argument("--n-sample-reps", type=int, default=4,
                   help="NB draws per training control cell for pred_sampled.h5ad (0: skip)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    t_start = time.perf_counter()
    import anndata as ad
    import torch

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import cpa
    import cpa._model as cpa_model
    import scvi
    from cpa._utils import CPA_REGISTRY_KEYS
    from pytorch_lightning.callbacks import Callback
    from scvi.train._callbacks import SaveBestState

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    full = ad.read_h5ad(a.split)
    for col in ("condition", "split"):
        if col not in full.obs:
            raise SystemExit(f"{a.split}: no obs[{col!r}]; make it with analyses/peers/export_split.py")
    cond_all = np.array([canon(c) for c in full.obs["condition"].astype(str)])
    split_all = full.obs["split"].astype(str).values
    test_conditions = [str(c) for c in full.uns["test_conditions"]]
    counts_all = full.layers.get("counts", full.X)
    counts_all = sp.csr_matrix(counts_all, dtype=np.float32)

    # ---- CPA's AnnData: training + validation cells only (no held-out control, no test cell)
    keep = np.isin(split_all, ["train", "val"])
    tr = ad.AnnData(X=counts_all[keep].copy(), var=pd.DataFrame(index=full.var_names.astype(str)))
    tr.obs_names = full.obs_names[keep].astype(str)
    tr.obs["condition"] = pd.Categorical(cond_all[keep])
    tr.obs["split"] = pd.Categorical(split_all[keep])
    tr.obs["cell_type"] = pd.Categorical(["K562"] * tr.n_obs)  # one context, as in CPA's Norman tutorial
    tr.layers["counts"] = tr.X.copy()
    train_ctrl = np.flatnonzero((tr.obs["split"].astype(str).values == "train") & (tr.obs["condition"].astype(str).values == CONTROL))
    print(f"[cpa] training AnnData: {tr.n_obs} cells ({int(np.sum(tr.obs['split'] == 'train'))} train, "
          f"{int(np.sum(tr.obs['split'] == 'val'))} val), {tr.obs['condition'].nunique()} conditions, "
          f"{len(train_ctrl)} training controls; {len(test_conditions)} held-out conditions to predict", flush=True)

    # CPA keeps the encoders on the class; a fresh process starts clean, but be explicit
    cpa.CPA.pert_encoder = None
    cpa.CPA.covars_encoder = None
    cpa.CPA.pert_smiles_map = None
    cpa.CPA.setup_anndata(tr, perturbation_key="condition", control_group=CONTROL, dosage_key=None,
                          categorical_covariate_keys=["cell_type"], is_count_data=True, max_comb_len=2)
    pert_encoder = dict(cpa.CPA.pert_encoder)
    vocab = set(pert_encoder) - {"<PAD>", CONTROL}
    unknown = {c: [g for g in c.split("+") if g not in vocab] for c in test_conditions}
    unknown = {c: g for c, g in unknown.items() if g}
    if unknown:
        print(f"[cpa] WARNING: held-out conditions with targets CPA never saw in training (no prediction): {unknown}")

    def encode(c: str):
        """What setup_anndata stores for condition c: perturbation indices (padded) and doses."""
        names = np.array(list(pert_encoder))
        idx = list(np.where(np.isin(names, c.split("+")))[0])
        idx += [CPA_REGISTRY_KEYS.PADDING_IDX] * (2 - len(idx))
        doses = [1.0] * len(c.split("+")) + [0.0] * (2 - len(c.split("+")))
        return np.array(idx, dtype=int), np.array(doses, dtype=float)

    # our encoding must reproduce CPA's for every training condition
    P, D = tr.obsm[CPA_REGISTRY_KEYS.PERTURBATIONS], tr.obsm[CPA_REGISTRY_KEYS.PERTURBATIONS_DOSAGES]
    for c in tr.obs["condition"].cat.categories:
        i = int(np.flatnonzero(tr.obs["condition"].astype(str).values == c)[0])
        e, d = encode(str(c))
        assert np.array_equal(P[i], e) and np.allclose(D[i], d), (c, P[i], e, D[i], d)

    # ---- train: fixed epochs, last weights
    class KeepLastState(SaveBestState):
        """scvi's SaveBestState without the restore at the end of training (last weights kept)."""

        def on_train_end(self, trainer, pl_module):
            pass

    class LastState(Callback):
        def on_train_end(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
            self.epochs = trainer.current_epoch

    cpa_model.SaveBestState = KeepLastState
    last = LastState()
    scvi.settings.seed = a.seed
    model = cpa.CPA(adata=tr, split_key="split", train_split="train", valid_split="val", test_split="test",
                    seed=a.seed, **MODEL_PARAMS)
    t0 = time.perf_counter()
    model.train(max_epochs=a.epochs, use_gpu=False, batch_size=a.batch_size, plan_kwargs=dict(TRAINER_PARAMS),
                early_stopping_patience=10 ** 6, check_val_every_n_epoch=a.check_val_every, save_path=False,
                enable_progress_bar=False, callbacks=[last])
    t_train = time.perf_counter() - t0
    now = model.module.state_dict()
    same = all(torch.equal(now[k], v) for k, v in last.state.items())
    if not same:
        raise SystemExit("[cpa] the trained module is not the last epoch's state (best-state restore not disabled?)")
    hist = model.epoch_history
    hist.to_csv(out / "history.csv", index=False)
    n_epochs_run = int(hist.loc[hist["mode"] == "train", "epoch"].max()) + 1
    print(f"[cpa] trained {n_epochs_run} epochs in {t_train:.0f} s (last weights kept)", flush=True)
    if n_epochs_run != a.epochs:
        raise SystemExit(f"[cpa] ran {n_epochs_run} epochs, asked for {a.epochs} (early stopping not disabled?)")

    # ---- counterfactual prediction from the TRAINING control cells
    Xc = tr.X[train_ctrl]
    src = tr.obs_names[train_ctrl].values
    targets = [CONTROL] + [c for c in test_conditions if c not in unknown]
    blocks, obs = [], []
    for c in targets:
        blocks.append(Xc)
        obs.append(pd.DataFrame({"condition": c, "control_cell": src}))
    pa = ad.AnnData(X=sp.vstack(blocks).tocsr(), var=pd.DataFrame(index=tr.var_names))
    po = pd.concat(obs, ignore_index=True)
    pa.obs_names = [f"{c}|{s}" for c, s in zip(po["condition"], po["control_cell"])]
    # registry fields take the training control's labels (known categories); the perturbation
    # itself is in obsm, exactly as setup_anndata encodes a cell of that condition
    pa.obs["condition"] = pd.Categorical([CONTROL] * pa.n_obs, categories=tr.obs["condition"].cat.categories)
    pa.obs["cell_type"] = pd.Categorical(["K562"] * pa.n_obs, categories=tr.obs["cell_type"].cat.categories)
    for k in (CPA_REGISTRY_KEYS.CONTROL_KEY, CPA_REGISTRY_KEYS.CATEGORY_KEY, "CPA_dose_val"):
        if k in tr.obs:
            v = tr.obs[k].values[train_ctrl[0]]
            pa.obs[k] = pd.Categorical([v] * pa.n_obs, categories=tr.obs[k].cat.categories) \
                if isinstance(tr.obs[k].dtype, pd.CategoricalDtype) else v
    enc = [encode(c) for c in po["condition"]]
    pa.obsm[CPA_REGISTRY_KEYS.PERTURBATIONS] = np.stack([e for e, _ in enc])
    pa.obsm[CPA_REGISTRY_KEYS.PERTURBATIONS_DOSAGES] = np.stack([d for _, d in enc])
    t0 = time.perf_counter()
    model.predict(pa, batch_size=256, n_samples=1)
    mu = np.asarray(pa.obsm["CPA_pred"], dtype=np.float64)
    t_pred = time.perf_counter() - t0
    if not np.all(np.isfinite(mu)) or np.any(mu < 0):
        raise SystemExit("[cpa] predict returned negative or non-finite means")

    pred = ad.AnnData(X=mu.astype(np.float32), var=pd.DataFrame(index=tr.var_names))
    pred.obs_names = pa.obs_names
    pred.obs["condition"] = pd.Categorical(po["condition"].values)
    pred.obs["control_cell"] = po["control_cell"].values
    pred.uns["cpa"] = json.dumps({"values": "negative-binomial mean (expected counts) from cpa.CPA.predict",
                                  "seed": a.seed, "epochs": a.epochs})
    atomic(out / "pred.h5ad", pred.write_h5ad)

    if a.n_sample_reps > 0:
        theta = torch.exp(model.module.px_r.detach()).cpu().numpy().astype(np.float64)  # (genes,)
        rng = np.random.default_rng([a.seed, 20240])
        M = np.repeat(mu, a.n_sample_reps, axis=0)
        lam = rng.gamma(shape=theta[None, :], scale=M / theta[None, :])  # gamma-Poisson = NB(mu, theta)
        S = rng.poisson(lam).astype(np.float32)
        samp = ad.AnnData(X=sp.csr_matrix(S), var=pd.DataFrame(index=tr.var_names))
        samp.obs_names = [f"{n}|{r}" for n in pa.obs_names for r in range(a.n_sample_reps)]
        samp.obs["condition"] = pd.Categorical(np.repeat(po["condition"].values, a.n_sample_reps))
        samp.obs["control_cell"] = np.repeat(po["control_cell"].values, a.n_sample_reps)
        samp.uns["cpa"] = json.dumps({"values": "counts drawn from NB(mean=CPA.predict, theta=exp(px_r))",
                                      "seed": a.seed, "epochs": a.epochs, "reps": a.n_sample_reps})
        atomic(out / "pred_sampled.h5ad", samp.write_h5ad)

    # ---- sanity (in-sample): predicted vs TRAINING-cell change of the conditions CPA trained on
    Ltr = lognorm(tr.X)
    trc = tr.obs["condition"].astype(str).values
    trs = tr.obs["split"].astype(str).values
    ctrl_pred = lognorm(mu[po["condition"].values == CONTROL]).mean(0)
    ctrl_obs = Ltr[(trs == "train") & (trc == CONTROL)].mean(0)
    fit = {}
    for c in targets[1:]:
        rows = (trs == "train") & (trc == c)
        if rows.sum() >= 10:
            dp = lognorm(mu[po["condition"].values == c]).mean(0) - ctrl_pred
            do = Ltr[rows].mean(0) - ctrl_obs
            fit[c] = float(np.corrcoef(dp, do)[0, 1])
    if fit:
        print(f"[cpa] in-sample check (held-out singles' TRAINING cells): Pearson of predicted vs training change, "
              f"mean {np.mean(list(fit.values())):.3f} over {len(fit)} conditions", flush=True)

    wall = time.perf_counter() - t_start
    info = {"seed": a.seed, "epochs": a.epochs, "epochs_run": n_epochs_run, "batch_size": a.batch_size,
            "check_val_every_n_epoch": a.check_val_every, "threads": a.threads,
            "n_training_cells": int(np.sum(tr.obs["split"] == "train")),
            "n_validation_cells": int(np.sum(tr.obs["split"] == "val")),
            "n_training_controls": len(train_ctrl), "predicted_conditions": targets,
            "unpredictable_conditions": unknown, "train_seconds": round(t_train, 1),
            "predict_seconds": round(t_pred, 1), "wall_seconds": round(wall, 1),
            "in_sample_pearson_train_singles": fit, "model_params": MODEL_PARAMS,
            "trainer_params": TRAINER_PARAMS, "versions": versions(), "split_file": str(a.split),
            "last_val": {k: float(v) for k, v in hist[hist["mode"] == "valid"].iloc[-1].items()
                         if k not in ("mode",) and np.isscalar(v) and not isinstance(v, str)}}
    atomic(out / "run.json", lambda t: t.write_text(json.dumps(info, indent=2, default=str)))
    print(f"[cpa] wrote {out}/pred.h5ad ({pred.n_obs} cells, {len(targets)} conditions incl. control)"
          + (f", pred_sampled.h5ad ({a.n_sample_reps} draws per cell)" if a.n_sample_reps > 0 else "")
          + f"; wall {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
