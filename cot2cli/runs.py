"""The outputs tree: where runs live, how they are claimed, found, resumed and written safely.

A run directory holds config.yaml (resolved), summary.json (status + final figures),
metrics.csv and checkpoints. Writes go to a temporary file first and are renamed into
place, so a kill never leaves a half-written file. A directory is claimed by creating its
summary.json exclusively, so two processes never share one.
"""

from __future__ import annotations

import csv
import difflib
import fcntl
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from cot2cli import __version__
from cot2cli.errors import Cot2Error

STATUSES = ("running", "completed", "failed", "interrupted")
CHECKPOINT_FILES = {"best": "best.pt", "last": "checkpoint.pt"}  # checkpoint=best|last -> its file in a run dir


# -- atomic files ------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


# -- metrics -----------------------------------------------------------------------------
class MetricsLog:
    """metrics.csv with fixed columns, one row per epoch, flushed as it goes."""

    def __init__(self, path: Path, columns: Iterable[str]):
        self.path, self.columns = Path(path), list(columns)

    def append(self, row: dict[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows with one open of the file (the header first if the file is new)."""
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
            if new:
                writer.writeheader()
            writer.writerows({c: _fmt(row.get(c)) for c in self.columns} for row in rows)

    def keep_until(self, epoch: int) -> None:
        """Drop rows past the last checkpoint, so a resumed run continues the file exactly."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epoch]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, out.getvalue())


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


# -- run directories ---------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path) -> str:
    """The status in summary.json, except that a 'running' run whose process is gone is 'interrupted'."""
    return status_of(read_json(Path(run_dir) / "summary.json"))


def status_of(summary: dict[str, Any]) -> str:
    """`run_status` of a summary already read."""
    status = summary.get("status", "interrupted")
    if status == "running" and summary.get("host") == socket.gethostname():
        if not pid_alive(int(summary.get("pid", -1))):
            return "interrupted"
    return status


@dataclass
class Run:
    dir: Path
    resumed: bool
    lock: IO[str] | None = None  # held while this process writes the run

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def update(self, **fields: Any) -> dict[str, Any]:
        summary = read_json(self.summary_path)
        summary.update(fields)
        write_json(self.summary_path, summary)
        return summary

    def finish(self, status: str, **fields: Any) -> dict[str, Any]:
        assert status in STATUSES
        return self.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **fields)


def in_sweep() -> bool:
    """Running as one job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def default_run_dir(cfg: DictConfig) -> Path:
    """outputs/runs/<task>/<stage>-<method or rl sampler>/<name>, or Hydra's job folder inside a sweep."""
    from hydra.core.hydra_config import HydraConfig

    if in_sweep():
        return Path(HydraConfig.get().runtime.output_dir)
    kind = cfg.rl.name if "rl" in cfg else cfg.method.name if "method" in cfg else None
    label = cfg.stage if kind is None else f"{cfg.stage}-{kind}"
    name = cfg.run.name or time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path(cfg.paths.outputs) / "runs" / cfg.task.name / label / name


def _claim(run_dir: Path, summary: dict[str, Any]) -> bool:
    """Create summary.json unless it exists. It is linked into place complete: a process that finds
    the name taken reads a 'running' summary, never an empty file it would take for a dead run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".summary.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        os.link(tmp, run_dir / "summary.json")
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def try_lock(run_dir: Path) -> IO[str] | None:
    """run_dir/.lock, held until the returned file is closed; None while another process holds it."""
    f = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _lock(run_dir: Path) -> IO[str]:
    """Hold run_dir/.lock until this process ends, so two processes resuming one run cannot both write it."""
    f = try_lock(run_dir)
    if f is None:
        raise Cot2Error(f"run {run_dir} is being written by another process; wait for it or stop it first")
    return f


def check_resumable(target: Path) -> None:
    summary = read_json(target / "summary.json")
    status = status_of(summary)
    if status == "completed":
        raise Cot2Error(f"run {target} already completed; pick a new run.name to train again")
    if status == "running":
        pid = summary.get("pid")
        raise Cot2Error(f"run {target} is still running (pid {pid}); wait for it or stop it first")


def resume_target(cfg: DictConfig) -> Path | None:
    """The run to continue: resume=<run>, or an explicit run.name that already exists; checked resumable."""
    target = None
    if cfg.get("resume"):
        target = find_run(cfg.resume, cfg.paths.outputs)
    elif cfg.run.name:
        named = default_run_dir(cfg)
        target = named if (named / "summary.json").exists() else None
    if target is not None:
        check_resumable(target)
    return target


def open_run(cfg: DictConfig, resume: Path | None = None) -> Run:
    """Reopen `resume`, or claim a fresh run directory (name-1, name-2, ... if another process has it)."""
    summary = {
        "status": "running",
        "stage": cfg.stage,
        "seed": cfg.get("seed"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cot2_version": __version__,
    }
    if resume is not None:
        lock = _lock(resume)
        check_resumable(resume)  # again under the lock: another process may have finished it meanwhile
        for stale in resume.glob(".*.tmp"):  # what a killed writer left; the files it was replacing are whole
            stale.unlink()
        run = Run(resume, resumed=True, lock=lock)
        run.update(**summary)
        return run
    run_dir = default_run_dir(cfg)
    candidate, n = run_dir, 0
    while not _claim(candidate, summary):
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}-{n}")
    lock = _lock(candidate)
    save_config(candidate, cfg)
    return Run(candidate, resumed=False, lock=lock)


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    """config.yaml: the full resolved config, enough to rebuild the run; plus the command-line overrides."""
    from hydra.core.hydra_config import HydraConfig

    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        atomic_write(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))


def load_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise Cot2Error(f"{run_dir} is not a cot2 run: it has no config.yaml")
    return OmegaConf.load(path)


def list_runs(outputs: str | Path) -> list[Path]:
    root = Path(outputs)
    return sorted(p.parent for sub in ("runs", "sweeps") for p in (root / sub).glob("**/config.yaml"))


def find_run(name_or_path: str, outputs: str | Path) -> Path:
    """A run by path, or by its last path components (a name, or e.g. train-cot2/<name>) under
    outputs/runs and outputs/sweeps; whole components only, so `disc` does not match `fromdisc`."""
    path = Path(str(name_or_path))
    if (path / "config.yaml").exists():
        return path
    runs = list_runs(outputs)
    matches = [r for r in runs if r.parts[-len(path.parts) :] == path.parts]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        shown = ", ".join(str(m) for m in matches[:5])
        raise Cot2Error(f"run {name_or_path!r} is ambiguous: {len(matches)} runs match ({shown}); give a path")
    names = sorted({r.name for r in runs} | {str(r) for r in runs})
    near = difflib.get_close_matches(str(name_or_path), names, n=3, cutoff=0.3)
    hint = f"; nearest: {', '.join(near)}" if near else f"; no runs under {outputs}/runs"
    raise Cot2Error(f"no run named {name_or_path!r}{hint}")
