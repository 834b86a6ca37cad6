"""Reliability of `cot2 train`: a killed or signalled run resumes to the numbers of an uninterrupted one,
runs never share a directory, and divergence, an unwritable or full disk and missing data each end in
one line with nothing half-written. Runs are tiny and single-threaded so the file stays fast on 2 cores."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cot2cli import cli, runs, stages
from cot2cli.checkpoints import load_checkpoint
from cot2cli.data import load_dataset
from cot2cli.errors import Cot2Error
from cot2cli.stages import train

COT2 = str(Path(sys.executable).with_name("cot2"))
TINY = ["task.seq_length=3", "task.hi=5", "model=gpt2_1l1h", "model.d_model=16", "device=cpu"]
LONG = [*TINY, "optim.epochs=20"]  # long enough that a signal sent after epoch 1 lands mid-run
SHORT = [*TINY, "optim.epochs=2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch threads spin against each other on a shared 2-core box; one thread is also what subprocesses get."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start(outputs: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [COT2, "train", *args, f"paths.outputs={outputs}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_here(outputs: Path, *args: str) -> int:
    """`cot2 train` in this process (no interpreter start-up); the exit code, 0 when it returned."""
    handlers, argv = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, sys.argv
    stages.started = False
    try:
        cli.run_stage("train", [*args, f"paths.outputs={outputs}"])
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:  # what the stage set for its own process
        sys.argv = argv
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def run_dir(outputs: Path, name: str) -> Path:
    return outputs / "runs" / "mnns" / "train-cot2" / name


def metrics(path: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock column, the one figure allowed to differ."""
    with open(path / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def signal_after_first_checkpoint(outputs: Path, signals: dict[subprocess.Popen, int], timeout: float = 120):
    """Send each process its signal as soon as its run has a checkpoint (written by atomic rename, so
    it is whole); the run directory of each process, found by the pid in its summary.json."""
    where: dict[int, Path] = {}
    pending, deadline = dict(signals), time.monotonic() + timeout
    while pending:
        for proc, signum in list(pending.items()):
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.communicate()}"
            if proc.pid not in where:
                where.update({runs.read_json(p).get("pid"): p.parent for p in outputs.glob("runs/**/summary.json")})
            if proc.pid in where and (where[proc.pid] / "checkpoint.pt").exists():
                proc.send_signal(signum)
                del pending[proc]
        assert time.monotonic() < deadline, f"no checkpoint after {timeout}s"
        time.sleep(0.005)
    return {proc.pid: where[proc.pid] for proc in signals}


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict[str, str]]:
    """metrics.csv of an uninterrupted LONG run, seed 0."""
    outputs = tmp_path_factory.mktemp("reference")
    assert train_here(outputs, *LONG, "run.name=ref") == 0
    return metrics(run_dir(outputs, "ref"))


def test_killed_and_terminated_runs_resume_to_the_uninterrupted_metrics(tmp_path, reference):
    """Two `cot2 train` started together with the same default (timestamp) name: two directories. One is
    killed (-9), the other gets SIGTERM, both after their first checkpoint. The killed one still says
    'running' in its summary but reads as interrupted; the other says interrupted and exits 130. Resumed
    (run.name=<name>, resume=<name>), both end with the metrics of an uninterrupted run of the same seed."""
    killed, terminated = start(tmp_path, *LONG), start(tmp_path, *LONG)
    where = signal_after_first_checkpoint(tmp_path, {killed: signal.SIGKILL, terminated: signal.SIGTERM})
    assert len(set(where.values())) == 2

    assert killed.wait(timeout=120) == -signal.SIGKILL
    run = where[killed.pid]
    assert runs.read_json(run / "summary.json")["status"] == "running"
    assert runs.run_status(run) == "interrupted"
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] >= 1
    assert train_here(tmp_path, *LONG, f"run.name={run.name}") == 0
    assert metrics(run) == reference
    assert runs.run_status(run) == "completed"
    assert not list(run.glob(".*.tmp"))

    _, err = terminated.communicate(timeout=120)
    run = where[terminated.pid]
    assert terminated.returncode == 130, err
    assert one_line(err) == f"interrupted; resume with: cot2 train resume={run}"
    assert runs.run_status(run) == "interrupted"
    load_checkpoint(run / "checkpoint.pt")
    assert train_here(tmp_path, *LONG, f"resume={run.name}") == 0
    assert metrics(run) == reference
    assert len(list((tmp_path / "data").glob("mnns-*"))) == 1


