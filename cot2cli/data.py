"""Datasets on disk: outputs/data/<task>-<hash>/, found again by the task config, generated once.

A dataset directory holds data.pt (the tensors every stage reads), instances.jsonl (one
readable row per instance), task.yaml (the config it came from) and stats.json. It is
built in a temporary folder and renamed into place under a lock, so concurrent runs that
need the same data generate it once and never see a half-written copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cot2cli.errors import Cot2Error
from cot2cli.runs import write_json
from tasks import Task, TaskData, get_task


@dataclass
class Dataset:
    task: Task
    data: TaskData
    dir: Path
    generated: bool


def task_fingerprint(task: Task) -> str:
    """Short hash of everything that determines the data: the resolved task config (and source files)."""
    blob = json.dumps(task.fingerprint(), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def dataset_dir(task: Task, outputs: str | Path) -> Path:
    return Path(outputs) / "data" / f"{task.name}-{task_fingerprint(task)}"


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_dataset(task_cfg: DictConfig, outputs: str | Path, generate: bool = True) -> Dataset:
    """The dataset of this task config: read it if it exists, else build and write it (when `generate`)."""
    task = get_task(task_cfg)
    target = dataset_dir(task, outputs)
    if (target / "data.pt").exists():
        return Dataset(task, _read(target, task), target, generated=False)
    if not generate:
        raise Cot2Error(f"no dataset at {target}; run `cot2 generate` with the same task settings")
    with _lock(target.parent / ".lock"):  # built under the lock: concurrent runs wait, then read it
        if (target / "data.pt").exists():
            return Dataset(task, _read(target, task), target, generated=False)
        data = task.build()  # validation errors surface here, before the dataset is written
        _write(task, data, target)
    return Dataset(task, data, target, generated=True)


def _read(target: Path, task: Task) -> TaskData:
    try:
        data = TaskData.from_tensors(torch.load(target / "data.pt", weights_only=True))
    except Exception as exc:  # a foreign or damaged file is bad input, not a crash
        raise Cot2Error(f"cannot read dataset {target / 'data.pt'}: {exc}") from exc
    if data.vocab != task.vocab:  # step targets index the task's vocabulary: a stale layout would misalign them
        raise Cot2Error(f"dataset {target} has another vocabulary than task {task.name} now uses; "
                        "delete it and run `cot2 generate` again")
    return data


def _write(task: Task, data: TaskData, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        torch.save(data.tensors(), tmp / "data.pt")
        with open(tmp / "instances.jsonl", "w") as f:
            for rec in data.records:
                f.write(json.dumps(rec) + "\n")
        (tmp / "task.yaml").write_text(OmegaConf.to_yaml(task.cfg, resolve=True))
        write_json(tmp / "stats.json", task.statistics(data))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
