"""Stage entry points. Each stage is a Hydra app made by `hydra_stage`; cot2cli.cli dispatches to them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console

from cot2cli.config import register_configs
from cot2cli.errors import BAD_INPUT

console = Console()
err_console = Console(stderr=True)
started = False  # set once Hydra composed the config and called the stage: later failures are not usage errors


def hydra_stage(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Wrap a stage function as a Hydra app over conf/<config_name>.yaml; bad input exits 2 with one line."""

    def wrap(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        register_configs()

        @hydra.main(version_base="1.3", config_path="pkg://cot2cli.conf", config_name=config_name)
        def main(cfg: DictConfig) -> Any:
            global started
            started = True
            try:
                return fn(cfg)
            except BAD_INPUT as exc:
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                sys.exit(2)

        return main

    return wrap
