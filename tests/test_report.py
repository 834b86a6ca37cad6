import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cot2cli.stages.evaluate import EVAL_COLUMNS
from cot2cli.stages.report import build_report


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_run(root: Path, name: str, *, d_model: int, budget: int, seed: int, status: str, best: float | None,
              pid: int | None = None, extra_config: dict | None = None, metrics: dict | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"stage": "train", "task": {"name": "mnns", "seq_length": 4},
              "model": {"n_layer": 1, "d_model": d_model}, "method": {"name": "cot2", "budget": budget},
              "optim": {"epochs": 3}, "seed": seed, "device": "auto", "run": {"name": name},
              "paths": {"outputs": str(root)}, "resume": None, **(extra_config or {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"status": status, "seed": seed, "pid": pid or 1, "host": socket.gethostname(), "epochs": 3}
    if best is not None:
        summary.update(best_val_acc=best, final_val_acc=best - 0.05)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rows = metrics or {"epoch": [1, 2, 3], "val_acc": [best / 3, best / 2, best] if best else [0.1, 0.1, 0.1]}
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 x 2 settings with two completed seeds each, plus a failed, a dead 'running' and a live running run."""
    root = tmp_path / "sweep"
    scores = {(16, 1): (0.5, 0.7), (16, 4): (0.6, 0.6), (32, 1): (0.8, 0.9), (32, 4): (0.95, 0.85)}
    n = 0
    for (d_model, budget), values in scores.items():
        for seed, best in enumerate(values):
            write_run(root, str(n), d_model=d_model, budget=budget, seed=seed, status="completed", best=best)
            n += 1
    write_run(root, "failed", d_model=32, budget=4, seed=2, status="failed", best=None)
    write_run(root, "dead", d_model=16, budget=1, seed=2, status="running", best=0.2, pid=dead_pid())
    write_run(root, "live", d_model=16, budget=4, seed=2, status="running", best=0.3, pid=os.getpid())
    return root


def row(report: pd.DataFrame, d_model: int, budget: int, status: str) -> pd.Series:
    match = report[(report["model.d_model"] == d_model) & (report["method.budget"] == budget)
                   & (report["status"] == status)]
    assert len(match) == 1, report
    return match.iloc[0]


def test_report_aggregates_seeds_and_keeps_unfinished_runs_apart(sweep: Path, tmp_path: Path) -> None:
    out = build_report([str(sweep)], by=None, metric="best_val_acc", out=tmp_path / "report")
    report = pd.read_csv(out / "report.csv")
    assert list(report.columns[:3]) == ["method.budget", "model.d_model", "status"]  # in config order

    completed = row(report, 16, 1, "completed")
    assert completed["best_val_acc_mean"] == pytest.approx(0.6)
    assert completed["best_val_acc_std"] == pytest.approx(0.1414213562, rel=1e-6)
    assert completed["count"] == 2
    assert completed["seeds"] == "0,1"
    assert row(report, 32, 4, "completed")["best_val_acc_mean"] == pytest.approx(0.9)
    assert row(report, 16, 4, "completed")["best_val_acc_std"] == pytest.approx(0.0)

    interrupted = row(report, 16, 1, "interrupted")  # 'running' but its process is gone
    assert interrupted["count"] == 1 and interrupted["best_val_acc_mean"] == pytest.approx(0.2)
    assert row(report, 16, 4, "running")["count"] == 1
    failed = row(report, 32, 4, "failed")
    assert failed["count"] == 1 and pd.isna(failed["best_val_acc_mean"])
    assert len(report) == 7 and report["count"].sum() == 11

    runs = pd.read_csv(out / "runs.csv")
    assert dict(zip(runs["run"], runs["status"], strict=True))["dead"] == "interrupted"
    markdown = (out / "report.md").read_text()
    assert "| method.budget | model.d_model | status |" in markdown and "![val_acc](val_acc.png)" in markdown
    for picture in ("val_acc.png", "accuracy_by_d_budget.png"):
        assert (out / picture).stat().st_size > 10_000


def test_report_groups_by_chosen_keys_and_metric(sweep: Path, tmp_path: Path) -> None:
    out = build_report([str(sweep / "*")], by="model.d_model", metric="final_val_acc", out=tmp_path / "by_d")
    report = pd.read_csv(out / "report.csv")
    assert list(report.columns[:2]) == ["model.d_model", "status"]
    d32 = report[(report["model.d_model"] == 32) & (report["status"] == "completed")].iloc[0]
    assert d32["count"] == 4
    assert d32["final_val_acc_mean"] == pytest.approx((0.8 + 0.9 + 0.95 + 0.85) / 4 - 0.05)


def test_report_draws_pass_at_k_and_rl_figures(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    discrete = write_run(root, "discrete", d_model=24, budget=1, seed=0, status="completed", best=0.4,
                         extra_config={"method": {"name": "discrete", "budget": None}})
    cot2 = write_run(root, "cot2", d_model=24, budget=1, seed=0, status="completed", best=0.88)
    rows = [{"checkpoint": "best", "split": "valid", "metric": "acc", "value": 0.4}]
    rows += [{"checkpoint": "best", "split": "valid", "metric": "pass@k", "k": k, "temperature": t,
              "value": min(1.0, 0.3 * k**0.5)} for t in (0.8, 1.0) for k in (1, 2, 4, 8, 16)]
    pd.DataFrame(rows).reindex(columns=EVAL_COLUMNS).to_csv(discrete / "eval.csv", index=False)
    pd.DataFrame([{"checkpoint": "best", "split": "valid", "metric": "acc", "value": 0.88}]).reindex(
        columns=EVAL_COLUMNS).to_csv(cot2 / "eval.csv", index=False)
    write_run(root, "rl", d_model=24, budget=1, seed=0, status="completed", best=0.9,
              extra_config={"stage": "rl", "rl": {"name": "mts", "K": 3}},
              metrics={"epoch": [1, 2], "reward": [0.5, 0.6], "val_acc": [0.88, 0.9], "val_sampled_acc": [0.7, 0.8]})
    out = build_report([str(root)], by=None, metric="best_val_acc", out=None)
    assert out == root
    for picture in ("val_acc.png", "pass_at_k.png", "rl.png"):
        assert (out / picture).stat().st_size > 10_000
    assert not (out / "accuracy_by_d_budget.png").exists()


def test_report_cli_errors_are_one_line(sweep: Path, tmp_path: Path, cot2) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (([str(empty)], "no runs found"), ([str(tmp_path / "nope")], "does not exist"),
                          ([str(sweep), "--by", "model.width"], "keys that vary: method.budget, model.d_model"),
                          ([str(sweep), "--metric", "accuracy"], "not a figure")):
        proc = cot2("report", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
