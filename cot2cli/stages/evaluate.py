"""cot2 eval: the scores of one run's checkpoint, added to that run (eval.csv, summary.json).

Every model gets its method's deterministic accuracy. Discrete and no-CoT models also get
sampled answers at each temperature (pass@k, majority@k); CoT2 models (and RL runs started
from one) get multi-token-sampled answers for each K and temperature, and the parallelism
diagnostics of their deterministic continuous tokens. COCONUT's thoughts are hidden states
with no distribution to sample from, so it gets the deterministic accuracy only.

Nothing new is created: the run's checkpoints are only read; eval.csv gains rows (long
format) and summary.json an `eval` key holding the latest evaluation (left alone while a
training process still writes the run). Sampling draws from one generator per
(temperature, K), seeded from `seed`, so a figure does not depend on which other
temperatures or K were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import Tensor

from cot2cli.checkpoints import CHECKPOINT_FILES, load_checkpoint, model_from_checkpoint
from cot2cli.continuous import rollout
from cot2cli.data import Dataset, load_dataset
from cot2cli.determinism import resolve_device
from cot2cli.errors import Cot2Error
from cot2cli.evaluation import Split, accuracy, chunks
from cot2cli.methods import reasoning_steps
from cot2cli.metrics import DIAGNOSTICS, majority_at_k, parallelism_diagnostics, pass_at_k
from cot2cli.model import GPT
from cot2cli.runs import MetricsLog, Run, find_run, load_config, try_lock
from cot2cli.stages import console, hydra_stage

EVAL_COLUMNS = ["checkpoint", "split", "metric", "k", "temperature", "K", "step", "value"]
SOFT_METHODS = ("cot2",)  # fed a distribution over the vocabulary: MTS sampling and diagnostics apply
SAMPLED_METHODS = ("discrete", "nocot")  # discrete tokens: sampled at temperature T
DIAGNOSTIC_HEADERS = {"entropy": "entropy", "effective_support": "exp(entropy)", "valid_mass": "valid mass",
                      "valid_states_above_threshold": "valid >= {threshold:g}", "valid_states": "reachable"}
SHOWN_STATES = 8  # at most this many states per continuous token in eval.show


@dataclass
class Row:
    """One line of eval.csv; None where a column does not apply."""

    metric: str
    value: float
    k: int | None = None
    temperature: float | None = None
    K: int | None = None
    step: int | None = None


@dataclass
class Target:
    """What is evaluated: the model, its method and the split it is scored on."""

    run_dir: Path
    method: str
    model: GPT
    dataset: Dataset
    split: Split
    index: Tensor  # the split's rows in the dataset
    n_steps: int
    device: torch.device

    @cached_property
    def valid_states(self) -> Tensor:
        """[n, S, V] the states reachable at each step of the split's instances (diagnostics and --show)."""
        return self.dataset.task.valid_states(self.dataset.data)[self.index]


def check_settings(settings: DictConfig) -> None:
    """Reject settings that cannot work before anything is loaded."""
    if settings.n_samples < 1:
        raise Cot2Error(f"eval.n_samples={settings.n_samples} must be at least 1")
    if any(k < 1 for k in settings.pass_k):
        raise Cot2Error(f"eval.pass_k={list(settings.pass_k)} must hold positive k")
    if settings.pass_k and max(settings.pass_k) > settings.n_samples:
        raise Cot2Error(f"eval.n_samples={settings.n_samples} is below the largest eval.pass_k "
                        f"({max(settings.pass_k)}): raise n_samples or drop that k")
    if any(t <= 0 for t in settings.temperatures):
        raise Cot2Error(f"eval.temperatures={list(settings.temperatures)} must be positive")
    if any(K < 1 for K in settings.mts_K):
        raise Cot2Error(f"eval.mts_K={list(settings.mts_K)} must hold K >= 1")
    if not 0.0 < settings.mass_threshold <= 1.0:
        raise Cot2Error(f"eval.mass_threshold={settings.mass_threshold} must be in (0, 1]")
    if settings.show < 0:
        raise Cot2Error(f"eval.show={settings.show} must be non-negative")
    if settings.batch_size < 1:
        raise Cot2Error(f"eval.batch_size={settings.batch_size} must be at least 1")


