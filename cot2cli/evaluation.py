"""The validation split on the device, and the deterministic scores every stage reports on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cot2cli.data import Dataset
from cot2cli.methods import Batch, decode, method_loss, reasoning_steps
from cot2cli.model import GPT
from tasks import TaskData


@dataclass
class Split:
    """One split's tensors on the device, in the layout every method reads."""

    prompt: torch.Tensor
    trace: torch.Tensor
    answer: torch.Tensor
    targets: torch.Tensor | None

    @classmethod
    def of(cls, data: TaskData, index: torch.Tensor, n_steps: int, device: torch.device | str,
           targets: torch.Tensor | None = None, prompt: torch.Tensor | None = None) -> Split:
        """The rows `index` of a dataset with the first n_steps trace tokens (targets already indexed)."""
        prompt = data.prompt[index] if prompt is None else prompt
        return cls(prompt.to(device), data.trace[index, :n_steps].to(device), data.answer[index].to(device),
                   None if targets is None else targets.to(device))

    def __len__(self) -> int:
        return self.answer.numel()

    def batch(self, index: torch.Tensor | slice) -> Batch:
        targets = None if self.targets is None else self.targets[index]
        return Batch(self.prompt[index], self.trace[index], self.answer[index], targets)


def load_splits(dataset: Dataset, names: tuple[str, ...], method_cfg: Any, device: torch.device | str) -> list[Split]:
    """The named splits in the layout of the method; CSFT step targets are built once for all of them."""
    data, method = dataset.data, str(method_cfg.name)
    n_steps = reasoning_steps(method, data.n_steps)
    targets = dataset.task.step_targets(data, method_cfg.budget) if method == "cot2" else None
    splits = []
    for name in names:
        index = data.indices(name)
        splits.append(Split.of(data, index, n_steps, device, None if targets is None else targets[index]))
    return splits


@contextmanager
def eval_mode(model: GPT) -> Iterator[None]:
    """No dropout inside the block; the model's previous mode comes back afterwards, also on errors."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def chunks(n: int, size: int) -> Iterator[slice]:
    return (slice(start, start + size) for start in range(0, n, size))


@torch.no_grad()
def accuracy(model: GPT, method: str, split: Split, n_steps: int, batch_size: int) -> float:
    """Share of answers right under the method's own decoding, over the whole split in large batches."""
    correct = 0
    with eval_mode(model):
        for part in chunks(len(split), batch_size):
            correct += int((decode(model, method, split.prompt[part], n_steps) == split.answer[part]).sum())
    return correct / max(1, len(split))


@torch.no_grad()
def validation_loss(model: GPT, method_cfg: Any, split: Split, epoch: int, batch_size: int) -> float:
    total = 0.0
    with eval_mode(model):
        for part in chunks(len(split), batch_size):
            batch = split.batch(part)
            total += float(method_loss(model, method_cfg, batch, epoch).total) * batch.answer.numel()
    return total / max(1, len(split))
