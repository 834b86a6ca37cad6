"""The cluster path on a real SLURM: `cot2 train -m seed=0,1 hydra/launcher=submitit_slurm` through sbatch.
Opt-in (marker `slurm`, not in `make test`): `make test-slurm` starts a one-node cluster
(tests/slurm_cluster.sh), runs this file against it and stops the cluster again."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cot2cli import runs

pytestmark = pytest.mark.slurm

COT2 = str(Path(sys.executable).with_name("cot2"))
TINY = ["task.seq_length=3", "task.hi=5", "optim.epochs=2", "model=gpt2_1l1h", "model.d_model=16", "device=cpu"]


@pytest.fixture(scope="module")
def partition() -> str:
    """The test cluster's partition; skip where no SLURM answers."""
    if not os.environ.get("SLURM_CONF"):
        pytest.skip("no SLURM_CONF: run `make test-slurm`, which starts a one-node cluster")
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"sinfo failed: {proc.stderr.strip()}")
    return os.environ.get("SLURM_TEST_PARTITION") or proc.stdout.split()[0].rstrip("*")


def test_submitit_slurm_sweep_completes_both_jobs(tmp_path, partition):
    resources = [f"hydra.launcher.partition={partition}", "hydra.launcher.gpus_per_node=0",
                 "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
    cmd = [COT2, "train", "-m", "seed=0,1", "hydra/launcher=submitit_slurm", *resources, *TINY,
           f"paths.outputs={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep,) = (tmp_path / "sweeps").iterdir()
    for job in (0, 1):
        run = sweep / str(job)
        summary = runs.read_json(run / "summary.json")
        assert summary["status"] == "completed" and summary["seed"] == job, summary
        assert (run / "config.yaml").exists() and (run / "checkpoint.pt").exists()
        with open(run / "metrics.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == 2
    # one SLURM array job, one task per sweep job: submitit keeps each task's logs as <array id>_<task>/
    tasks = sorted(p.name.split("_")[1] for p in (sweep / ".submitit").glob("*_*") if p.is_dir())
    assert tasks == ["0", "1"]
