"""The small interface every task implements, and the tensors it hands to the stages.

A task turns its config into a `TaskData`: left-padded prompts, a fixed number of
reasoning steps, one answer token, a split, and whatever it needs to build the CSFT step
targets for a supervision budget. Stages never look inside a task beyond this file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

PAD, BOS, EOS, ARROW = "<PAD>", "<BOS>", "<EOS>", "->"
SPLITS = ("train", "valid", "test")


class TaskConfigError(ValueError):
    """A task setting that cannot work; the message is one line naming the value and what is allowed."""


@dataclass
class TaskData:
    """Everything a stage needs from a task, as tensors (saved to `data.pt`)."""

    vocab: list[str]
    prompt: torch.Tensor  # [N, P] long, left-padded with <PAD> (id 0)
    trace: torch.Tensor  # [N, S] long, the discrete chain of thought (one optimal trace)
    answer: torch.Tensor  # [N] long, the answer token
    split: torch.Tensor  # [N] long, index into SPLITS
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # task-specific, for step targets
    records: list[dict[str, Any]] = field(default_factory=list)  # human-readable rows for instances.jsonl

    @property
    def n_steps(self) -> int:
        return self.trace.shape[1]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def indices(self, split: str) -> torch.Tensor:
        return torch.nonzero(self.split == SPLITS.index(split)).flatten()

    def tensors(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab,
            "prompt": self.prompt,
            "trace": self.trace,
            "answer": self.answer,
            "split": self.split,
            "extra": self.extra,
        }

    @classmethod
    def from_tensors(cls, saved: dict[str, Any]) -> TaskData:
        return cls(**{k: saved[k] for k in ("vocab", "prompt", "trace", "answer", "split", "extra")})


class Task(ABC):
    """One search task: vocabulary, instances, split, traces, CSFT step targets, answer check."""

    name: ClassVar[str]
    Config: ClassVar[type]  # the dataclass behind conf/task/<name>.yaml

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def fingerprint(self) -> Any:
        """What determines the data (hashed into the dataset directory name); importers add file digests."""
        from omegaconf import OmegaConf

        return OmegaConf.to_container(self.cfg, resolve=True) if OmegaConf.is_config(self.cfg) else vars(self.cfg)

    @abstractmethod
    def build(self) -> TaskData:
        """Generate (or import) every instance, already split."""

    @abstractmethod
    def max_budget(self, data: TaskData) -> int:
        """The largest meaningful supervision budget B (number of traces); B = max means all of them."""

    @abstractmethod
    def step_targets(self, data: TaskData, budget: int | None = None) -> torch.Tensor:
        """CSFT targets alpha*_t as a [N, S, V] float tensor; budget None means every trace."""

    def valid_states(self, data: TaskData) -> torch.Tensor:
        """[N, S, V] bool: the states a complete search can be in at each step."""
        return self.step_targets(data, None) > 0

    def check_answer(self, predicted: torch.Tensor, data: TaskData, index: torch.Tensor) -> torch.Tensor:
        """[n] bool: is each predicted answer token right for the instances `index`? (RL reward)."""
        return predicted == data.answer[index]

    def statistics(self, data: TaskData) -> dict[str, Any]:
        """Figures that `cot2 generate` prints next to where it wrote the data."""
        counts = {s: int((data.split == i).sum()) for i, s in enumerate(SPLITS)}
        return {"instances": int(data.answer.numel()), "splits": counts, "vocab_size": data.vocab_size}

    def check_budget(self, data: TaskData, budget: int | None) -> int:
        """Resolve a budget to an int, or fail with one line naming what is allowed."""
        return resolve_budget(budget, self.max_budget(data))


def resolve_budget(budget: int | None, top: int) -> int:
    """`budget`, or `top` for None; one line naming what is allowed when it is outside 1..top."""
    if budget is None:
        return top
    if not 1 <= budget <= top:
        raise TaskConfigError(f"budget B={budget} is out of range: allowed 1..{top} (or null for all)")
    return budget


def path_histogram(paths: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-step distribution of weighted paths: paths [N, M, S] token ids, weight [N, M] -> [N, S, V]."""
    n, m, s = paths.shape
    out = torch.zeros(n, s, vocab_size)
    w = weight.to(out.dtype).unsqueeze(-1).expand(n, m, s)
    out.scatter_add_(2, paths.permute(0, 2, 1), w.permute(0, 2, 1))
    total = out.sum(-1, keepdim=True)
    return out / total.clamp_min(1e-12)
