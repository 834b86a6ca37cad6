"""cot2 train: supervised training of one run (cot2 CSFT, discrete CoT, no-CoT, COCONUT).

Everything that can be wrong with the settings is checked in `prepare` before the run
directory is claimed. Each epoch ends with a validation pass, a metrics row and an atomic
checkpoint holding model, optimizer, schedule, RNG states and the epoch, so a killed run
resumes to exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cot2cli.checkpoints import CHECKPOINT_FILES, build_model, load_checkpoint, model_args, save_epoch
from cot2cli.config import plain
from cot2cli.data import Dataset, load_dataset
from cot2cli.determinism import resolve_device, rng_state, seed_everything, set_rng_state
from cot2cli.errors import Cot2Error, Diverged, check_limits
from cot2cli.evaluation import Split, accuracy, load_splits, validation_loss
from cot2cli.methods import coconut_stage, method_loss, reasoning_steps
from cot2cli.runs import MetricsLog, Run, load_config, open_run, resume_target
from cot2cli.stages import console, epoch_progress, hydra_stage, supervise


class TrainingDiverged(Diverged):
    """The training or validation loss became NaN or infinite."""


@dataclass
class Prepared:
    dataset: Dataset
    train: Split
    valid: Split
    model_args: dict[str, Any]
    device: torch.device


def check_optim(optim: Any) -> None:
    """Optimiser settings out of range fail here, in one line, not deep inside torch after the run exists."""
    limits = {
        "epochs": (optim.epochs >= 1, "at least 1"),
        "batch_size": (optim.batch_size >= 1, "at least 1"),
        "lr": (optim.lr > 0, "positive"),
        "weight_decay": (optim.weight_decay >= 0, "non-negative"),
        "beta2": (0 <= optim.beta2 < 1, "in [0, 1)"),
        "grad_clip": (optim.grad_clip >= 0, "non-negative (0 = off)"),
        "warmup_epochs": (optim.warmup_epochs >= 0, "non-negative"),
    }
    check_limits("optim", optim, limits)


def prepare(cfg: DictConfig) -> Prepared:
    """Build everything the run needs, failing on bad settings before anything of a run is written."""
    check_optim(cfg.optim)
    device = resolve_device(cfg.device)
    dataset = load_dataset(cfg.task, cfg.paths.outputs)
    data = dataset.data
    method = cfg.method
    if str(method.name) == "cot2":
        dataset.task.check_budget(data, method.budget)
        for step in method.supervised_steps or []:
            if not 1 <= step <= data.n_steps:
                raise Cot2Error(f"method.supervised_steps has {step}: allowed 1..{data.n_steps}")
    n_positions = data.prompt.shape[1] + reasoning_steps(str(method.name), data.n_steps) + 1
    args = model_args(cfg.model, data.vocab_size, n_positions)
    if method.dropout is not None:
        if not 0.0 <= method.dropout < 1.0:
            raise Cot2Error(f"method.dropout={method.dropout} is out of range: allowed 0 <= dropout < 1 (or null)")
        args["dropout"] = method.dropout
    build_model(args)  # size checks
    train, valid = load_splits(dataset, ("train", "valid"), method, device)
    return Prepared(dataset, train, valid, args, device)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_optimizer(model: torch.nn.Module, optim: Any, n_train: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (fused: one kernel for all parameters, the fastest step for tiny models) and its per-step schedule."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=(0.9, optim.beta2), weight_decay=optim.weight_decay, fused=True
    )
    steps_per_epoch = math.ceil(n_train / optim.batch_size)
    total_steps, warmup = steps_per_epoch * optim.epochs, optim.warmup_epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, str(optim.schedule), warmup)
    )
    return optimizer, schedule


def stage_begins(method: Any, epoch: int, n_steps: int) -> bool:
    """A COCONUT stage (one more step made continuous) begins at this epoch and the optimizer is to be reset.

    Coconut resets the optimizer at every stage switch: moments built up for the previous
    stage's positions would otherwise steer the first updates of the new one.
    """
    if str(method.name) != "coconut" or epoch == 0 or not getattr(method, "reset_optimizer", True):
        return False
    stage = coconut_stage(epoch, method.epochs_per_stage, n_steps)
    return stage != coconut_stage(epoch - 1, method.epochs_per_stage, n_steps)


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, method: Any, split: Split,
                optim: Any, generator: torch.Generator, epoch: int) -> list[float]:
    """One pass over the split in shuffled batches; returns the mean [total, per-step..., answer] losses."""
    method = plain(method)  # attribute reads on an OmegaConf node cost ~30 us each, a lot per step (no-op if plain)
    batch_size, grad_clip = optim.batch_size, optim.grad_clip
    params = list(model.parameters())
    order = torch.randperm(len(split), generator=generator).to(split.answer.device)
    sums = torch.zeros(split.trace.shape[1] + 2)
    for start in range(0, len(order), batch_size):
        loss = method_loss(model, method, split.batch(order[start : start + batch_size]), epoch)
        if not torch.isfinite(loss.total):
            raise TrainingDiverged(f"loss is {float(loss.total.detach())} at epoch {epoch + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        schedule.step()
        sums += torch.cat([loss.total.reshape(1), loss.steps, loss.answer.reshape(1)]).detach().cpu()
    return (sums / math.ceil(len(split) / batch_size)).tolist()


def fit(cfg: DictConfig, run: Run, prep: Prepared) -> dict[str, Any]:
    method, optim = plain(cfg.method), cfg.optim  # read every step and every validation batch
    name = str(method.name)
    n_steps = prep.train.trace.shape[1]
    generator = seed_everything(cfg.seed)
    model = build_model(prep.model_args).to(prep.device)
    optimizer, schedule = make_optimizer(model, optim, len(prep.train))
    columns = ["epoch", "train_loss", *[f"train_step{t + 1}" for t in range(n_steps)], "train_answer_loss",
               "val_loss", "val_acc", "lr", "seconds"]
    metrics = MetricsLog(run.dir / "metrics.csv", columns)
    start_epoch, best, elapsed = 0, -1.0, 0.0
    checkpoint_path = run.dir / CHECKPOINT_FILES["last"]
    if run.resumed and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, prep.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"], generator)
        start_epoch, best, elapsed = state["epoch"], state["best_val_acc"], state["elapsed"]
        console.print(f"resuming {run.dir} after epoch {start_epoch}")
    metrics.keep_until(start_epoch)

    model.train()
    summary: dict[str, Any] = {}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with epoch_progress() as bar:
        progress = bar.add_task(f"train {name}", total=optim.epochs, completed=start_epoch, status="")
        for epoch in range(start_epoch, optim.epochs):
            began = time.perf_counter()
            if stage_begins(method, epoch, n_steps):
                optimizer.state.clear()  # fresh AdamW moments; the learning-rate schedule runs on
            means = train_epoch(model, optimizer, schedule, method, prep.train, optim, generator, epoch)
            val_loss = validation_loss(model, method, prep.valid, epoch, cfg.eval_batch_size)
            if not math.isfinite(val_loss):  # the last step broke the weights: keep them out of the checkpoint
                raise TrainingDiverged(f"validation loss is {val_loss} after epoch {epoch + 1}")
            val_acc = accuracy(model, name, prep.valid, n_steps, cfg.eval_batch_size)
            seconds = time.perf_counter() - began
            elapsed += seconds
            row = {"epoch": epoch + 1, "train_loss": means[0], "train_answer_loss": means[-1], "val_loss": val_loss,
                   "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
            row.update({f"train_step{t + 1}": means[1 + t] for t in range(n_steps)})
            metrics.append(row)
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "rng": rng_state(generator), "epoch": epoch + 1, "best_val_acc": max(best, val_acc),
                "elapsed": elapsed, "model_args": prep.model_args, "vocab": prep.dataset.data.vocab,
                "config": resolved,
            }
            best = save_epoch(run.dir, state, val_acc, best)
            bar.update(progress, completed=epoch + 1, status=f"val_acc {val_acc:.4f}")
            if not console.is_terminal:
                console.print(f"epoch {epoch + 1}/{optim.epochs} loss {means[0]:.4f} val_acc {val_acc:.4f}")
            summary = {"best_val_acc": best, "final_val_acc": val_acc, "epochs": epoch + 1, "train_seconds": elapsed}
    return summary


@hydra_stage("train")
def main(cfg: DictConfig) -> dict[str, Any]:
    target = resume_target(cfg)
    if target is not None:
        cfg = load_config(target)  # a resumed run keeps the settings it started with
    prep = prepare(cfg)
    run = open_run(cfg, target)
    figures = supervise(run, "train", lambda: fit(cfg, run, prep))
    summary = run.finish("completed", **figures, dataset=str(prep.dataset.dir))
    console.print(f"[green]done[/] {run.dir}  best val_acc {figures.get('best_val_acc', float('nan')):.4f}")
    return summary