def imported_dataset(task_cfg: DictConfig, source: str, outputs: str) -> Dataset:
    """The run's task settings with task.source=<file>: the same vocabulary, other instances."""
    if "source" not in task_cfg:
        raise Cot2Error(f"eval.source: task {task_cfg.name} imports nothing (it has no task.source setting)")
    return load_dataset(OmegaConf.merge(task_cfg, {"source": source}), outputs)


def pad_prompts(prompt: Tensor, width: int, where: Path) -> Tensor:
    """Left-pad prompts with <PAD> (id 0) to the training prompts' width."""
    if prompt.shape[1] > width:
        raise Cot2Error(f"prompts of {where} are {prompt.shape[1]} tokens, wider than the {width} the model was "
                        "trained on")
    return torch.cat([prompt.new_zeros(prompt.shape[0], width - prompt.shape[1]), prompt], dim=1)


def load_target(cfg: DictConfig) -> Target:
    """The run's checkpoint as a model in eval mode, and its dataset's split on the device."""
    if not cfg.run:
        raise Cot2Error(f"run= is required: the name or path of a run under {cfg.paths.outputs}/runs or /sweeps")
    run_dir = find_run(cfg.run, cfg.paths.outputs)
    run_cfg = load_config(run_dir)
    if "method" not in run_cfg or run_cfg.method is None:
        raise Cot2Error(f"{run_dir}/config.yaml names no method: cannot tell how the model decodes")
    checkpoint_path = run_dir / CHECKPOINT_FILES[str(cfg.checkpoint)]
    if not checkpoint_path.exists():
        others = [name for name, file in CHECKPOINT_FILES.items() if (run_dir / file).exists()]
        hint = f"; it has checkpoint={', '.join(others)}" if others else "; it has no checkpoint yet"
        raise Cot2Error(f"run {run_dir} has no {checkpoint_path.name}{hint}")
    device = resolve_device(cfg.device)
    state = load_checkpoint(checkpoint_path, device)
    dataset = load_dataset(run_cfg.task, cfg.paths.outputs)
    width = dataset.data.prompt.shape[1]  # positions are absolute: other data must end where training prompts end
    if cfg.eval.source:
        dataset = imported_dataset(run_cfg.task, cfg.eval.source, cfg.paths.outputs)
    data = dataset.data
    if "vocab" in state and list(state["vocab"]) != list(data.vocab):
        raise Cot2Error(f"{checkpoint_path} was trained on another vocabulary than the dataset {dataset.dir}")
    split_name = str(cfg.eval.split)
    index = data.indices(split_name)
    if index.numel() == 0:
        raise Cot2Error(f"split {split_name!r} of {dataset.dir} is empty: pick another eval.split")
    method = str(run_cfg.method.name)
    n_steps = reasoning_steps(method, data.n_steps)
    split = Split.of(data, index, n_steps, device, prompt=pad_prompts(data.prompt[index], width, dataset.dir))
    model = model_from_checkpoint(state, device).eval()
    return Target(run_dir, method, model, dataset, split, index, n_steps, device)


