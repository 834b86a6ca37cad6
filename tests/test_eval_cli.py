"""cot2 eval and cot2 report through the real executable, on two tiny trained runs."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

COT2 = str(Path(sys.executable).with_name("cot2"))
TINY = ["task.seq_length=3", "task.hi=5", "optim.epochs=2", "model=gpt2_1l1h", "model.d_model=16", "device=cpu"]


def cot2(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([COT2, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"cot2 {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    cot2("train", *TINY, "method=discrete", "run.name=tiny", f"paths.outputs={root}")
    cot2("train", *TINY, "method=cot2", "run.name=tiny-cot2", f"paths.outputs={root}")
    return root


def run_dir(outputs: Path, method: str, name: str) -> Path:
    return outputs / "runs" / "mnns" / f"train-{method}" / name


def eval_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def fingerprint(outputs: Path) -> dict[str, str]:
    """Every checkpoint's content hash, and which run directories exist."""
    found = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs.rglob("*.pt") if "runs" in p.parts}
    found.update({str(p.parent): "run" for p in outputs.rglob("config.yaml")})
    return found


def test_eval_discrete_run_is_reproducible_and_leaves_the_run_alone(outputs: Path) -> None:
    run = run_dir(outputs, "discrete", "tiny")
    before = fingerprint(outputs)
    args = ["eval", "run=tiny", "eval.pass_k=[1,2,4]", "eval.n_samples=6", "eval.temperatures=[0.8,1.0]",
            f"paths.outputs={outputs}"]
    proc = cot2(*args)
    assert "pass@k" in proc.stdout and "deterministic accuracy" in proc.stdout
    first = eval_rows(run / "eval.csv")
    cot2(*args)
    second = eval_rows(run / "eval.csv")[len(first):]
    assert second == first  # same seed, same numbers
    assert fingerprint(outputs) == before  # checkpoints untouched, no new run directory

    assert list(first[0]) == ["checkpoint", "split", "metric", "k", "temperature", "K", "step", "value"]
    values = {(r["metric"], r["k"], r["temperature"]): float(r["value"]) for r in first}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval"]["acc"] == pytest.approx(values[("acc", "", "")], abs=1e-5)
    assert summary["eval"]["acc"] == pytest.approx(summary["best_val_acc"])
    for temperature in ("0.8", "1"):
        passes = [values[("pass@k", str(k), temperature)] for k in (1, 2, 4)]
        assert passes == sorted(passes) and all(0 <= p <= 1 for p in passes)
        assert passes[0] == pytest.approx(values[("sample_acc", "", temperature)], abs=1e-5)
        assert values[("maj@k", "1", temperature)] == pytest.approx(passes[0], abs=1e-5)
        assert summary["eval"]["sampling"][f"T={temperature}"]["pass@k"]["4"] == pytest.approx(passes[2], abs=1e-5)
    assert all(r["K"] == "" and r["step"] == "" for r in first)


def test_eval_cot2_run_samples_mts_and_measures_its_continuous_tokens(outputs: Path) -> None:
    run = run_dir(outputs, "cot2", "tiny-cot2")
    proc = cot2("eval", f"run={run}", "checkpoint=last", "eval.mts_K=[1,2]", "eval.temperatures=[1.0]",
                "eval.pass_k=[1,4]", "eval.n_samples=4", "eval.show=2", f"paths.outputs={outputs}")
    assert "reachable states" in proc.stdout
    rows = eval_rows(run / "eval.csv")
    assert {r["checkpoint"] for r in rows} == {"last"}
    assert {(r["metric"], r["k"], r["K"]) for r in rows if r["metric"] == "pass@k"} == {
        ("pass@k", k, K) for k in ("1", "4") for K in ("1", "2")}
    diagnostics = {(r["metric"], r["step"]): float(r["value"]) for r in rows if r["step"]}
    assert {step for _, step in diagnostics} == {"1", "2"}  # m = 3 digits: two continuous steps
    for step in ("1", "2"):
        assert 0 <= diagnostics[("valid_mass", step)] <= 1 + 1e-6
        assert diagnostics[("effective_support", step)] >= 1 - 1e-6
        assert diagnostics[("valid_states_above_threshold", step)] <= diagnostics[("valid_states", step)]
    summary = json.loads((run / "summary.json").read_text())["eval"]
    assert set(summary["sampling"]) == {"K=1,T=1", "K=2,T=1"}
    assert len(summary["diagnostics"]["entropy"]) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["run=tiyn"], "nearest: tiny"),
    (["run=tiny", "eval.pass_k=[1,32]", "eval.n_samples=8"], "eval.n_samples=8 is below the largest eval.pass_k"),
    (["run=tiny", "eval.split=test"], "split 'test'"),
])
def test_eval_bad_input_is_one_line(outputs: Path, args: list[str], message: str) -> None:
    proc = cot2("eval", *args, f"paths.outputs={outputs}", check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_report_over_trained_and_evaluated_runs(outputs: Path) -> None:
    cot2("eval", "run=tiny", "eval.pass_k=[1,2]", "eval.n_samples=2", f"paths.outputs={outputs}")
    cot2("eval", "run=tiny-cot2", "eval.mts_K=[1]", "eval.n_samples=2", "eval.pass_k=[1,2]",
         f"paths.outputs={outputs}")
    proc = cot2("report", str(outputs / "runs"))
    out = outputs / "runs"
    with (out / "report.csv").open(newline="") as f:
        report = list(csv.DictReader(f))
    assert sorted(r["method.name"] for r in report) == ["cot2", "discrete"]
    assert all(r["status"] == "completed" and r["count"] == "1" for r in report)
    assert "method.name" in (out / "report.md").read_text()
    for picture in ("val_acc.png", "pass_at_k.png"):
        assert (out / picture).stat().st_size > 10_000
    assert "best_val_acc" in proc.stdout
