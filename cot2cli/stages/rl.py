"""cot2 rl: GRPO (cot2cli.grpo) from a completed cot2 or discrete run, with MTS or Dirichlet sampling.

The RL run takes its task, dataset, model and method from `init_from`, and everything that
can be wrong with them is checked before the run directory is claimed. The validation split
is scored once before the first update (start_val_acc) and after every epoch; each epoch
ends with a metrics row and an atomic checkpoint holding model, optimizer, both RNG streams
and the epoch, so a killed run resumes to the numbers of an uninterrupted one.

Validation columns: val_acc is the init method's own deterministic decoding (cot2: the full
softmax fed back; discrete: greedy); val_sampled_acc is the share of one policy rollout per
example (steps and answer sampled, as in training) that is right; entropy_step<t> is the
mean entropy of softmax(z_t) along those rollouts; kl_start is the k3 estimate of
KL(policy || start policy) per rollout on them. The validation rollouts use the same seed
every epoch, so epoch-to-epoch changes are not sampling noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from cot2cli.checkpoints import CHECKPOINT_FILES, load_checkpoint, model_from_checkpoint, save_epoch
from cot2cli.data import Dataset, load_dataset
from cot2cli.determinism import resolve_device, rng_state, seed_everything, set_rng_state
from cot2cli.errors import Cot2Error, check_limits
from cot2cli.evaluation import Split, accuracy
from cot2cli.grpo import GRPOSettings, PolicyDiverged, RewardFn, Sampler, evaluate_policy, train_epoch
from cot2cli.model import GPT
from cot2cli.runs import MetricsLog, Run, find_run, load_config, open_run, resume_target, run_status
from cot2cli.stages import console, epoch_progress, hydra_stage, supervise
from tasks import Task, TaskData

SAMPLED_METHODS = ("cot2", "discrete")  # methods whose reasoning steps are vocabulary tokens to sample


@dataclass
class RLData:
    """Train prompts and the validation split on the device, with dataset indices for the reward."""

    train_prompt: Tensor  # [M, P]
    train_index: Tensor  # [M] rows of the dataset
    valid: Split
    valid_index: Tensor
    n_steps: int
    reward: RewardFn


def answer_reward(task: Task, data: TaskData) -> RewardFn:
    """Reward 1 for an answer the task accepts (Task.check_answer), else 0."""

    def reward(answer: Tensor, index: Tensor) -> Tensor:
        return task.check_answer(answer.cpu(), data, index.cpu()).to(answer.device, torch.float32)

    return reward


def rl_data(task: Task, data: TaskData, device: torch.device) -> RLData:
    train_index, valid_index = data.indices("train"), data.indices("valid")
    valid = Split.of(data, valid_index, data.n_steps, device)
    return RLData(data.prompt[train_index].to(device), train_index.to(device), valid, valid_index.to(device),
                  data.n_steps, answer_reward(task, data))


def sampler_and_settings(rl: Any) -> tuple[Sampler, GRPOSettings]:
    """The rl config group as the GRPO module's types; bad values fail in one line naming the key."""
    limits = {
        "K": (rl.K >= 1, "at least 1"),
        "gamma": (rl.gamma > 0, "positive"),
        "group_size": (rl.group_size >= 2, "at least 2 (advantages compare rollouts of one prompt)"),
        "batch_size": (rl.batch_size >= 1, "at least 1"),
        "epochs": (rl.epochs >= 1, "at least 1"),
        "prompts_per_epoch": (rl.prompts_per_epoch is None or rl.prompts_per_epoch >= 1, "at least 1 (or null)"),
        "ppo_epochs": (rl.ppo_epochs >= 1, "at least 1"),
        "clip_eps": (0 < rl.clip_eps < 1, "in (0, 1)"),
        "kl_coef": (rl.kl_coef >= 0, "non-negative"),
        "lr": (rl.lr > 0, "positive"),
        "weight_decay": (rl.weight_decay >= 0, "non-negative"),
        "grad_clip": (rl.grad_clip >= 0, "non-negative (0 = off)"),
    }
    check_limits("rl", rl, limits)
    sampler = Sampler(str(rl.name), K=rl.K, normalize=rl.normalize, gamma=rl.gamma)
    settings = GRPOSettings(group_size=rl.group_size, batch_size=rl.batch_size, clip_eps=rl.clip_eps,
                            ppo_epochs=rl.ppo_epochs, kl_coef=rl.kl_coef, grad_clip=rl.grad_clip)
    return sampler, settings