def sampling_generator(seed: int, temperature: float, K: int, device: torch.device) -> torch.Generator:
    """One stream per (temperature, K), so each figure is reproducible on its own."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + round(temperature * 1000) * 101 + K)
    return generator


@torch.no_grad()
def sample_answers(target: Target, settings: DictConfig, temperature: float, K: int,
                   generator: torch.Generator) -> Tensor:
    """[N, n_samples] answers of multi-token-sampled rollouts (K = 1: discrete sampling) at `temperature`.

    Prompts are repeated n_samples times within chunks of eval.batch_size rollouts. The
    rollout reads the answer off untempered logits, so it is drawn here at the same temperature.
    """
    n_samples = settings.n_samples
    prompts_per_chunk = max(1, settings.batch_size // n_samples)
    answers = []
    for start in range(0, len(target.split), prompts_per_chunk):
        prompts = target.split.prompt[start : start + prompts_per_chunk].repeat_interleave(n_samples, dim=0)
        fed = rollout(target.model, prompts, target.n_steps, "mts", K=K, temperature=temperature, generator=generator)
        if settings.sample_answer:
            probs = (fed.answer_logits / temperature).softmax(-1)
            answer = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            answer = fed.answer_logits.argmax(-1)
        answers.append(answer.view(-1, n_samples))
    return torch.cat(answers)


def sample_rows(samples: Tensor, answer: Tensor, pass_k: list[int], vocab_size: int, temperature: float,
                K: int | None) -> list[Row]:
    """Mean single-sample accuracy, pass@k and majority@k over the split."""
    correct = samples == answer.unsqueeze(1)
    n_correct = correct.sum(1)
    rows = [Row("sample_acc", float(correct.double().mean()), temperature=temperature, K=K)]
    for k in pass_k:
        rows.append(Row("pass@k", float(pass_at_k(n_correct, samples.shape[1], k).mean()), k, temperature, K))
        rows.append(Row("maj@k", float(majority_at_k(samples, answer, k, vocab_size).mean()), k, temperature, K))
    return rows


@torch.no_grad()
def softmax_rollout_rows(target: Target, settings: DictConfig, valid: Tensor) -> tuple[float, list[Row]]:
    """One pass of the deterministic (softmax-fed) rollout: its accuracy, and the per-step means of the
    parallelism diagnostics of its continuous tokens."""
    totals = {name: torch.zeros(target.n_steps, dtype=torch.float64) for name in DIAGNOSTICS}
    correct = 0
    for part in chunks(len(target.split), settings.batch_size):
        fed = rollout(target.model, target.split.prompt[part], target.n_steps, "softmax")
        correct += int((fed.answer == target.split.answer[part]).sum())
        found = parallelism_diagnostics(fed.step_inputs, valid[part].to(target.device), settings.mass_threshold)
        for name in DIAGNOSTICS:
            totals[name] += found[name].sum(0).double().cpu()
    rows = [Row(name, float(totals[name][step] / len(target.split)), step=step + 1)
            for name in DIAGNOSTICS for step in range(target.n_steps)]
    return correct / max(1, len(target.split)), rows


def evaluate(target: Target, cfg: DictConfig) -> list[Row]:
    """Every figure that applies to the target's method."""
    settings = cfg.eval
    diagnostics: list[Row] = []
    if target.method in SOFT_METHODS and target.n_steps > 0:  # its deterministic decoding is this rollout
        acc, diagnostics = softmax_rollout_rows(target, settings, target.valid_states)
    else:
        acc = accuracy(target.model, target.method, target.split, target.n_steps, settings.batch_size)
    rows = [Row("acc", acc)]
    pass_k = sorted(set(settings.pass_k))
    vocab_size = target.dataset.data.vocab_size
    if target.method in SAMPLED_METHODS or target.method in SOFT_METHODS:
        sampled_K = [None] if target.method in SAMPLED_METHODS else list(settings.mts_K)
        for K in sampled_K:
            for temperature in settings.temperatures:
                generator = sampling_generator(cfg.seed, temperature, K or 1, target.device)
                samples = sample_answers(target, settings, temperature, K or 1, generator)
                rows += sample_rows(samples, target.split.answer, pass_k, vocab_size, temperature, K)
    return rows + diagnostics


def sampler_label(row: Row) -> str:
    return f"T={row.temperature:g}" if row.K is None else f"K={row.K},T={row.temperature:g}"


def summary_of(rows: list[Row], checkpoint: str, split: str, n_instances: int) -> dict[str, Any]:
    """The nested form stored under summary.json's `eval` key."""
    result: dict[str, Any] = {"checkpoint": checkpoint, "split": split, "n_instances": n_instances}
    for row in rows:
        if row.metric == "acc":
            result["acc"] = row.value
        elif row.step is not None:
            result.setdefault("diagnostics", {}).setdefault(row.metric, []).append(row.value)
        else:
            sampler = result.setdefault("sampling", {}).setdefault(sampler_label(row), {})
            if row.k is None:
                sampler["acc"] = row.value
            else:
                sampler.setdefault(row.metric, {})[str(row.k)] = row.value
    return result


