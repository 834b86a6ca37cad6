"""MNNS data, traces and CSFT targets against brute force over every sign pattern."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from tasks import TaskConfigError, get_task


def mnns(**overrides):
    cfg = {"name": "mnns", "lo": 1, "hi": 9, "seq_length": 4, "max_instances": 200_000, "val_fraction": 0.2, "seed": 0}
    cfg.update(overrides)
    return get_task(SimpleNamespace(**cfg))


def brute_force(digits):
    """Every sign pattern with + before - lexicographically, its partial sums, the answer and the trace."""
    patterns = list(itertools.product((1, -1), repeat=len(digits)))
    sums = [list(itertools.accumulate(s * x for s, x in zip(p, digits, strict=True))) for p in patterns]
    answer = min(s[-1] for s in sums if s[-1] >= 0)
    ranked = sorted((s[-1], tuple(0 if x == 1 else 1 for x in p), s) for p, s in zip(patterns, sums, strict=True)
                    if s[-1] >= 0)
    return sums, answer, ranked


CONFIGS = [dict(lo=1, hi=9, seq_length=4), dict(lo=0, hi=3, seq_length=3), dict(lo=2, hi=5, seq_length=5),
           dict(lo=1, hi=4, seq_length=1)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_answers_traces_and_targets_match_brute_force(cfg):
    task = mnns(**cfg)
    data = task.build()
    m = cfg["seq_length"]
    full = task.step_targets(data)
    budgets = [1, 2, 3, 2**m] if m > 1 else [1, 2]
    targets = {b: task.step_targets(data, b) for b in budgets}
    sum_token = {v: data.vocab.index(f"S{v}") for v in range(-m * cfg["hi"], m * cfg["hi"] + 1)}
    picks = torch.randperm(len(data.records), generator=torch.Generator().manual_seed(0))[:150]
    for i in picks.tolist():
        rec = data.records[i]
        sums, answer, ranked = brute_force(rec["digits"])
        assert rec["answer"] == answer
        assert rec["trace"] == ranked[0][2]
        assert data.answer[i] == sum_token[answer]
        assert data.trace[i].tolist() == [sum_token[v] for v in ranked[0][2][:-1]]
        for t in range(m - 1):
            expected = torch.zeros(len(data.vocab))
            for s in sums:  # every pattern: #prefixes with this sum / 2^t
                expected[sum_token[s[t]]] += 1 / len(sums)
            torch.testing.assert_close(full[i, t], expected)
            for b in budgets[:-1]:
                chosen = ranked[:b]
                expected = torch.zeros(len(data.vocab))
                for _, _, s in chosen:
                    expected[sum_token[s[t]]] += 1 / len(chosen)
                torch.testing.assert_close(targets[b][i, t], expected)


def test_budget_one_is_the_discrete_trace():
    task = mnns(hi=6, seq_length=4)
    data = task.build()
    one = task.step_targets(data, 1)
    assert torch.equal(one.argmax(-1), data.trace)
    assert torch.allclose(one.max(-1).values, torch.ones(()))


def test_reference_counts_and_answer_histogram():
    task = mnns()
    data = task.build()
    stats = task.statistics(data)
    assert stats["instances"] == 6561
    assert stats["answer_histogram"] == {0: 1569, 1: 2444, 2: 1324, 3: 664, 4: 320, 5: 152, 6: 64, 7: 20, 8: 4}
    assert stats["vocab_size"] == 4 + 10 + 73
    assert 5000 < stats["splits"]["train"] < 5500


def test_split_keeps_permutations_together():
    data = mnns(seq_length=4, hi=7).build()
    side = {}
    for rec in data.records:
        key = tuple(sorted(rec["digits"]))
        assert side.setdefault(key, rec["split"]) == rec["split"]
    assert Counter(side.values()).keys() == {"train", "valid"}


def test_large_spaces_are_sampled_with_the_seed():
    a = mnns(hi=9, seq_length=6, max_instances=500).build()
    b = mnns(hi=9, seq_length=6, max_instances=500).build()
    c = mnns(hi=9, seq_length=6, max_instances=500, seed=1).build()
    assert len(a.records) == 500 and torch.equal(a.prompt, b.prompt) and not torch.equal(a.prompt, c.prompt)


@pytest.mark.parametrize(
    "overrides, fragment",
    [(dict(lo=5, hi=2), "task.lo=5 > task.hi=2"), (dict(lo=-1), "task.lo=-1"), (dict(seq_length=0), "seq_length=0")],
)
def test_bad_settings_name_the_value(overrides, fragment):
    with pytest.raises(TaskConfigError, match=fragment):
        mnns(**overrides)


@pytest.mark.parametrize("budget", [0, 17])
def test_budget_out_of_range(budget):
    task = mnns(hi=3)
    with pytest.raises(TaskConfigError, match=f"B={budget}.*1..16"):
        task.step_targets(task.build(), budget)
