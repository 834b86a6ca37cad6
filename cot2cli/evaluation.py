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


@dataclass
class Split:
    """One split's tensors on the device, in the layout every method reads."""

    prompt: torch.Tensor
    trace: torch.Tensor
    answer: torch.Tensor
    targets: torch.Tensor | None

    def __len__(self) -> int:
        return self.answer.numel()

    def batch(self, index: torch.Tensor | slice) -> Batch:
        targets = None if self.targets is None else self.targets[index]
        return Batch(self.prompt[index], self.trace[index], self.answer[index], targets)


def load_split(dataset: Dataset, split: str, method_cfg: Any, device: torch.device) -> Split:
    data, index = dataset.data, dataset.data.indices(split)
    n_steps = reasoning_steps(str(method_cfg.name), data.n_steps)
    targets = None
    if str(method_cfg.name) == "cot2":
        targets = dataset.task.step_targets(data, method_cfg.budget)[index].to(device)
    return Split(data.prompt[index].to(device), data.trace[index, :n_steps].to(device), data.answer[index].to(device),
                 targets)


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
