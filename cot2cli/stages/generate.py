"""cot2 generate: build a task's dataset once and print what it holds."""

from __future__ import annotations

from omegaconf import DictConfig
from rich.table import Table

from cot2cli.data import load_dataset
from cot2cli.stages import console, hydra_stage


def print_statistics(stats: dict, where: str, generated: bool) -> None:
    table = Table(title=f"{stats.get('task', 'dataset')}: {'generated' if generated else 'already there'}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}:{v}" for k, v in value.items())
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("written to", where)
    console.print(table)


@hydra_stage("generate")
def main(cfg: DictConfig) -> str:
    dataset = load_dataset(cfg.task, cfg.paths.outputs)
    stats = {"task": dataset.task.name, **dataset.task.statistics(dataset.data)}
    print_statistics(stats, str(dataset.dir), dataset.generated)
    return str(dataset.dir)
