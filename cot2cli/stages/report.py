"""cot2 report: one table and a few plots over many run directories (runs, sweeps, RL runs).

Reads only what runs wrote: config.yaml, summary.json, metrics.csv and eval.csv. The
config keys that differ between runs become the table's columns (bookkeeping such as
run.name, paths.* and resume excluded; seed is what gets averaged over); runs that agree
on them are aggregated (mean, std, count). A run that is not completed keeps its own rows
under its status, so a crashed seed never slips silently into a mean.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf
from rich.table import Table

from cot2cli import plots
from cot2cli.errors import BAD_INPUT, Cot2Error
from cot2cli.runs import read_json, status_of
from cot2cli.stages import console, err_console

IGNORED_PREFIXES = ("run.", "paths.", "hydra.")
IGNORED_KEYS = {"run", "resume", "device", "threads", "eval_batch_size", "init_from", "seed"}
NOT_FIGURES = {"pid", "seed"}  # numbers in summary.json that are not results
STATUS_ORDER = ["completed", "running", "interrupted", "failed"]
EVAL_KEYS = ["checkpoint", "split", "metric", "k", "temperature", "K", "step"]
DECODING = {"cot2": "CoT2 deterministic", "discrete": "discrete greedy", "nocot": "no-CoT", "coconut": "COCONUT"}
RL_ACCURACY_COLUMNS = ("val_acc", "val_sampled_acc", "val_acc_mts")


@dataclass
class Runs:
    """Everything read from the run directories, one row per run in `table`."""

    table: pd.DataFrame  # run, dir, status, seed, every flattened config key, every numeric summary figure
    config_keys: list[str]
    shared_keys: set[str]  # config keys every run has (an RL run has rl.*, a training run optim.*)
    figures: list[str]
    metrics: pd.DataFrame  # dir + metrics.csv rows of every run
    evals: pd.DataFrame  # dir + the latest evaluation in each run's eval.csv


# -- reading -----------------------------------------------------------------------------
def find_run_dirs(inputs: Iterable[str]) -> list[Path]:
    """Every directory holding a config.yaml at or below the inputs (paths or globs)."""
    found: set[Path] = set()
    for pattern in inputs:
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))] if glob.has_magic(pattern) \
            else [Path(pattern)]
        if not any(m.exists() for m in matches):
            raise Cot2Error(f"{pattern} does not exist")
        for path in matches:
            if (path / "config.yaml").is_file():
                found.add(path.resolve())
            elif path.is_dir():
                found.update(p.parent.resolve() for p in path.rglob("config.yaml"))
    if not found:
        raise Cot2Error(f"no runs found under {', '.join(inputs)}: a run directory holds a config.yaml")
    return sorted(found)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists become JSON text so they can be compared and grouped."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):  # missing, empty or half-written: the run simply has no rows yet
        return pd.DataFrame()


def latest_evaluation(evals: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last (checkpoint, split) evaluated, each figure at its latest value."""
    if evals.empty:
        return evals
    last = evals.iloc[-1]
    mine = evals[(evals["checkpoint"] == last["checkpoint"]) & (evals["split"] == last["split"])]
    return mine.drop_duplicates(subset=EVAL_KEYS, keep="last")


def read_runs(dirs: list[Path]) -> Runs:
    rows, metrics, evals = [], [], []
    config_keys: dict[str, None] = {}
    shared_keys: set[str] | None = None
    figures: dict[str, None] = {}
    base = Path(os.path.commonpath([d.parent for d in dirs]))
    for run_dir in dirs:
        config = flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False))
        raw_summary = read_json(run_dir / "summary.json")
        summary = flatten(raw_summary)
        numbers = {k: v for k, v in summary.items()
                   if k not in NOT_FIGURES and isinstance(v, (int, float)) and not isinstance(v, bool)}
        config_keys.update(dict.fromkeys(config))
        shared_keys = set(config) if shared_keys is None else shared_keys & set(config)
        figures.update(dict.fromkeys(numbers))
        rows.append({"run": str(run_dir.relative_to(base)), "dir": str(run_dir), "status": status_of(raw_summary),
                     **config, **numbers})
        metrics.append(_read_csv(run_dir / "metrics.csv").assign(dir=str(run_dir)))
        evals.append(latest_evaluation(_read_csv(run_dir / "eval.csv")).assign(dir=str(run_dir)))
    table = pd.DataFrame(rows)
    if "seed" not in table:
        table["seed"] = None
    return Runs(table, list(config_keys), shared_keys or set(), list(figures), _concat(metrics), _concat(evals))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f.columns) > 1]  # more than the dir column
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["dir"])


# -- grouping ----------------------------------------------------------------------------
def varying_keys(runs: Runs) -> list[str]:
    """Config keys whose value differs between runs, minus bookkeeping and the seed. A key only some runs
    have (rl.* next to training runs) varies only if those runs disagree on it; `stage` tells them apart."""
    keys = []
    for key in runs.config_keys:
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        values = runs.table[key] if key in runs.shared_keys else runs.table[key].dropna()
        if values.map(plots.value_text).nunique(dropna=False) > 1:
            keys.append(key)
    return keys


