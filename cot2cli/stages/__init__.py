"""Stage entry points. Each stage is a Hydra app made by `hydra_stage`; cot2cli.cli dispatches to them."""

from __future__ import annotations

import functools
import importlib
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cot2cli.config import register_configs
from cot2cli.errors import BAD_INPUT, Diverged
from cot2cli.runs import CHECKPOINT_FILES, Run, in_sweep

console = Console()
err_console = Console(stderr=True)
started = False  # set once Hydra composed the config and called the stage: later failures are not usage errors

# conf/hydra/launcher/*.yaml complete the launcher plugins' schemas of the same name on purpose.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")

_tasks: dict[str, StageTask] = {}


class JobFailed(Exception):
    """A sweep job that failed (its one-line reason already printed); the sweep's other jobs run on."""


def epoch_progress() -> Progress:
    """The epochs bar of train and rl; off when stdout is not a terminal (they print a line per epoch instead)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), console=console, disable=not console.is_terminal)


def _fail(code: int, message: str) -> NoReturn:
    """One line, then exit `code`. In a sweep, exiting would end the launcher's worker, or the whole sweep
    with the other jobs half-done: an exception fails this job alone and Hydra reports it after the rest."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if in_sweep():
        raise JobFailed(message) from None
    sys.exit(code)


class StageTask:
    """A stage's Hydra task function. Sweep launchers (joblib, submitit) pickle it into other processes;
    it pickles as its module's name, so a job imports the stage there instead of copying its globals."""

    def __init__(self, fn: Callable[[DictConfig], Any]):
        functools.update_wrapper(self, fn)
        self.fn = fn
        _tasks[fn.__module__] = self

    def __call__(self, cfg: DictConfig) -> Any:
        global started
        started = True
        if cfg.get("threads"):
            import torch

            torch.set_num_threads(cfg.threads)
        try:
            return self.fn(cfg)
        except BAD_INPUT as exc:
            _fail(2, str(exc))
        except OSError as exc:  # unwritable outputs, full disk: the machine's fault, said in one line
            _fail(1, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        except SystemExit as exc:  # the stage's own exit: interrupted, diverged
            if exc.code and in_sweep():
                raise JobFailed(f"exited with status {exc.code}") from None
            raise

    def __reduce__(self) -> tuple[Callable[[str], StageTask], tuple[str]]:
        return _stage_task, (self.fn.__module__,)


def _stage_task(module: str) -> StageTask:
    importlib.import_module(module)
    return _tasks[module]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def supervise(run: Run, stage: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Do a run's work and record how it ended: SIGINT/SIGTERM -> interrupted (exit 130, resumable),
    divergence -> failed (exit 1, last good checkpoint kept), any other error -> failed and re-raised."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a backgrounded process starts with it ignored
        signal.signal(signum, _interrupt)
    try:
        return work()
    except KeyboardInterrupt:
        run.finish("interrupted")
        err_console.print(f"interrupted; resume with: cot2 {stage} resume={run.dir}", highlight=False, soft_wrap=True)
        sys.exit(130)
    except Diverged as exc:
        run.finish("failed", error=str(exc))
        checkpoint = run.dir / CHECKPOINT_FILES["last"]
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint.exists() else "no epoch finished, no checkpoint"
        err_console.print(f"[bold red]failed:[/] {exc}; {kept}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except BaseException as exc:
        run.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def hydra_stage(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Wrap a stage function as a Hydra app over conf/<config_name>.yaml; bad input exits 2 with one line,
    an unwritable or full disk 1 with one line."""

    def wrap(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        register_configs()
        return hydra.main(version_base="1.3", config_path="pkg://cot2cli.conf", config_name=config_name)(StageTask(fn))

    return wrap
