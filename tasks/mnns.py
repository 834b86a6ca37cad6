"""MNNS, minimum non-negative sum: sign the digits x_1..x_m so the sum is as small as possible but >= 0.

Sequence layout (S = m - 1 reasoning steps):
    prompt  <BOS> D(x_1) .. D(x_m) ->
    steps   S(p_1) .. S(p_{m-1})     partial sums of one optimal sign pattern
    answer  S(p_m) = S(y)
Sign patterns are ordered lexicographically with + before -; the discrete trace is the
first optimal pattern, and a budget B < 2^m supervises the first B non-negative patterns
sorted by (final sum, pattern). B = 2^m supervises every pattern.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.base import ARROW, BOS, EOS, PAD, SPLITS, Task, TaskConfigError, TaskData, path_histogram

MAX_SEQ_LENGTH = 12  # 2^m sign patterns per instance are enumerated


def sign_table(m: int) -> torch.Tensor:
    """[2^m, m] signs in lexicographic order with + before - (bit 1 = minus, most significant first)."""
    idx = torch.arange(2**m).unsqueeze(1)
    bits = (idx >> torch.arange(m - 1, -1, -1)) & 1
    return 1 - 2 * bits


@dataclass
class MNNSConfig:
    name: str = "mnns"
    lo: int = field(default=1, metadata={"help": "smallest digit (>= 0)"})
    hi: int = field(default=9, metadata={"help": "largest digit"})
    seq_length: int = field(default=4, metadata={"help": f"digits per instance m (1..{MAX_SEQ_LENGTH})"})
    max_instances: int = field(default=200_000, metadata={"help": "enumerate every sequence up to this many"})
    val_fraction: float = field(default=0.2, metadata={"help": "fraction of digit multisets held out for validation"})
    seed: int = field(default=0, metadata={"help": "seed of the sample and of the split"})


class MNNS(Task):
    name = "mnns"
    Config = MNNSConfig

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        lo, hi, m = int(cfg.lo), int(cfg.hi), int(cfg.seq_length)
        if lo < 0:
            raise TaskConfigError(f"task.lo={lo} is negative: digits must be >= 0")
        if lo > hi:
            raise TaskConfigError(f"task.lo={lo} > task.hi={hi}: need lo <= hi")
        if not 1 <= m <= MAX_SEQ_LENGTH:
            raise TaskConfigError(f"task.seq_length={m} is out of range: allowed 1..{MAX_SEQ_LENGTH}")
        if cfg.max_instances < 1:
            raise TaskConfigError(f"task.max_instances={cfg.max_instances} must be >= 1")
        if not 0.0 < cfg.val_fraction < 1.0:
            raise TaskConfigError(f"task.val_fraction={cfg.val_fraction} must be in (0, 1)")
        self.lo, self.hi, self.m = lo, hi, m
        self.max_sum = m * hi
        self.vocab = [PAD, BOS, EOS, ARROW]
        self.vocab += [f"D{d}" for d in range(hi + 1)]
        self.vocab += [f"S{v}" for v in range(-self.max_sum, self.max_sum + 1)]
        self.digit_offset = self.vocab.index("D0")
        self.zero_sum = self.vocab.index("S0")  # token of partial sum v: zero_sum + v

    # -- instances -----------------------------------------------------------------------
    def _digit_rows(self) -> list[tuple[int, ...]]:
        base, m = self.hi - self.lo + 1, self.m
        total = base**m
        codes = range(total)
        if total > self.cfg.max_instances:
            codes = sorted(random.Random(self.cfg.seed).sample(codes, self.cfg.max_instances))
        rows = []
        for code in codes:
            row = []
            for _ in range(m):
                code, r = divmod(code, base)
                row.append(self.lo + r)
            rows.append(tuple(reversed(row)))
        return rows

    def _split(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        """80/20 by digit multiset, so no permutation of a validation instance is seen in training."""
        groups = sorted({tuple(sorted(r)) for r in rows})
        random.Random(self.cfg.seed).shuffle(groups)
        n_train = round((1.0 - self.cfg.val_fraction) * len(groups))
        train = set(groups[:n_train])
        return torch.tensor([0 if tuple(sorted(r)) in train else SPLITS.index("valid") for r in rows])

    def partial_sums(self, digits: torch.Tensor) -> torch.Tensor:
        """[N, 2^m, m] partial sums of every sign pattern."""
        return torch.cumsum(digits.unsqueeze(1) * sign_table(self.m).unsqueeze(0), dim=-1)

    def pattern_order(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patterns sorted by (final sum, pattern) with negative finals last; and the count of non-negative ones."""
        final = sums[..., -1]
        n_patterns = final.shape[1]
        key = torch.where(final >= 0, final * n_patterns, (self.max_sum + 1) * n_patterns)
        key = key + torch.arange(n_patterns)
        return torch.argsort(key, dim=1), (final >= 0).sum(1)

    def _chunks(self, digits: torch.Tensor) -> list[torch.Tensor]:
        """Row blocks of about 2^20 sign patterns, so partial_sums stays small however many instances."""
        return torch.split(digits, max(1, 2**20 // 2**self.m))

    def build(self) -> TaskData:
        rows = self._digit_rows()
        digits = torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.m)
        split = self._split(rows)
        traces = []
        for chunk in self._chunks(digits):
            sums = self.partial_sums(chunk)
            order, _ = self.pattern_order(sums)
            traces.append(sums[torch.arange(len(chunk)), order[:, 0]])  # [n, m]: the first optimal pattern
        trace_sums = torch.cat(traces)
        answer = trace_sums[:, -1]
        n = len(rows)
        prompt = torch.cat([torch.full((n, 1), self.vocab.index(BOS)), self.digit_offset + digits,
                            torch.full((n, 1), self.vocab.index(ARROW))], 1)
        records = [
            {"digits": list(r), "answer": a, "trace": t, "split": SPLITS[s]}
            for r, a, t, s in zip(rows, answer.tolist(), trace_sums.tolist(), split.tolist(), strict=True)
        ]
        return TaskData(
            vocab=self.vocab,
            prompt=prompt,
            trace=self.zero_sum + trace_sums[:, :-1],
            answer=self.zero_sum + answer,
            split=split,
            extra={"digits": digits},
            records=records,
        )

    # -- supervision ---------------------------------------------------------------------
    def max_budget(self, data: TaskData) -> int:
        return 2**self.m

    def step_targets(self, data: TaskData, budget: int | None = None) -> torch.Tensor:
        budget = self.check_budget(data, budget)
        digits = data.extra["digits"]
        out = torch.empty(len(digits), self.m - 1, len(self.vocab))
        start = 0
        for chunk in self._chunks(digits):
            sums = self.partial_sums(chunk)
            if budget == 2**self.m:
                weight = torch.ones(sums.shape[:2])
            else:
                order, n_nonneg = self.pattern_order(sums)
                rank = torch.empty_like(order)
                rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
                weight = (rank < torch.clamp(n_nonneg, max=budget).unsqueeze(1)).float()
            paths = self.zero_sum + sums[..., :-1]
            out[start : start + len(chunk)] = path_histogram(paths, weight, len(self.vocab))
            start += len(chunk)
        return out

    def statistics(self, data: TaskData) -> dict[str, Any]:
        stats = super().statistics(data)
        values = (data.answer - self.zero_sum).tolist()
        stats["answer_histogram"] = dict(sorted(Counter(values).items()))
        return stats
