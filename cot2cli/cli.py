"""The `cot2` command tree. Typer gives commands, help and completion; each stage command
hands everything after its name to the stage's Hydra app unchanged, so overrides, -m
sweeps, --cfg, --info, launchers and Hydra's --help work as Hydra users expect."""

from __future__ import annotations

import importlib
import re
import sys
from importlib.resources import files
from pathlib import Path

import typer

app = typer.Typer(
    help="cot2: continuous chain-of-thought experiments (data, SFT/CSFT, GRPO, evaluation, reports).",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
)

def _version(value: bool) -> None:
    if value:
        from cot2cli import __version__

        typer.echo(f"cot2 {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """cot2: continuous chain-of-thought experiments (data, SFT/CSFT, GRPO, evaluation, reports)."""


HYDRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


CHOICE = re.compile(r"^(task|model|method|rl|experiment)=(.+)$")


def check_group_choices(args: list[str]) -> None:
    """Name an unknown config choice (task=foo) in one line, before Hydra's multi-line report."""
    for arg in args:
        match = CHOICE.match(arg)
        if not match:
            continue
        group, values = match.groups()
        folder = files("cot2cli.conf").joinpath(group)
        if not folder.is_dir():
            continue
        options = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        for value in values.split(","):
            if value not in options and value != "null":
                typer.echo(f"error: unknown {group} {value!r}: allowed {', '.join(options)}", err=True)
                raise SystemExit(2)


def run_stage(stage: str, args: list[str]) -> None:
    """Run cot2cli.stages.<stage>.main as a Hydra app with `args` as its command line."""
    check_group_choices(args)
    module = importlib.import_module(f"cot2cli.stages.{stage}")
    sys.argv = [f"cot2 {stage}", *args]
    try:
        module.main()
    except SystemExit as exc:
        from cot2cli import stages

        # Hydra exits 1 when the config does not compose; that is a usage error like any bad value.
        if exc.code == 1 and not stages.started:
            raise SystemExit(2) from None
        raise


def hydra_command(stage: str, summary: str, name: str | None = None):
    """Register `cot2 <name>` (default: the stage module's name) passing everything after it to Hydra."""
    def command(ctx: typer.Context) -> None:
        run_stage(stage, ctx.args)

    command.__doc__ = f"{summary}\n\nHydra overrides follow: key=value, -m for sweeps, --help for config groups."
    app.command(name=name or stage, context_settings=HYDRA_ARGS, add_help_option=False)(command)


hydra_command("generate", "Generate a task's dataset under outputs/data/ (task=mnns|prosqa|prontoqa).")
hydra_command("train", "Train a model: method=cot2 (CSFT) | discrete | nocot | coconut; writes outputs/runs/...")
hydra_command("rl", "GRPO from a trained run: init_from=<run> rl=mts (rl.K=3) | dirichlet; writes outputs/runs/...")
hydra_command("evaluate", "Score a run's checkpoint: accuracy, pass@k, majority@k, diagnostics; adds eval.csv.",
              name="eval")


@app.command()
def report(
    inputs: list[str] = typer.Argument(..., help="Run or sweep directories, or globs; every run below them is read."),
    by: str | None = typer.Option(None, "--by", help="Config keys to group by, a,b (default: all that vary)."),
    metric: str = typer.Option("best_val_acc", "--metric", help="Summary figure to aggregate and plot, e.g. eval.acc."),
    out: Path | None = typer.Option(None, "--out", help="Where report.csv/md and PNGs go (default: inputs' parent)."),
) -> None:
    """Table and plots over many runs: the config keys that vary, aggregated over seeds."""
    from cot2cli.stages.report import report_command

    report_command(inputs, by, metric, out)


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach `tee` and log files as they happen
    app()
