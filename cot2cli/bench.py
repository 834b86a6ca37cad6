"""`make bench`: speed and memory figures, each case in its own process, median over repeats.

Writes outputs/bench/results.csv (name, median_s, min_s, max_s, peak_rss_mb, repeats) and
prints it. Cases time the real code paths: a training epoch of the train stage, the
self-fed validation pass, a GRPO epoch, and a whole default `cot2 train` process for memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CASES: dict[str, str] = {
    "csft_epoch_b16": "one CSFT teacher-forced epoch, MNNS 1..9 m=4, 2 layers 2 heads d=32, batch 16",
    "discrete_epoch_b16": "one discrete-CoT SFT epoch, same data and model",
    "eval_val_cot2": "self-fed CoT2 decoding of the whole validation split",
    "grpo_epoch": "one GRPO-MTS epoch (K=3, G=8, 16 prompts/batch), 1 layer 1 head d=32, with validation",
    "train_default_process": "a whole `cot2 train optim.epochs=3` process (peak RSS is the memory figure)",
}


def _mnns_setup(method: str, split_name: str) -> tuple[Any, Any, Any, Any]:
    """Default MNNS data, one split in `method`'s layout, and a fresh 2-layer 2-head d=32 model (seed 0)."""
    import torch
    from omegaconf import OmegaConf

    from cot2cli.config import MethodConfig, MethodName
    from cot2cli.data import Dataset
    from cot2cli.evaluation import load_splits
    from cot2cli.model import GPT
    from tasks import get_task
    from tasks.mnns import MNNSConfig

    task = get_task(OmegaConf.structured(MNNSConfig()))
    data = task.build()
    method_cfg = OmegaConf.structured(MethodConfig(name=MethodName(method)))
    (split,) = load_splits(Dataset(task, data, Path("."), False), (split_name,), method_cfg, "cpu")
    torch.manual_seed(0)
    model = GPT(data.vocab_size, data.prompt.shape[1] + data.n_steps + 1, 2, 2, 32, 0.1)
    return data, method_cfg, split, model


def _epoch_case(method: str) -> Callable[[], None]:
    import torch
    from omegaconf import OmegaConf

    from cot2cli.config import OptimConfig
    from cot2cli.stages.train import make_optimizer, train_epoch

    _, method_cfg, split, model = _mnns_setup(method, "train")
    model.train()
    optim = OmegaConf.structured(OptimConfig(batch_size=16))
    optimizer, schedule = make_optimizer(model, optim, len(split))
    generator = torch.Generator().manual_seed(0)
    return lambda: train_epoch(model, optimizer, schedule, method_cfg, split, optim, generator, 0)


def _eval_case() -> Callable[[], None]:
    from cot2cli.evaluation import accuracy

    data, _, split, model = _mnns_setup("cot2", "valid")
    return lambda: accuracy(model, "cot2", split, data.n_steps, 4096)


def _grpo_case() -> Callable[[], None]:
    from cot2cli.bench_rl import bench_grpo_epoch

    return bench_grpo_epoch()


def _process_case() -> Callable[[], None]:
    outputs = tempfile.mkdtemp(prefix="cot2-bench-")
    cot2 = str(Path(sys.executable).with_name("cot2"))
    env = {**os.environ, "COT2_OUTPUTS": outputs}
    subprocess.run([cot2, "generate"], env=env, check=True, capture_output=True)  # data exists before timing
    return lambda: subprocess.run([cot2, "train", "optim.epochs=3"], env=env, check=True, capture_output=True)


def _build(name: str) -> Callable[[], None]:
    if name in ("csft_epoch_b16", "discrete_epoch_b16"):
        return _epoch_case("cot2" if name.startswith("csft") else "discrete")
    return {"eval_val_cot2": _eval_case, "grpo_epoch": _grpo_case, "train_default_process": _process_case}[name]()


def run_case(name: str, repeats: int) -> dict:
    """Set the case up, run it once to warm up, then time `repeats` runs; peak RSS covers child processes."""
    import torch

    torch.set_num_threads(1)
    fn = _build(name)
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"name": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_rss_mb": peak_kb / 1024, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process and print JSON")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("COT2_OUTPUTS", "outputs") + "/bench/results.csv")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return

    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    rows = []
    for name in args.only.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}: allowed {', '.join(CASES)}")
        proc = subprocess.run([sys.executable, "-m", "cot2cli.bench", "--case", name, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    view = Table(title=f"cot2 bench (median of {args.repeats}, 1 CPU thread) -> {out}")
    for column in ("name", "median_s", "min_s", "max_s", "peak_rss_mb"):
        view.add_column(column, justify="left" if column == "name" else "right")
    for row in rows:
        figures = (f"{row[c]:.3f}" for c in ("median_s", "min_s", "max_s"))
        view.add_row(row["name"], *figures, f"{row['peak_rss_mb']:.0f}")
    Console().print(view)


if __name__ == "__main__":
    main()