def test_sigint_marks_interrupted_and_resume_finishes(tmp_path, reference, capsys):
    """Ctrl-C, sent to this process once the run has a checkpoint: exit 130, status interrupted, resumable."""
    where = run_dir(tmp_path, "ctrl-c")
    late: list[int] = []
    pytest_handler = signal.signal(signal.SIGINT, lambda signum, frame: late.append(signum))  # not pytest's, if late

    def interrupt_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not (where / "checkpoint.pt").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint)
    watcher.start()
    try:
        code = train_here(tmp_path, *LONG, "run.name=ctrl-c")
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, pytest_handler)
    assert code == 130 and not late
    assert runs.run_status(where) == "interrupted"
    assert "resume with" in one_line(capsys.readouterr().err)
    assert train_here(tmp_path, *LONG, "run.name=ctrl-c") == 0
    assert metrics(where) == reference


def together(n: int, fn):
    """Call fn() from n threads released at once; each result, or the exception it raised."""
    barrier, results = threading.Barrier(n), [None] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:  # collected, judged by the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_cfg(outputs: Path, name: str | None):
    return OmegaConf.create({"stage": "train", "seed": 0, "task": {"name": "mnns"}, "method": {"name": "cot2"},
                             "run": {"name": name}, "paths": {"outputs": str(outputs)}})


def test_open_run_from_many_threads_claims_distinct_directories(tmp_path):
    opened = together(8, lambda: runs.open_run(run_cfg(tmp_path, "same")))
    dirs = [r.dir for r in opened]
    assert len(set(dirs)) == 8
    assert {d.name for d in dirs} == {"same", *(f"same-{i}" for i in range(1, 8))}
    for d in dirs:
        assert runs.read_json(d / "summary.json")["status"] == "running"
        assert (d / "config.yaml").exists()


def test_two_resumes_of_one_run_one_wins(tmp_path):
    cfg = run_cfg(tmp_path, "r")
    first = runs.open_run(cfg)
    first.finish("interrupted")
    first.lock.close()
    outcomes = together(4, lambda: runs.open_run(cfg, resume=first.dir))
    won = [o for o in outcomes if isinstance(o, runs.Run)]
    lost = [o for o in outcomes if not isinstance(o, runs.Run)]
    assert len(won) == 1 and len(lost) == 3
    assert all(isinstance(e, Cot2Error) and "being written by another process" in str(e) for e in lost)


def test_concurrent_runs_build_their_dataset_once(tmp_path, monkeypatch):
    from tasks.mnns import MNNS

    builds = []
    real_build = MNNS.build
    monkeypatch.setattr(MNNS, "build", lambda self: builds.append(1) or real_build(self))
    task = OmegaConf.create({"name": "mnns", "lo": 1, "hi": 5, "seq_length": 3, "max_instances": 1000,
                             "val_fraction": 0.2, "seed": 0})
    loaded = together(4, lambda: load_dataset(task, tmp_path))
    assert len(builds) == 1
    assert sorted(d.generated for d in loaded) == [False, False, False, True]
    assert len({d.dir for d in loaded}) == 1
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name != ".lock"] == [loaded[0].dir.name]


@pytest.mark.parametrize("where", ["train loss", "validation loss"])
def test_nan_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, where):
    """NaN from epoch 2 on (injected): the run fails in one line, epoch 1's checkpoint stays whole."""
    if where == "train loss":
        real = train.method_loss

        def poisoned(model, method, batch, epoch):
            loss = real(model, method, batch, epoch)
            loss.total = loss.total * float("nan") if epoch >= 1 else loss.total
            return loss

        monkeypatch.setattr(train, "method_loss", poisoned)
    else:
        real = train.validation_loss
        monkeypatch.setattr(train, "validation_loss", lambda m, me, v, epoch, bs: real(m, me, v, epoch, bs)
                            if epoch < 1 else float("nan"))
    assert train_here(tmp_path, *TINY, "optim.epochs=3", "run.name=nan") == 1
    message = one_line(capsys.readouterr().err)
    assert "nan" in message and "epoch 2" in message and "last good checkpoint kept" in message
    where_ = run_dir(tmp_path, "nan")
    summary = runs.read_json(where_ / "summary.json")
    assert summary["status"] == "failed" and "nan" in summary["error"]
    assert load_checkpoint(where_ / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in metrics(where_)] == ["1"]