def print_results(target: Target, rows: list[Row], checkpoint: str, split: str, mass_threshold: float) -> None:
    console.print(f"[bold]{target.run_dir}[/]  method {target.method}  checkpoint {checkpoint}  "
                  f"split {split} ({len(target.split)} instances)")
    acc = next(r.value for r in rows if r.metric == "acc")
    console.print(f"deterministic accuracy: [bold]{100 * acc:.2f}%[/]")
    sampled = [r for r in rows if r.temperature is not None]
    if sampled:
        kind = "discrete sampling" if target.method in SAMPLED_METHODS else "multi-token sampling"
        ks = sorted({r.k for r in sampled if r.k is not None})
        values = {(sampler_label(r), r.metric, r.k): r.value for r in sampled}
        labels = list(dict.fromkeys(sampler_label(r) for r in sampled))
        for metric, title in (("pass@k", "pass@k"), ("maj@k", "majority@k")):
            table = Table(title=f"{kind}: {title} (%)")
            table.add_column("k", justify="right")
            for label in labels:
                table.add_column(label, justify="right")
            if 1 not in ks:  # pass@1 and majority@1 are the single-sample accuracy
                table.add_row("1 sample", *(f"{100 * values[(label, 'sample_acc', None)]:.2f}" for label in labels))
            for k in ks:
                table.add_row(str(k), *(f"{100 * values[(label, metric, k)]:.2f}" for label in labels))
            console.print(table)
    stepped = [r for r in rows if r.step is not None]
    if stepped:
        table = Table(title="continuous tokens (softmax-fed), mean over instances")
        table.add_column("step", justify="right")
        for name in DIAGNOSTICS:
            table.add_column(DIAGNOSTIC_HEADERS[name].format(threshold=mass_threshold), justify="right")
        values = {(r.metric, r.step): r.value for r in stepped}
        for step in range(1, target.n_steps + 1):
            table.add_row(str(step), *(f"{values[(name, step)]:.3f}" for name in DIAGNOSTICS))
        console.print(table)


@torch.no_grad()
def show_instances(target: Target, count: int, threshold: float) -> None:
    """Top states of each continuous token of the first `count` instances next to the reachable set."""
    vocab = target.dataset.data.vocab
    shown = slice(0, min(count, len(target.split)))
    prompts = target.split.prompt[shown]
    fed = rollout(target.model, prompts, target.n_steps, "softmax")
    valid = target.valid_states[shown]
    probs = fed.step_inputs.cpu()
    for i in range(prompts.shape[0]):
        prompt = " ".join(vocab[t] for t in prompts[i].tolist() if t != 0)
        answer, predicted = vocab[int(target.split.answer[i])], vocab[int(fed.answer[i])]
        table = Table(title=f"{prompt}  answer {answer}, predicted {predicted}", title_justify="left")
        table.add_column("step", justify="right")
        table.add_column(f"top states (>= {threshold:g}; red: not reachable)")
        table.add_column("reachable states")
        for step in range(target.n_steps):
            p = probs[i, step]
            top = [t for t in p.argsort(descending=True)[:SHOWN_STATES].tolist() if p[t] >= threshold]
            held = ", ".join(f"{vocab[t]} {p[t]:.2f}" if valid[i, step, t] else f"[red]{vocab[t]} {p[t]:.2f}[/]"
                             for t in top)
            reachable = " ".join(vocab[t] for t in valid[i, step].nonzero().flatten().tolist())
            table.add_row(str(step + 1), held, reachable)
        console.print(table)


def merge_into_summary(run_dir: Path, result: dict[str, Any]) -> bool:
    """Put `result` under summary.json's `eval` key, holding the run's lock so that a training
    process writing the same summary cannot lose or undo the change; False while one holds it."""
    lock = try_lock(run_dir)
    if lock is None:
        return False
    with lock:
        Run(run_dir, resumed=False).update(eval=result)
    return True


@hydra_stage("eval")
def main(cfg: DictConfig) -> dict[str, Any]:
    check_settings(cfg.eval)
    target = load_target(cfg)
    checkpoint, split = str(cfg.checkpoint), str(cfg.eval.split)
    if cfg.eval.source:  # rows on imported data must not pass for the run's own split
        split = f"{split}:{Path(cfg.eval.source).name}"
    rows = evaluate(target, cfg)
    MetricsLog(target.run_dir / "eval.csv", EVAL_COLUMNS).extend(
        {"checkpoint": checkpoint, "split": split, "metric": row.metric, "k": row.k, "temperature": row.temperature,
         "K": row.K, "step": row.step, "value": row.value} for row in rows)
    result = summary_of(rows, checkpoint, split, len(target.split))
    print_results(target, rows, checkpoint, split, cfg.eval.mass_threshold)
    if not merge_into_summary(target.run_dir, result):
        console.print(f"[yellow]{target.run_dir} is being written by another process[/]: its summary.json is left "
                      "alone; eval.csv has the figures")
    if cfg.eval.show and target.method in SOFT_METHODS and target.n_steps > 0:
        show_instances(target, cfg.eval.show, cfg.eval.mass_threshold)
    elif cfg.eval.show:
        console.print(f"eval.show: a {target.method} model has no continuous tokens to show")
    console.print(f"[green]wrote[/] {target.run_dir / 'eval.csv'}")
    return result
