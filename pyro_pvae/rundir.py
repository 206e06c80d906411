"""Run directories: resolve, claim with a lock file, clean up after a failed start.

``with claim_run_dir(cfg, "fit") as run:`` write into ``run.path``. While the block runs the
directory holds ``.lock`` (JSON: pid, host, since, command), created atomically
(``O_CREAT | O_EXCL``); a second claimant refuses with one line naming the holder. A lock
whose pid is no longer alive on this host is stale: a warning, then it is taken over.

Leaving the block releases the lock. If the block raises before the run produced its
product (``model.pt`` for a fit, ``results.csv`` for a benchmark):

- with a ``checkpoint.pt`` in the directory, the resumable state ``checkpoint.pt``,
  ``config.yaml``, ``split.json`` and ``metrics.csv`` is kept (``train.resume=true
  output.run_dir=DIR`` continues the run) and every other entry this run created is removed;
- without one, every entry this run created is removed, and so is the directory (and any
  parent folders) if this run created it.

Entries that were in the directory before the claim (a resumed run's files) are never
removed. Once the product exists, a failure removes nothing.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CHECKPOINT = "checkpoint.pt"
#: what a failed run keeps when it has a checkpoint: enough for ``train.resume=true``
RESUMABLE = (CHECKPOINT, "config.yaml", "split.json", "metrics.csv")
#: the file whose existence means a run of this kind produced its output
PRODUCTS = {"fit": "model.pt", "ddp": "model.pt", "benchmark": "results.csv"}


class RunDirError(ConfigError):
    """A run directory that cannot be used: unwritable, a file, in use, or holding another run."""


# ---- where ------------------------------------------------------------------------------

def resolve_run_dir(cfg, kind: str = "fit") -> tuple[Path, bool]:
    """``(path, named)``: ``output.run_dir`` if set; with ``train.resume`` and no run_dir, the
    latest ``<output.root>/<config>-<kind>-*``; else a new ``<output.root>/<config>-<kind>-<timestamp>``
    (``named`` False: the caller may pick a free suffix if that name is taken)."""
    if cfg.output.run_dir:
        return Path(cfg.output.run_dir), True
    root = Path(cfg.output.root)
    prefix = f"{cfg.config_name}-{kind}-"
    if cfg.train.get("resume"):
        previous = sorted(p for p in root.glob(prefix + "*") if p.is_dir())
        if not previous:
            raise RunDirError(f"train.resume=true but no earlier run {prefix}* under {root}; "
                              "give output.run_dir=DIR")
        return previous[-1], True
    return root / (prefix + time.strftime("%Y%m%d-%H%M%S")), False


# ---- the lock ---------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    try:  # a killed child that its parent has not reaped yet is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: Path, attempts: int = 20) -> dict | None:
    """The holder written in a lock file; None if it vanished. Retries briefly: a claimant
    writes its details just after creating the file."""
    for _ in range(attempts):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            break
        try:
            info = json.loads(text)
            if isinstance(info, dict) and "pid" in info:
                return info
        except ValueError:
            pass
        time.sleep(0.05)
    return {"pid": None, "host": "?", "since": "?", "command": f"(unreadable lock file {path})"}


def describe_holder(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"


class RunDir:
    """A claimed run directory (see the module docstring). ``path``: the directory;
    ``files()``: the names of the files in it now."""

    def __init__(self, path: Path, kind: str = "fit", resume: bool = False, named: bool = True):
        self.path, self.kind, self.resume, self.named = Path(path), kind, bool(resume), named
        self.product = PRODUCTS.get(kind)
        self.lock_path = self.path / LOCK_NAME
        self.created_dirs: list[Path] = []  # folders this claim created, outermost first
        self.before: set[str] = set()  # entries present before the claim
        self.info: dict | None = None

    # -- claim / release --
    def claim(self) -> "RunDir":
        self._make_dirs()
        try:
            self._lock()
            self.before = {p.name for p in self.path.iterdir()} - {LOCK_NAME}
            if not self.resume:
                self._refuse_existing_run()
        except BaseException:
            self._release_lock()
            self._remove_created_dirs()
            raise
        atexit.register(self.release)
        log.info("run directory: %s", self.path)
        return self

    def release(self, failed: bool = False) -> None:
        """Remove the lock; after a failure first remove what this run created (module docstring)."""
        atexit.unregister(self.release)
        if failed:
            self._clean_failed_run()
        self._release_lock()
        if failed:
            self._remove_created_dirs()

    def __enter__(self) -> "RunDir":
        return self if self.info is not None else self.claim()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release(failed=exc_type is not None)
        return False

    def files(self) -> list[str]:
        """Names of the files now in the directory (sorted; the lock excluded)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and p.name != LOCK_NAME)

    # -- steps --
    def _make_dirs(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run directory {path} is a file, not a directory; set output.run_dir "
                              "to a new or empty directory")
        missing = []
        for parent in path.parents:
            if parent.exists():
                break
            missing.append(parent)
        try:
            for d in reversed(missing):
                d.mkdir(exist_ok=True)
                self.created_dirs.append(d)
            if not (self.named and path.is_dir()):
                self._make_leaf()
        except OSError as e:
            self._remove_created_dirs()
            what = "a file stands in the path" if isinstance(e, (FileExistsError, NotADirectoryError)) \
                else e.strerror or type(e).__name__
            raise RunDirError(f"cannot create run directory {self.path}: {what}; choose a writable "
                              "output.root or output.run_dir") from None

    def _make_leaf(self) -> None:
        """Create the directory; a generated name that is taken gets a suffix -2, -3, ... (mkdir
        is atomic, so two runs started in the same second get different directories)."""
        base, n = self.path, 1
        while True:
            try:
                self.path.mkdir()
                break
            except FileExistsError:
                if self.named:
                    if self.path.is_dir():
                        return  # created meanwhile by someone else: the lock decides
                    raise
                n += 1
                self.path = base.with_name(f"{base.name}-{n}")
        self.lock_path = self.path / LOCK_NAME
        self.created_dirs.append(self.path)

    def _lock(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv) or sys.executable}
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.lock_path)
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.get("host") == info["host"] and isinstance(holder.get("pid"), int) \
                        and not _pid_alive(holder["pid"]):
                    log.warning("run directory %s: taking over the stale lock of %s, which is no longer "
                                "running", self.path, describe_holder(holder))
                    self._remove_stale_lock(holder)
                    continue
                raise RunDirError(f"run directory {self.path} is in use by {describe_holder(holder)}; wait for it "
                                  f"to finish or choose another output.run_dir (if that process is gone, delete "
                                  f"{self.lock_path})") from None
            except OSError as e:
                raise RunDirError(f"cannot write in run directory {self.path}: {e.strerror}; choose a writable "
                                  "output.root or output.run_dir") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self.info = info
            return
        raise RunDirError(f"could not claim run directory {self.path}: its lock file keeps changing")

    def _remove_stale_lock(self, stale: dict) -> None:
        """Move the stale lock aside, then check it was the stale one: a racing claimant may
        have replaced it with its own live lock, which is then put back."""
        aside = self.lock_path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return
        if _read_lock(aside, attempts=1) != stale:
            try:
                os.link(aside, self.lock_path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def _refuse_existing_run(self) -> None:
        if not self.before:
            return
        where = f"output.run_dir={self.path}"
        if self.product and self.product in self.before:
            hint = f"continue its training with train.resume=true {where}, or " if self.kind == "fit" else ""
            raise RunDirError(f"run directory {self.path} already holds a finished run ({self.product}); "
                              f"{hint}choose another output.run_dir (nothing is overwritten)")
        if CHECKPOINT in self.before:
            raise RunDirError(f"run directory {self.path} holds an unfinished run ({CHECKPOINT}); continue it "
                              f"with train.resume=true {where}, or choose another output.run_dir")
        names = sorted(self.before)
        raise RunDirError(f"run directory {self.path} is not empty ({len(names)} "
                          f"{'entry' if len(names) == 1 else 'entries'}, e.g. "
                          f"{', '.join(names[:3])}); choose a new or empty output.run_dir (nothing is overwritten)")

    def _release_lock(self) -> None:
        if self.info is None:
            return
        if _read_lock(self.lock_path, attempts=1) == self.info:
            self.lock_path.unlink(missing_ok=True)
        self.info = None

    def _clean_failed_run(self) -> None:
        if not self.path.is_dir() or (self.product and (self.path / self.product).exists()):
            return
        keep = set(RESUMABLE) if (self.path / CHECKPOINT).exists() else set()
        removed = []
        for p in self.path.iterdir():
            if p.name in self.before or p.name in keep or p.name == LOCK_NAME:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p.name)
        if keep:
            kept = [n for n in RESUMABLE if (self.path / n).exists()]
            log.warning("run failed; kept %s in %s: continue with train.resume=true output.run_dir=%s",
                        " ".join(kept), self.path, self.path)
        elif removed:
            log.info("run failed before producing %s; removed what it wrote in %s: %s",
                     self.product, self.path, " ".join(sorted(removed)))

    def _remove_created_dirs(self) -> None:
        """Remove the folders this claim created, innermost first, if they are empty."""
        for d in reversed(self.created_dirs):
            try:
                d.rmdir()
            except OSError:
                break
        self.created_dirs = [d for d in self.created_dirs if d.exists()]


def claim_run_dir(cfg, kind: str = "fit") -> RunDir:
    """Resolve (``resolve_run_dir``) and claim the run directory of ``cfg``; use as
    ``with claim_run_dir(cfg, "fit") as run: ...`` (released, and cleaned after a failure, on exit)."""
    path, named = resolve_run_dir(cfg, kind)
    return RunDir(path, kind, resume=bool(cfg.train.get("resume")), named=named).claim()
