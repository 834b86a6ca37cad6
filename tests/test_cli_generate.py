"""`cot2` through the real executable: help, generate, bad input, sweeps."""

from __future__ import annotations

import json

import pytest


def files_under(path):
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_help_lists_the_stages(cot2):
    out = cot2("--help").stdout
    for command in ("generate", "train"):
        assert command in out


def test_generate_writes_dataset_and_reuses_it(cot2):
    first = cot2("generate", "task.seq_length=3", "task.hi=5")
    assert "generated" in first.stdout and "instances" in first.stdout
    (data_dir,) = (cot2.outputs / "data").glob("mnns-*")
    assert {p.name for p in data_dir.iterdir()} == {"data.pt", "instances.jsonl", "task.yaml", "stats.json"}
    rows = [json.loads(line) for line in (data_dir / "instances.jsonl").read_text().splitlines()]
    assert len(rows) == 125 and set(rows[0]) == {"digits", "answer", "trace", "split"}
    again = cot2("generate", "task.seq_length=3", "task.hi=5")
    assert "already there" in again.stdout
    assert len(list((cot2.outputs / "data").glob("mnns-*"))) == 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("task.lo=7", "task.lo=7 > task.hi=5"),
        ("task.lo=-2", "task.lo=-2"),
        ("task.seq_length=0", "task.seq_length=0"),
        ("task=nosuchtask", "unknown task 'nosuchtask'"),
        ("task.seq_length=abc", "task.seq_length"),
        ("task.nokey=1", "nokey"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(cot2, override, fragment):
    proc = cot2("generate", "task.hi=5", override, check=False)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert files_under(cot2.outputs) == []


def test_bad_budget_in_train_exits_2_without_a_run(cot2):
    proc = cot2("train", "task.seq_length=3", "task.hi=5", "method.budget=9", check=False)
    assert proc.returncode == 2 and "budget B=9" in proc.stderr and "1..8" in proc.stderr
    assert not (cot2.outputs / "runs").exists()


def test_multirun_makes_one_dataset_per_value(cot2):
    cot2("generate", "-m", "task.seq_length=2,3", "task.hi=4")
    assert len(list((cot2.outputs / "data").glob("mnns-*"))) == 2
    (sweep,) = (cot2.outputs / "sweeps").iterdir()
    assert (sweep / "multirun.yaml").exists()


def test_hydra_flags_pass_through(cot2):
    job = cot2("generate", "task.hi=4", "--cfg", "job").stdout
    assert "hi: 4" in job and "seq_length: 4" in job
    helped = cot2("train", "--help").stdout
    assert "task: mnns" in helped and "method:" in helped
