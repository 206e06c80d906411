"""Run directories (pyro_pvae/rundir.py): lock, stale locks, refusals, cleanup after a failure."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pyro_pvae import rundir as R
from pyro_pvae.config import ConfigError
from pyro_pvae.fit import main as fit_main
from pyro_pvae.train import TrainingError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "train.epochs=2", "train.progress=false", "model.hidden=32"]


def cfg_for(run_dir=None, root="runs", resume=False):
    return OmegaConf.create({"config_name": "tiny", "output": {"root": str(root), "run_dir": run_dir and str(run_dir)},
                             "train": {"resume": resume}})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir: Path, **info) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": dead_pid(), "host": socket.gethostname(), "since": "2020-01-01 00:00:00",
            "command": "python -m pyro_pvae.fit --config tiny", **info}
    (run_dir / R.LOCK_NAME).write_text(json.dumps(info))
    return info


@pytest.fixture(autouse=True)
def sim_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PYRO_PVAE_CACHE", str(tmp_path_factory.getbasetemp() / "sim-cache"))


# ---- the lock -----------------------------------------------------------------------------

def test_lock_names_this_process_and_is_removed_on_exit(tmp_path):
    with R.claim_run_dir(cfg_for(tmp_path / "run")) as run:
        info = json.loads((run.path / R.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["since"][:4].isdigit() and info["command"]
        (run.path / "model.pt").write_text("x")
        assert run.files() == ["model.pt"]  # the lock is not an output
    assert not (tmp_path / "run" / R.LOCK_NAME).exists() and (tmp_path / "run" / "model.pt").exists()


def test_second_claim_refuses_and_names_the_holder(tmp_path):
    with R.claim_run_dir(cfg_for(tmp_path / "run")) as run:
        since = json.loads(run.lock_path.read_text())["since"]
        with pytest.raises(R.RunDirError) as err:
            R.claim_run_dir(cfg_for(tmp_path / "run"))
        msg = str(err.value)
        assert isinstance(err.value, ConfigError) and "\n" not in msg
        assert f"is in use by pid {os.getpid()} on {socket.gethostname()} since {since}" in msg
        assert "choose another output.run_dir" in msg
        assert run.lock_path.exists()  # the refused claim left the holder's lock alone
    assert not run.lock_path.exists()


def test_lock_held_on_another_host_is_not_judged_stale(tmp_path):
    write_lock(tmp_path / "run", host="other-node", pid=1234)
    with pytest.raises(R.RunDirError, match="in use by pid 1234 on other-node since 2020-01-01 00:00:00"):
        R.claim_run_dir(cfg_for(tmp_path / "run"))


def test_stale_lock_is_reported_and_taken_over(tmp_path, caplog):
    stale = write_lock(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="pyro_pvae.rundir"):
        with R.claim_run_dir(cfg_for(tmp_path / "run")) as run:
            assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {stale['pid']}" in caplog.text
    assert not (tmp_path / "run" / R.LOCK_NAME).exists()


def test_lock_held_by_a_killed_process_is_stale(tmp_path):
    """A real holder in another process: refused while it lives, taken over after kill -9."""
    run_dir = tmp_path / "run"
    script = ("import sys, time; from omegaconf import OmegaConf; from pyro_pvae.rundir import claim_run_dir\n"
              f"run = claim_run_dir(OmegaConf.create({{'config_name': 'tiny', 'output': {{'root': 'runs', "
              f"'run_dir': {str(run_dir)!r}}}, 'train': {{'resume': False}}}}))\n"
              "print('claimed', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(R.RunDirError, match=f"in use by pid {holder.pid} on "):
            R.claim_run_dir(cfg_for(run_dir))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / R.LOCK_NAME).exists()  # kill -9 runs no cleanup
    with R.claim_run_dir(cfg_for(run_dir)):
        pass
    assert not (run_dir / R.LOCK_NAME).exists()


# ---- refusals --------------------------------------------------------------------------

def test_run_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    with pytest.raises(R.RunDirError, match=f"run directory {f} is a file, not a directory"):
        R.claim_run_dir(cfg_for(f))
    with pytest.raises(R.RunDirError, match="cannot create run directory .*a file stands in the path"):
        R.claim_run_dir(cfg_for(root=f / "runs"))
    assert f.read_text() == "keep me"


def unwritable_root(tmp_path) -> Path:
    """A folder this process cannot create folders in (root ignores chmod: use /sys)."""
    if os.geteuid() != 0:
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        return ro / "runs"
    probe = Path("/sys/pyro_pvae_write_probe")
    try:
        probe.mkdir()
    except OSError:
        return probe / "runs"
    probe.rmdir()
    pytest.skip("no unwritable location on this machine")


def test_unwritable_output_root_is_one_line_through_the_cli(tmp_path, capsys):
    root = unwritable_root(tmp_path)
    assert fit_main(TINY + [f"output.root={root}"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot create run directory {root}/tiny-fit-" in err and "choose a writable output.root" in err
    assert "Traceback" not in err and not root.exists()


def test_run_dir_file_is_one_line_through_the_cli(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("")
    assert fit_main(TINY + [f"output.run_dir={f}"]) == 2
    err = capsys.readouterr().err
    assert f"error: run directory {f} is a file" in err and "Traceback" not in err


@pytest.mark.parametrize("present, message", [
    ({"model.pt": "", "config.yaml": ""}, "already holds a finished run (model.pt); continue its training with "
                                          "train.resume=true output.run_dir="),
    ({"checkpoint.pt": ""}, "holds an unfinished run (checkpoint.pt); continue it with train.resume=true"),
    ({"notes.txt": "mine"}, "is not empty (1 entry, e.g. notes.txt); choose a new or empty output.run_dir"),
])
def test_directory_holding_another_run_is_refused_unless_resuming(tmp_path, present, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, text in present.items():
        (run_dir / name).write_text(text)
    with pytest.raises(R.RunDirError, match=message.replace("(", r"\(").replace(")", r"\)")):
        R.claim_run_dir(cfg_for(run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(present)  # untouched, no lock left
    with R.claim_run_dir(cfg_for(run_dir, resume=True)) as run:  # resuming is allowed
        assert run.files() == sorted(present)


def test_generated_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(R.time, "strftime", lambda fmt: "20250101-000000")
    with R.claim_run_dir(cfg_for(root=tmp_path)) as a, R.claim_run_dir(cfg_for(root=tmp_path)) as b:
        assert (a.path.name, b.path.name) == ("tiny-fit-20250101-000000", "tiny-fit-20250101-000000-2")
    with R.claim_run_dir(cfg_for(root=tmp_path, resume=True)) as latest:
        assert latest.path == b.path


def test_resume_without_an_earlier_run_is_refused(tmp_path):
    with pytest.raises(R.RunDirError, match="train.resume=true but no earlier run tiny-fit-\\* under"):
        R.claim_run_dir(cfg_for(root=tmp_path, resume=True))


# ---- a failed start ------------------------------------------------------------------------

def test_failure_before_any_checkpoint_removes_the_directory_and_the_root_it_made(tmp_path):
    root = tmp_path / "runs" / "nested"
    with pytest.raises(RuntimeError, match="boom"):
        with R.claim_run_dir(cfg_for(root=root)) as run:
            (run.path / "config.yaml").write_text("x")
            (run.path / "split.json.tmp").write_text("x")
            (run.path / "plots").mkdir()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failure_with_a_checkpoint_keeps_what_resume_needs(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError):
        with caplog.at_level(logging.WARNING, logger="pyro_pvae.rundir"):
            with R.claim_run_dir(cfg_for(run_dir)) as run:
                for name in ("config.yaml", "split.json", "checkpoint.pt", "metrics.csv", "training_curves.png",
                             "checkpoint.pt.tmp"):
                    (run.path / name).write_text("x")
                raise TrainingError("non-finite loss")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.csv", "split.json"]
    assert f"continue with train.resume=true output.run_dir={run_dir}" in caplog.text


def test_failure_after_the_model_exists_removes_nothing(tmp_path):
    with pytest.raises(KeyError):
        with R.claim_run_dir(cfg_for(tmp_path / "run")) as run:
            for name in ("config.yaml", "model.pt", "training_curves.png"):
                (run.path / name).write_text("x")
            raise KeyError("effects")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "model.pt", "training_curves.png"]


def test_failed_resume_keeps_the_earlier_files_and_removes_its_own(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("earlier")
    (run_dir / "notes.txt").write_text("earlier")
    with pytest.raises(RuntimeError):
        with R.claim_run_dir(cfg_for(run_dir, resume=True)) as run:
            (run.path / "config.yaml").write_text("resumed")
            (run.path / "stray.tmp").write_text("x")
            raise RuntimeError("device")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "notes.txt"]


def test_failed_fit_through_the_cli_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    from pyro_pvae.api import PerturbedVAE

    def failing_fit(self, run_dir=None, **kw):
        self.split.to_json(Path(run_dir) / "split.json")
        raise TrainingError("non-finite loss (nan) at epoch 0")

    monkeypatch.setattr(PerturbedVAE, "fit", failing_fit)
    root = tmp_path / "runs"
    assert fit_main(TINY + [f"output.root={root}"]) == 2
    assert "error: non-finite loss (nan) at epoch 0" in capsys.readouterr().err
    assert not root.exists()


def test_failed_benchmark_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    from pyro_pvae import benchmark as B

    def failing(*args, **kw):
        raise B.BenchmarkError("method failed")

    monkeypatch.setattr(B, "cell_benchmark", failing)
    root = tmp_path / "runs"
    assert B.main(["--config", "tiny", "benchmark.methods=[control_mean]", f"output.root={root}"]) == 2
    assert "error: method failed" in capsys.readouterr().err
    assert not root.exists()


def test_printed_file_list_is_what_exists(tmp_path, monkeypatch, capsys):
    from pyro_pvae.api import PerturbedVAE

    def fake_fit(self, run_dir=None, **kw):
        (Path(run_dir) / "model.pt").write_text("x")
        return self

    monkeypatch.setattr(PerturbedVAE, "fit", fake_fit)
    monkeypatch.setattr(PerturbedVAE, "effects", lambda self: pd.DataFrame({"pip": [0.9, 0.1], "lfsr": [0.01, 0.4]}))
    run_dir = tmp_path / "run"
    assert fit_main(TINY + [f"output.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"outputs in {run_dir}/ : config.yaml effects.csv fit_summary.json model.pt\n" in out
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "effects.csv", "fit_summary.json", "model.pt"]


# ---- two real fits on one directory ------------------------------------------------------------

@pytest.mark.slow
def test_second_fit_on_the_same_directory_refuses_and_the_first_finishes_intact(tmp_path):
    run_dir = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pyro_pvae.fit", *TINY, f"output.run_dir={run_dir}"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / R.LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        while R._read_lock(run_dir / R.LOCK_NAME, attempts=1).get("pid") != first.pid:
            time.sleep(0.05)  # its details are written just after the file is created
        first.send_signal(signal.SIGSTOP)  # hold the first inside its run while the second tries
        try:
            second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2
        assert f"error: run directory {run_dir} is in use by pid {first.pid} on {socket.gethostname()}" \
            in second.stderr and "Traceback" not in second.stderr
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-2000:]
    files = ["checkpoint.pt", "config.yaml", "effects.csv", "fit_summary.json", "metrics.csv", "model.pt",
             "split.json", "training_curves.png"]
    assert sorted(p.name for p in run_dir.iterdir()) == files
    assert f"outputs in {run_dir}/ : {' '.join(files)}" in out
    from pyro_pvae import load_run

    assert load_run(run_dir).history  # the first run's model, whole
