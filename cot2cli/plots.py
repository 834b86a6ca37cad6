"""The report's figures, one PNG each, drawn on plain matplotlib Figures (Agg, no display, no pyplot state).

Each function takes tidy pandas frames already aggregated by the report and only draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 130


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _legend(ax: Axes, entries: int) -> None:
    """Inside the axes for a few entries, below them for many, so no curve hides behind it."""
    if entries <= 6:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)


def curves_per_epoch(curves: pd.DataFrame, column: str, title: str, ylabel: str, path: Path) -> Path:
    """curves: group, epoch, <column>_mean, <column>_std, runs -> one line per group, a band of one std."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for group, rows in curves.groupby("group", sort=False):
        rows = rows.sort_values("epoch")
        runs = int(rows["runs"].max())
        line = ax.plot(rows["epoch"], rows[f"{column}_mean"], label=f"{group} (n={runs})")[0]
        std = rows[f"{column}_std"].fillna(0.0)
        ax.fill_between(rows["epoch"], rows[f"{column}_mean"] - std, rows[f"{column}_mean"] + std,
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, curves["group"].nunique())
    return _save(fig, path)


def pass_at_k(curves: pd.DataFrame, levels: pd.DataFrame, path: Path) -> Path:
    """curves: group ('' for one), temperature, k, value (discrete pass@k); levels: label, value (accuracies).

    One line per (group, temperature) against k; each level is a horizontal line.
    """
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for (group, temperature), rows in curves.groupby(["group", "temperature"], sort=False):
        rows = rows.sort_values("k")
        ax.plot(rows["k"], 100 * rows["value"], marker="o",
                label=f"discrete pass@k, T={temperature:g}" + (f" ({group})" if group else ""))
    styles = ["--", ":", "-."]
    for i, (label, value) in enumerate(zip(levels["label"], levels["value"], strict=True)):
        ax.axhline(100 * value, linestyle=styles[i % len(styles)], color=f"C{(i + 5) % 10}",
                   label=f"{label} ({100 * value:.1f})")
    if not curves.empty:
        ks = sorted(int(k) for k in curves["k"].unique())
        if all(k & (k - 1) == 0 for k in ks):  # powers of two spread evenly on a log2 axis
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_title("Discrete CoT pass@k vs one deterministic rollout")
    ax.set_xlabel("k (samples per instance)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    _legend(ax, curves.groupby(["group", "temperature"]).ngroups + len(levels))
    return _save(fig, path)


def grouped_bars(table: pd.DataFrame, x: str, bars: str, metric: str, title: str, path: Path) -> Path:
    """table: <x>, <bars>, mean, std, count -> one cluster per x value, one bar per `bars` value, std as error bar."""
    xs = sorted(table[x].unique(), key=value_order)
    bar_values = sorted(table[bars].unique(), key=value_order)
    width = 0.8 / max(1, len(bar_values))
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    positions = np.arange(len(xs))
    for i, value in enumerate(bar_values):
        rows = table[table[bars] == value].set_index(x).reindex(xs)
        offset = positions - 0.4 + width * (i + 0.5)
        spread = None if rows["std"].isna().all() else 100 * rows["std"].fillna(0.0)  # one run: no error bar
        drawn = ax.bar(offset, 100 * rows["mean"], width, yerr=spread, capsize=3, label=value_text(value))
        ax.bar_label(drawn, labels=[f"{100 * v:.1f}" if pd.notna(v) else "" for v in rows["mean"]], fontsize=7,
                     padding=2)
    ax.set_xticks(positions, [value_text(v) for v in xs])
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title=bars)
    return _save(fig, path)


def rl_curves(curves: pd.DataFrame, accuracy_columns: list[str], path: Path) -> Path:
    """curves: group, epoch, reward_mean, <accuracy column>_mean ... -> reward and accuracy side by side."""
    fig = Figure(figsize=(12, 5))
    reward_ax, acc_ax = fig.subplots(1, 2)
    styles = ["-", "--", ":"]
    for i, (group, rows) in enumerate(curves.groupby("group", sort=False)):
        rows = rows.sort_values("epoch")
        color = f"C{i % 10}"
        reward_ax.plot(rows["epoch"], rows["reward_mean"], color=color, label=group)
        for style, column in zip(styles, accuracy_columns, strict=False):
            acc_ax.plot(rows["epoch"], 100 * rows[f"{column}_mean"], color=color, linestyle=style,
                        label=f"{group}: {column}")
    reward_ax.set_title("RL: mean reward per epoch")
    reward_ax.set_xlabel("epoch")
    reward_ax.set_ylabel("reward (share of correct rollouts)")
    acc_ax.set_title("RL: validation accuracy per epoch")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy (%)")
    for ax in (reward_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(reward_ax, curves["group"].nunique())
    _legend(acc_ax, curves["group"].nunique() * len(accuracy_columns))
    return _save(fig, path)


def value_order(value: object) -> tuple[int, float, str]:
    """Sort key: numbers in numeric order, then null and text."""
    if isinstance(value, (int, float, np.number)) and not pd.isna(value):
        return (0, float(value), "")
    return (1, 0.0, value_text(value))


def value_text(value: object) -> str:
    """A config value as people write it: 16 not 16.0, null for missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)
