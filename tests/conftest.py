"""Shared helpers: the real `cot2` executable of this venv, run in a subprocess against a temp outputs tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COT2 = str(Path(sys.executable).with_name("cot2"))

# Smallest settings that still exercise every part of a stage.
TINY = ["task.seq_length=3", "task.hi=5", "optim.epochs=2", "model=gpt2_1l1h", "model.d_model=16"]


def run_cot2(*args: str, outputs: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cot2 <args...>` with its outputs tree at `outputs` (through COT2_OUTPUTS)."""
    env = {**os.environ, "COT2_OUTPUTS": str(outputs)}
    proc = subprocess.run([COT2, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"cot2 {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cot2(tmp_path: Path):
    """Call as cot2("train", "optim.epochs=1", check=False); outputs go to tmp_path/outputs."""
    outputs = tmp_path / "outputs"

    def call(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cot2(*args, outputs=outputs, check=check, timeout=timeout)

    call.outputs = outputs
    return call