def attach_init_run(cfg: DictConfig) -> DictConfig:
    """cfg with init_from resolved to its run directory and that run's task, model and method copied in."""
    if not cfg.init_from:
        raise Cot2Error("init_from is required: cot2 rl init_from=<completed cot2 or discrete run>")
    init_dir = find_run(str(cfg.init_from), cfg.paths.outputs)
    status = run_status(init_dir)
    if status != "completed":
        raise Cot2Error(f"init_from run {init_dir} is {status}, not completed: finish it (cot2 train resume=...) first")
    init_cfg = load_config(init_dir)
    method = str(OmegaConf.select(init_cfg, "method.name", default=None))
    if method not in SAMPLED_METHODS:
        raise Cot2Error(f"init_from run {init_dir} was trained with method={method}: it has no vocabulary tokens to "
                        f"sample at the reasoning steps; GRPO starts from a {' or '.join(SAMPLED_METHODS)} run")
    cfg = cfg.copy()
    cfg.init_from = str(init_dir)
    cfg.task, cfg.model, cfg.method = init_cfg.task, init_cfg.model, init_cfg.method
    return cfg


def vocabulary_difference(checkpoint_vocab: list[str], dataset_vocab: list[str]) -> str:
    """What differs between two vocabularies, in a few words."""
    only_checkpoint = [t for t in checkpoint_vocab if t not in set(dataset_vocab)]
    only_dataset = [t for t in dataset_vocab if t not in set(checkpoint_vocab)]
    parts = [f"{len(checkpoint_vocab)} tokens in the checkpoint, {len(dataset_vocab)} in the dataset"]
    if only_checkpoint:
        parts.append(f"only in the checkpoint: {' '.join(only_checkpoint[:6])}")
    if only_dataset:
        parts.append(f"only in the dataset: {' '.join(only_dataset[:6])}")
    if not only_checkpoint and not only_dataset:
        pairs = zip(checkpoint_vocab, dataset_vocab, strict=False)
        position = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if position is not None:
            parts.append(f"same tokens in another order (id {position}: {checkpoint_vocab[position]} vs "
                         f"{dataset_vocab[position]})")
    return "; ".join(parts)


@dataclass
class Prepared:
    dataset: Dataset
    data: RLData
    init_state: dict[str, Any]
    sampler: Sampler
    settings: GRPOSettings
    device: torch.device


def prepare(cfg: DictConfig) -> Prepared:
    """Check and load everything the run needs, before anything of the run is written."""
    device = resolve_device(cfg.device)
    sampler, settings = sampler_and_settings(cfg.rl)
    init_dir = Path(cfg.init_from)
    checkpoint = init_dir / CHECKPOINT_FILES[str(cfg.init_checkpoint)]
    if not checkpoint.exists():
        raise Cot2Error(f"init_from run {init_dir} has no {checkpoint.name} (init_checkpoint={cfg.init_checkpoint})")
    state = load_checkpoint(checkpoint, device)
    dataset = load_dataset(cfg.task, cfg.paths.outputs)
    data = dataset.data
    if list(state["vocab"]) != list(data.vocab):
        raise Cot2Error(f"init_from run {init_dir} does not fit its dataset {dataset.dir}: the vocabularies differ "
                        f"({vocabulary_difference(list(state['vocab']), list(data.vocab))})")
    needed = data.prompt.shape[1] + data.n_steps + 1
    if state["model_args"]["n_positions"] < needed:
        raise Cot2Error(f"init_from run {init_dir}'s model has n_positions={state['model_args']['n_positions']} "
                        f"but the dataset's sequences need {needed}")
    return Prepared(dataset, rl_data(dataset.task, data, device), state, sampler, settings, device)


def start_policy(state: dict[str, Any], device: torch.device) -> GPT:
    """The init run's model in eval mode: RL never uses dropout (see cot2cli.grpo)."""
    return model_from_checkpoint(state, device).eval()


def validation_row(
    model: GPT, start_model: GPT, rl: RLData, method: str, sampler: Sampler, batch_size: int, seed: int
) -> dict[str, float]:
    """The validation columns of metrics.csv (see the module docstring)."""
    generator = torch.Generator(device=rl.valid.prompt.device).manual_seed(seed)
    policy = evaluate_policy(model, start_model, rl.valid.prompt, rl.valid_index, rl.n_steps, rl.reward, sampler,
                             batch_size, generator)
    row = {"val_acc": accuracy(model, method, rl.valid, rl.n_steps, batch_size), "val_sampled_acc": policy.success,
           "kl_start": policy.kl_to_start}
    row.update({f"entropy_step{t + 1}": h for t, h in enumerate(policy.step_entropy)})
    return row