def test_huge_learning_rate_diverges_into_a_failed_run(tmp_path, capsys):
    assert train_here(tmp_path, *SHORT, "optim.lr=1e30", "optim.grad_clip=0", "run.name=boom") == 1
    assert "loss is nan" in one_line(capsys.readouterr().err)
    assert runs.run_status(run_dir(tmp_path, "boom")) == "failed"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("optim.lr=-1", "optim.lr=-1.0 is out of range: must be positive"),
        ("optim.batch_size=0", "optim.batch_size=0 is out of range: must be at least 1"),
        ("optim.beta2=1.0", "optim.beta2=1.0 is out of range: must be in [0, 1)"),
        ("model.head_dim=0", "model: head_dim=0 must be at least 1"),
    ],
)
def test_bad_model_or_optimiser_setting_is_one_line_and_no_run(tmp_path, capsys, setting, message):
    assert train_here(tmp_path, *SHORT, setting) == 2  # bad input
    assert one_line(capsys.readouterr().err) == f"error: {message}"
    assert not (tmp_path / "runs").exists()


def test_unwritable_outputs_one_line_nothing_written(tmp_path, capsys):
    """paths.outputs below a regular file cannot be created, even by root."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n")
    assert train_here(blocker / "out", *SHORT) == 1
    assert one_line(capsys.readouterr().err) == f"error: Not a directory: {blocker / 'out' / 'data'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_full_disk_one_line_and_the_checkpoint_stays_whole(tmp_path, monkeypatch, capsys):
    """The disk fills while epoch 2's checkpoint is written: one line, exit 1, epoch 1's checkpoint intact."""
    real_fsync, checkpoints = os.fsync, []

    def fsync(fd: int) -> None:
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoints.append(fd)
            if len(checkpoints) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train_here(tmp_path, *TINY, "optim.epochs=3", "run.name=full") == 1
    assert one_line(capsys.readouterr().err) == "error: No space left on device"
    where = run_dir(tmp_path, "full")
    assert runs.run_status(where) == "failed"
    assert load_checkpoint(where / "checkpoint.pt")["epoch"] == 1
    assert not list(where.glob(".*.tmp"))


def test_missing_dataset_is_one_line(tmp_path):
    task = OmegaConf.create({"name": "mnns", "lo": 1, "hi": 5, "seq_length": 3, "max_instances": 1000,
                             "val_fraction": 0.2, "seed": 0})
    with pytest.raises(Cot2Error) as caught:
        load_dataset(task, tmp_path, generate=False)
    assert "\n" not in str(caught.value) and "cot2 generate" in str(caught.value)
    assert not (tmp_path / "data").exists()


def test_damaged_dataset_is_one_line_and_no_run(tmp_path, capsys):
    assert train_here(tmp_path, *SHORT, "run.name=first") == 0
    (data,) = (tmp_path / "data").glob("mnns-*/data.pt")
    data.write_bytes(data.read_bytes()[:100])
    capsys.readouterr()
    assert train_here(tmp_path, *SHORT, "run.name=second") == 2
    assert one_line(capsys.readouterr().err).startswith(f"error: cannot read dataset {data}")
    assert not run_dir(tmp_path, "second").exists()


def test_dataset_with_another_vocabulary_is_refused(tmp_path):
    """A dataset written under an older prompt layout must not be read with today's token ids."""
    task = OmegaConf.create({"name": "mnns", "lo": 1, "hi": 5, "seq_length": 3, "max_instances": 1000,
                             "val_fraction": 0.2, "seed": 0})
    written = load_dataset(task, tmp_path)
    saved = torch.load(written.dir / "data.pt", weights_only=True)
    torch.save({**saved, "vocab": saved["vocab"] + ["|"]}, written.dir / "data.pt")
    with pytest.raises(Cot2Error) as caught:
        load_dataset(task, tmp_path, generate=False)
    message = str(caught.value)
    assert "\n" not in message and "another vocabulary" in message and str(written.dir) in message
