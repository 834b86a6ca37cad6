"""`cot2 train -m` through the launchers of the `sweep` extra: joblib (parallel local processes) and
submitit_local (each job its own process through submitit, as on SLURM). Each job's run directory is
outputs/sweeps/<time>/<job number>/, complete, inside its sweep directory; the dataset is built once."""

from __future__ import annotations

import csv
import os
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from joblib.externals.loky import reusable_executor

from cot2cli import cli, runs, stages
from cot2cli.checkpoints import load_checkpoint

# cot2's launcher files complete the plugins' schemas of the same name on purpose (see cot2cli.stages).
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema")

TINY = ["task.seq_length=3", "task.hi=5", "optim.epochs=2", "model=gpt2_1l1h", "model.d_model=16", "device=cpu"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Sweeps run with this process as the launcher's parent (the jobs are processes of their own): one torch
    thread per job, inherited; the CLI's global state put back afterwards."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(stages, "started", False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def check_complete_jobs(outputs: Path, sweep_dir: Path) -> list[dict]:
    """Both jobs completed, each in sweep_dir/<job number>/ with config, summary, metrics and checkpoint."""
    assert (sweep_dir / "multirun.yaml").exists()
    assert runs.list_runs(outputs) == [sweep_dir / "0", sweep_dir / "1"]
    summaries = []
    for job, seed in (("0", 0), ("1", 1)):
        run = sweep_dir / job
        summary = runs.read_json(run / "summary.json")
        assert summary["status"] == "completed" and summary["seed"] == seed
        assert runs.load_config(run).seed == seed
        with open(run / "metrics.csv", newline="") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
        summaries.append(summary)
    assert len(list((outputs / "data").glob("mnns-*"))) == 1
    assert not list((outputs / "data").glob(".mnns-*"))  # no half-built copy left by a second builder
    return summaries


def test_joblib_sweep_runs_jobs_in_parallel_processes(tmp_path):
    cli.run_stage("train", ["-m", "seed=0,1", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                            f"paths.outputs={tmp_path}"])
    # joblib keeps its worker processes for the next sweep of this process; this test's are done
    reusable_executor._executor.shutdown(wait=True, kill_workers=True)
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    summaries = check_complete_jobs(tmp_path, sweep_dir)
    assert len({s["pid"] for s in summaries} - {os.getpid()}) == 2


def test_submitit_local_sweep_runs_each_job_through_submitit(tmp_path):
    cli.run_stage("train", ["-m", "seed=0,1", *TINY, "hydra/launcher=submitit_local", f"paths.outputs={tmp_path}"])
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    summaries = check_complete_jobs(tmp_path, sweep_dir)
    assert len({s["pid"] for s in summaries} - {os.getpid()}) == 2
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit's own record of each job


def test_a_failing_job_leaves_the_others_to_finish(tmp_path, capsys):
    """Job 0 has bad input; job 1 still runs to completion and the sweep exits non-zero (Hydra's own
    in-process launcher, where a job's exit used to end the whole sweep)."""
    with pytest.raises(SystemExit) as exited:
        cli.run_stage("train", ["-m", "method.budget=99,2", *TINY, f"paths.outputs={tmp_path}"])
    assert exited.value.code != 0
    assert "error: budget B=99 is out of range" in capsys.readouterr().err
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    assert not (sweep_dir / "0" / "summary.json").exists()
    assert runs.run_status(sweep_dir / "1") == "completed"


def test_sweep_extra_pins_match_this_hydra():
    """cot2[sweep] pins the 1.2 launcher plugins, the ones released for hydra-core 1.3."""
    assert version("hydra-core").startswith("1.3.")
    assert version("hydra-joblib-launcher").startswith("1.2.")
    assert version("hydra-submitit-launcher").startswith("1.2.")


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm"])
def test_launcher_plugins_build_cot2s_launchers(launcher):
    """The pinned plugins load under hydra-core 1.3 and build a launcher from cot2's settings."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from cot2cli.config import register_configs

    register_configs()
    with initialize_config_module(config_module="cot2cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert type(instantiate(cfg.hydra.launcher)).__module__.startswith("hydra_plugins.")