def group_keys(runs: Runs, by: str | None) -> list[str]:
    if by is None:
        return varying_keys(runs)
    keys = [k.strip() for k in by.split(",") if k.strip()]
    unknown = [k for k in keys if k not in runs.table.columns or k not in runs.config_keys]
    if unknown:
        choices = ", ".join(varying_keys(runs)) or "none vary"
        raise Cot2Error(f"--by {','.join(unknown)}: not a config key of these runs; keys that vary: {choices}")
    return keys


def comparable(column: pd.Series) -> pd.Series:
    """Numbers stay numbers (null -> NaN) so groups sort numerically; anything else becomes text."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().sum() == column.notna().sum():
        return numeric
    return column.map(plots.value_text)


def label_groups(table: pd.DataFrame, keys: list[str], fallback: str = "all runs") -> pd.Series:
    """'key=value, ...' per run (`fallback` without keys), with the status appended when it is not completed."""
    def label(row: pd.Series) -> str:
        text = ", ".join(f"{k}={plots.value_text(row[k])}" for k in keys) or fallback
        return text if row["status"] == "completed" else f"{text} [{row['status']}]".strip()

    return table.apply(label, axis=1) if not table.empty else pd.Series(dtype=str)


def labelled(runs: pd.DataFrame, keys: list[str], fallback: str = "all runs") -> pd.DataFrame:
    """dir -> group label from the keys that differ among these runs only, so legends stay short."""
    differing = [k for k in keys if runs[k].map(plots.value_text).nunique() > 1]
    return runs[["dir"]].assign(group=label_groups(runs, differing, fallback))


def aggregate(runs: Runs, keys: list[str], metric: str) -> pd.DataFrame:
    """One row per (group, status): mean, std and count of `metric`, and the seeds behind them."""
    if metric not in runs.figures:
        raise Cot2Error(f"--metric {metric}: not a figure of these runs; choose from {', '.join(runs.figures)}")
    table = runs.table.copy()
    for key in keys:
        table[key] = comparable(table[key])
    table["status"] = pd.Categorical(table["status"], categories=STATUS_ORDER, ordered=True)
    seeds = table["seed"].map(plots.value_text)
    grouped = table.assign(seed=seeds).groupby([*keys, "status"], dropna=False, sort=True, observed=True)
    result = grouped.agg(mean=(metric, "mean"), std=(metric, "std"), count=("run", "size"),
                         seeds=("seed", lambda s: ",".join(sorted(s, key=plots.value_order))))
    result = result.reset_index().rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std"})
    result["status"] = result["status"].astype(str)
    return result


# -- figures -----------------------------------------------------------------------------
def per_epoch(metrics: pd.DataFrame, groups: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean, std and run count of `columns` per (group, epoch) across the runs of a group."""
    rows = metrics.merge(groups, on="dir")
    stats = rows.groupby(["group", "epoch"], sort=False)[columns].agg(["mean", "std"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    counts = rows.groupby(["group", "epoch"], sort=False)["dir"].nunique().rename("runs")
    return stats.join(counts).reset_index()


def draw_figures(runs: Runs, keys: list[str], metric: str, out: Path) -> list[Path]:
    table, metrics = runs.table, runs.metrics
    is_rl = table["rl.name"].notna() if "rl.name" in table else pd.Series(False, index=table.index)
    drawn = []
    trained = table[~is_rl]
    curves = metrics[metrics["dir"].isin(trained["dir"])]
    if "val_acc" in curves and curves["val_acc"].notna().any():
        drawn.append(plots.curves_per_epoch(per_epoch(curves, labelled(trained, keys), ["val_acc"]), "val_acc",
                                            "Validation accuracy per epoch (mean ± std over seeds)",
                                            "validation accuracy", out / "val_acc.png"))
    drawn += _pass_at_k_figure(runs.evals, table, keys, out)
    d_key, b_key = "model.d_model", "method.budget"
    if {d_key, b_key} <= set(varying_keys(runs)):
        completed = table[table["status"] == "completed"].copy()
        for key in (d_key, b_key):
            completed[key] = comparable(completed[key])
        bars = completed.groupby([d_key, b_key], dropna=False)[metric].agg(["mean", "std", "count"]).reset_index()
        if not bars.empty:
            drawn.append(plots.grouped_bars(bars, d_key, b_key, metric,
                                            f"{metric} by embedding dim d and supervision budget B (completed runs)",
                                            out / "accuracy_by_d_budget.png"))
    rl = table[is_rl]
    curves = metrics[metrics["dir"].isin(rl["dir"])]
    if "reward" in curves and curves["reward"].notna().any():
        accuracy_columns = [c for c in RL_ACCURACY_COLUMNS if c in curves and curves[c].notna().any()]
        stats = per_epoch(curves, labelled(rl, keys, "GRPO"), ["reward", *accuracy_columns])
        drawn.append(plots.rl_curves(stats, accuracy_columns, out / "rl.png"))
    return drawn


def _pass_at_k_figure(evals: pd.DataFrame, table: pd.DataFrame, keys: list[str], out: Path) -> list[Path]:
    """Discrete pass@k per temperature against each group's deterministic accuracy, labelled by its decoding."""
    if evals.empty:
        return []
    discrete = evals[(evals["metric"] == "pass@k") & evals["K"].isna()]
    if discrete.empty:
        return []
    sampled_runs = table[table["dir"].isin(discrete["dir"])]
    curves = discrete.merge(labelled(sampled_runs, keys, ""), on="dir")
    curves = curves.groupby(["group", "temperature", "k"], sort=False)["value"].mean().reset_index()
    accs = evals[evals["metric"] == "acc"]
    decoded_runs = table[table["dir"].isin(accs["dir"])]
    method = decoded_runs["method.name"] if "method.name" in decoded_runs else pd.Series(None, index=decoded_runs.index)
    groups = labelled(decoded_runs, [k for k in keys if k != "method.name"], "").assign(method=method.map(str))
    levels = accs.merge(groups, on="dir").groupby(["method", "group"], sort=False)["value"].mean().reset_index()
    levels["label"] = [DECODING.get(m, m) + (f" ({g})" if g else "") for m, g in zip(levels["method"], levels["group"],
                                                                                    strict=True)]
    return [plots.pass_at_k(curves, levels[["label", "value"]], out / "pass_at_k.png")]


# -- output ------------------------------------------------------------------------------
def default_out(inputs: list[str], dirs: list[Path]) -> Path:
    """The inputs' common parent; outputs/reports/<time> when they only share the filesystem root."""
    roots = [Path(p).resolve() for pattern in inputs
             for p in (glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern])]
    common = Path(os.path.commonpath(roots or dirs))
    if common.is_file() or common.parent == common:
        outputs = Path(os.environ.get("COT2_OUTPUTS", "outputs"))
        return outputs / "reports" / time.strftime("%Y-%m-%d_%H-%M-%S")
    return common


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return plots.value_text(value)


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def print_table(frame: pd.DataFrame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if pd.api.types.is_numeric_dtype(frame[column]) else "left")
    for row in frame.itertuples(index=False):
        cells = [_fmt(v) for v in row]
        status = row[list(frame.columns).index("status")] if "status" in frame else "completed"
        table.add_row(*cells, style=None if status == "completed" else "yellow")
    console.print(table)


def build_report(inputs: list[str], by: str | None, metric: str, out: Path | None) -> Path:
    """Read the runs below `inputs`, write report.csv, runs.csv, report.md and PNGs to `out`; return `out`."""
    dirs = find_run_dirs(inputs)
    runs = read_runs(dirs)
    keys = group_keys(runs, by)
    summary = aggregate(runs, keys, metric)
    out = Path(out) if out is not None else default_out(inputs, dirs)
    out.mkdir(parents=True, exist_ok=True)
    per_run_columns = ["run", "status", *keys, "seed", *[f for f in runs.figures if f not in keys]]
    per_run = runs.table[[c for c in dict.fromkeys(per_run_columns) if c in runs.table]]
    summary.to_csv(out / "report.csv", index=False)
    per_run.to_csv(out / "runs.csv", index=False)
    pictures = draw_figures(runs, keys, metric, out)
    title = f"{metric} over {len(dirs)} runs, grouped by {', '.join(keys) or 'nothing (no key varies)'}"
    as_written = {k: lambda frame, k=k: frame[k].map(plots.value_text) for k in ["seed", *keys]}
    shown = summary.assign(**{k: f for k, f in as_written.items() if k in summary})
    run_lines = per_run[list(dict.fromkeys(["run", "status", *keys, "seed", metric]))].assign(**as_written)
    markdown = [f"# cot2 report\n\n{title}; inputs: {', '.join(inputs)}\n", "## Aggregated over seeds\n",
                markdown_table(shown), "\n## Runs\n", markdown_table(run_lines)]
    markdown += ["\n## Figures\n", *[f"![{p.stem}]({p.name})\n" for p in pictures]]
    (out / "report.md").write_text("\n".join(markdown) + "\n")
    print_table(shown.rename(columns={f"{metric}_mean": "mean", f"{metric}_std": "std"}), title)
    console.print(f"[green]wrote[/] {out / 'report.csv'}, {out / 'report.md'}"
                  + "".join(f", {p.name}" for p in pictures))
    return out


def report_command(inputs: list[str], by: str | None, metric: str, out: Path | None) -> None:
    """The `cot2 report` entry point: bad input is one line on stderr and exit status 2."""
    try:
        build_report(inputs, by, metric, out)
    except BAD_INPUT as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
