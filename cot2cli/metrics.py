"""Scores over samples and the parallelism of continuous tokens, as pure tensor functions.

- pass@k: Chen et al. (2021)'s unbiased estimator from n samples with c correct, so that
  every k <= n is estimated from the same samples with less variance than drawing k.
- majority@k: the most frequent answer among k samples, ties to the smallest token id,
  estimated over the n // k disjoint groups of k samples.
- diagnostics: how spread a continuous token is (entropy, exp(entropy)) and how much of it
  sits on states a complete search could be in at that step.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIAGNOSTICS = ("entropy", "effective_support", "valid_mass", "valid_states_above_threshold", "valid_states")


def pass_at_k(n_correct: Tensor, n_samples: int, k: int) -> Tensor:
    """[...] correct counts out of n_samples -> [...] float64 chance that k of the samples hold a correct one.

    1 - C(n-c, k) / C(n, k), written as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no large
    binomials, and exactly 1 when n - c < k (a factor is then 0).
    """
    if not 1 <= k <= n_samples:
        raise ValueError(f"k={k} must be in 1..n_samples={n_samples}")
    if bool(((n_correct < 0) | (n_correct > n_samples)).any()):
        raise ValueError(f"correct counts must be in 0..n_samples={n_samples}")
    i = torch.arange(1, n_samples + 1, dtype=torch.float64, device=n_correct.device)
    incorrect = (n_samples - n_correct).to(torch.float64).unsqueeze(-1)
    factors = torch.where(i > incorrect, 1.0 - k / i, torch.ones_like(i))
    return 1.0 - factors.prod(-1)


def majority_vote(samples: Tensor, vocab_size: int) -> Tensor:
    """[..., n] token ids -> [...] the most frequent id; ties go to the smallest id, so votes are reproducible."""
    counts = torch.zeros(*samples.shape[:-1], vocab_size, dtype=torch.long, device=samples.device)
    counts.scatter_add_(-1, samples, torch.ones_like(samples))
    # Count first, then the reversed id: the score has a single maximum.
    tie_break = torch.arange(vocab_size - 1, -1, -1, device=samples.device)
    return (counts * vocab_size + tie_break).argmax(-1)


def majority_at_k(samples: Tensor, answer: Tensor, k: int, vocab_size: int) -> Tensor:
    """[N, n] sampled answers, [N] true answers -> [N] share of the n // k disjoint k-groups whose vote is right.

    The groups are independent draws of k samples, so their mean is an unbiased
    estimate of majority@k that uses every group the samples allow.
    """
    n_instances, n_samples = samples.shape
    if not 1 <= k <= n_samples:
        raise ValueError(f"k={k} must be in 1..n_samples={n_samples}")
    groups = n_samples // k
    votes = majority_vote(samples[:, : groups * k].reshape(n_instances, groups, k), vocab_size)
    return (votes == answer.unsqueeze(1)).to(torch.float64).mean(1)


def parallelism_diagnostics(probs: Tensor, valid: Tensor, threshold: float) -> dict[str, Tensor]:
    """Per instance and step ([N, S] each) from continuous tokens probs [N, S, V] and reachable states valid [N, S, V].

    entropy (nats), effective_support = exp(entropy) (how many equally likely tokens it
    is worth), valid_mass (probability on reachable states), valid_states_above_threshold
    (reachable states holding at least `threshold`), valid_states (how many are reachable).
    """
    if probs.shape != valid.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and valid {tuple(valid.shape)} differ in shape")
    entropy = torch.special.entr(probs).sum(-1)
    valid = valid.to(torch.bool)
    return {
        "entropy": entropy,
        "effective_support": entropy.exp(),
        "valid_mass": (probs * valid).sum(-1),
        "valid_states_above_threshold": ((probs >= threshold) & valid).sum(-1).to(probs.dtype),
        "valid_states": valid.sum(-1).to(probs.dtype),
    }
