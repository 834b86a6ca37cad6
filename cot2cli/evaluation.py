"""The validation split on the device, and the deterministic scores every stage reports on it."""

from __future__ import annotations

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


@torch.no_grad()
def accuracy(model: GPT, method: str, split: Split, n_steps: int, batch_size: int) -> float:
    """Share of answers right under the method's own decoding, over the whole split in large batches."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        part = slice(start, start + batch_size)
        correct += int((decode(model, method, split.prompt[part], n_steps) == split.answer[part]).sum())
    model.train(was_training)
    return correct / max(1, len(split))


@torch.no_grad()
def validation_loss(model: GPT, method_cfg: Any, split: Split, epoch: int, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(split), batch_size):
        part = slice(start, start + batch_size)
        batch = split.batch(part)
        total += float(method_loss(model, method_cfg, batch, epoch).total) * batch.answer.numel()
    model.train(was_training)
    return total / max(1, len(split))