def fit(cfg: DictConfig, run: Run, prep: Prepared) -> dict[str, Any]:
    rl, data, device = cfg.rl, prep.data, prep.device
    method = str(cfg.method.name)
    order_generator = seed_everything(cfg.seed)
    sample_generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model = start_policy(prep.init_state, device)
    start_model = start_policy(prep.init_state, device).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=rl.lr, weight_decay=rl.weight_decay, fused=True)
    columns = ["epoch", "reward", "val_acc", "val_sampled_acc", *[f"entropy_step{t + 1}" for t in range(data.n_steps)],
               "kl_start", "clip_frac", "loss", "seconds"]
    metrics = MetricsLog(run.dir / "metrics.csv", columns)
    checkpoint_path = run.dir / CHECKPOINT_FILES["last"]

    def validate() -> dict[str, float]:
        return validation_row(model, start_model, data, method, prep.sampler, cfg.eval_batch_size, cfg.seed)

    if run.resumed and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], order_generator)
        sample_generator.set_state(state["sampling_rng"])
        start_epoch, best, start_acc, elapsed = (state["epoch"], state["best_val_acc"], state["start_val_acc"],
                                                 state["elapsed"])
        summary = {"start_val_acc": start_acc, "best_val_acc": best, "final_val_acc": state["val_acc"],
                   "epochs": start_epoch, "train_seconds": elapsed}
        metrics.keep_until(start_epoch)
        console.print(f"resuming {run.dir} after epoch {start_epoch}")
    else:
        began = time.perf_counter()
        start_row = validate()
        start_epoch, best, start_acc, elapsed = 0, -1.0, start_row["val_acc"], 0.0
        metrics.keep_until(-1)
        metrics.append({"epoch": 0, **start_row, "seconds": time.perf_counter() - began})
        summary = {"start_val_acc": start_acc}
        run.update(start_val_acc=start_acc)
        console.print(f"start val_acc {start_acc:.4f}")

    n_prompts = len(data.train_prompt) if rl.prompts_per_epoch is None else min(rl.prompts_per_epoch,
                                                                                len(data.train_prompt))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with epoch_progress() as bar:
        progress = bar.add_task(f"rl {rl.name}", total=rl.epochs, completed=start_epoch, status="")
        for epoch in range(start_epoch, rl.epochs):
            began = time.perf_counter()
            order = torch.randperm(len(data.train_prompt), generator=order_generator)[:n_prompts].to(device)
            stats = train_epoch(model, optimizer, data.train_prompt, data.train_index, data.n_steps, data.reward,
                                prep.sampler, prep.settings, sample_generator, start_model, order)
            if not all(bool(p.isfinite().all()) for p in model.parameters()):  # keep them out of the checkpoint
                raise PolicyDiverged(f"the weights are no longer finite after epoch {epoch + 1}")
            row = validate()
            seconds = time.perf_counter() - began
            elapsed += seconds
            metrics.append({"epoch": epoch + 1, "reward": stats.reward, **row, "clip_frac": stats.clipped_fraction,
                            "loss": stats.loss, "seconds": seconds})
            val_acc = row["val_acc"]
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(order_generator),
                "sampling_rng": sample_generator.get_state(), "epoch": epoch + 1, "best_val_acc": max(best, val_acc),
                "start_val_acc": start_acc, "elapsed": elapsed, "model_args": prep.init_state["model_args"],
                "vocab": list(prep.dataset.data.vocab), "val_acc": val_acc,
                "config": resolved,
            }
            best = save_epoch(run.dir, state, val_acc, best)
            status = f"reward {stats.reward:.4f} val_acc {val_acc:.4f}"
            bar.update(progress, completed=epoch + 1, status=status)
            if not console.is_terminal:
                console.print(f"epoch {epoch + 1}/{rl.epochs} {status} sampled {row['val_sampled_acc']:.4f}")
            summary = {"start_val_acc": start_acc, "best_val_acc": best, "final_val_acc": val_acc,
                       "epochs": epoch + 1, "train_seconds": elapsed}
    return summary


@hydra_stage("rl")
def main(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("resume"):
        cfg = attach_init_run(cfg)
    target = resume_target(cfg)
    if target is not None:
        cfg = load_config(target)  # a resumed run keeps the settings it started with
    prep = prepare(cfg)
    run = open_run(cfg, target)
    run.update(init_from=str(cfg.init_from))
    figures = supervise(run, "rl", lambda: fit(cfg, run, prep))
    summary = run.finish("completed", **figures, dataset=str(prep.dataset.dir))
    console.print(f"[green]done[/] {run.dir}  val_acc {figures['start_val_acc']:.4f} -> "
                  f"{figures['final_val_acc']:.4f} (best {figures['best_val_acc']:.4f})")
    return summary
