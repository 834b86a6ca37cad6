"""`cot2 rl` through the real command line, from a tiny `cot2 train` run."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

COT2 = Path(sys.executable).with_name("cot2")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BASE_RUN = ("task.seq_length=3", "task.hi=5", "optim.epochs=2", "model=gpt2_1l1h", "model.d_model=16", "run.name=base")
FAST_RL = ("rl.epochs=1", "rl.prompts_per_epoch=48")


def cot2(outputs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(COT2), *args, f"paths.outputs={outputs}"], capture_output=True, text=True, env=ENV,
                          timeout=300)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    done = cot2(root, "train", *BASE_RUN)
    assert done.returncode == 0, done.stderr
    return root


@pytest.mark.parametrize("sampler", ["mts", "dirichlet"])
def test_rl_writes_a_completed_run(outputs: Path, sampler: str) -> None:
    done = cot2(outputs, "rl", "init_from=base", f"rl={sampler}", *FAST_RL, "run.name=tiny")
    assert done.returncode == 0, done.stderr
    run_dir = outputs / "runs" / "mnns" / f"rl-{sampler}" / "tiny"
    assert {"config.yaml", "metrics.csv", "summary.json", "checkpoint.pt", "best.pt"} <= {
        p.name for p in run_dir.iterdir()
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stage"] == "rl" and summary["epochs"] == 1
    assert Path(summary["init_from"]) == outputs / "runs" / "mnns" / "train-cot2" / "base"
    for key in ("start_val_acc", "best_val_acc", "final_val_acc"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["train_seconds"] > 0
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[0]["val_acc"]) == summary["start_val_acc"]
    assert float(rows[1]["val_acc"]) == pytest.approx(summary["final_val_acc"], abs=1e-6)
    assert {"reward", "val_sampled_acc", "entropy_step1", "entropy_step2", "kl_start", "clip_frac"} <= set(rows[0])
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.rl.name == sampler and config.method.name == "cot2" and config.task.seq_length == 3
    again = cot2(outputs, "rl", "init_from=base", f"rl={sampler}", *FAST_RL, "run.name=tiny")
    assert again.returncode == 2 and "already completed" in again.stderr


def test_resume_continues_to_the_same_numbers(outputs: Path) -> None:
    straight = cot2(outputs, "rl", "init_from=base", "rl.epochs=2", "rl.prompts_per_epoch=48", "run.name=straight")
    assert straight.returncode == 0, straight.stderr
    halted = cot2(outputs, "rl", "init_from=base", "rl.epochs=1", "rl.prompts_per_epoch=48", "run.name=halted")
    assert halted.returncode == 0, halted.stderr
    # Pretend the run was stopped after its first epoch of two.
    run_dir = outputs / "runs" / "mnns" / "rl-mts" / "halted"
    config = OmegaConf.load(run_dir / "config.yaml")
    config.rl.epochs = 2
    OmegaConf.save(config, run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    resumed = cot2(outputs, "rl", "resume=halted")
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir) == [
        {**row, "seconds": got["seconds"]}
        for row, got in zip(read_metrics(run_dir.with_name("straight")), read_metrics(run_dir), strict=True)
    ]


def make_broken_run(outputs: Path, name: str, breakage: str) -> None:
    """A copy of the base run with one thing wrong."""
    source = outputs / "runs" / "mnns" / "train-cot2" / "base"
    run_dir = source.with_name(name)
    shutil.copytree(source, run_dir)
    if breakage == "nocot":
        config = OmegaConf.load(run_dir / "config.yaml")
        config.method.name = "nocot"
        OmegaConf.save(config, run_dir / "config.yaml")
    elif breakage == "unfinished":
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    elif breakage == "no_checkpoint":
        (run_dir / "best.pt").unlink()
    elif breakage == "vocabulary":
        state = torch.load(run_dir / "best.pt", weights_only=False)
        state["vocab"] = [*state["vocab"][:-1], "S99"]
        torch.save(state, run_dir / "best.pt")


@pytest.mark.parametrize(
    ("init_from", "breakage", "message"),
    [
        ("bsae", None, "nearest: base"),
        (None, None, "init_from is required"),
        ("broken-nocot", "nocot", "method=nocot"),
        ("broken-unfinished", "unfinished", "is failed, not completed"),
        ("broken-no_checkpoint", "no_checkpoint", "has no best.pt"),
        ("broken-vocabulary", "vocabulary", "only in the checkpoint: S99; only in the dataset: S15"),
    ],
)
def test_bad_init_from_exits_2_and_writes_nothing(
    outputs: Path, init_from: str | None, breakage: str | None, message: str
) -> None:
    if breakage is not None:
        make_broken_run(outputs, init_from, breakage)
    before = files_under(outputs)
    args = [] if init_from is None else [f"init_from={init_from}"]
    done = cot2(outputs, "rl", *args, *FAST_RL, "run.name=never")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert files_under(outputs) == before
