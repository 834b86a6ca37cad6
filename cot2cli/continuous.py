"""The CoT2 core: samplers for continuous tokens, the self-fed rollout and its
teacher-forced counterpart, shared by training, RL and evaluation.

A continuous token is a weight vector alpha over the vocabulary; the model sees
alpha^T E. Samplers work on logits of shape [..., V] (usually [N, V]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cot2cli.model import GPT

FEEDS = ("softmax", "argmax", "mts", "dirichlet", "hidden")


def _mts_scaled_logits(logits: Tensor, K: int, normalize: bool, temperature: float) -> Tensor:
    """Dividing by K keeps the average of K draws about as spread as one draw at temperature 1."""
    if K < 1:
        raise ValueError(f"K={K} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    return logits / (temperature * (K if normalize else 1))


def mts_sample(
    logits: Tensor, K: int, normalize: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Multi-token sampling: draw K tokens i.i.d. and average their one-hots.

    Returns (weights = counts / K as float, counts as long), both [..., V].
    K=1 is ordinary discrete sampling.
    """
    probs = _mts_scaled_logits(logits.detach(), K, normalize, temperature).softmax(-1)
    flat_probs = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat_probs, K, replacement=True, generator=generator)
    counts = torch.zeros(flat_probs.shape, dtype=torch.long, device=logits.device)
    counts.scatter_add_(1, draws, torch.ones_like(draws))
    counts = counts.view(probs.shape)
    return counts.to(logits.dtype) / K, counts


def mts_log_prob(logits: Tensor, counts: Tensor, K: int, normalize: bool = True, temperature: float = 1.0) -> Tensor:
    """Log-probability of the K ordered draws behind `counts` (no multinomial coefficient):
    the coefficient does not depend on the logits, so policy gradients do not need it."""
    log_probs = _mts_scaled_logits(logits, K, normalize, temperature).log_softmax(-1)
    # Undrawn tokens contribute nothing, even when their logit is -inf.
    return (counts * log_probs.masked_fill(counts == 0, 0.0)).sum(-1)


def dirichlet_support(logits: Tensor, threshold: float = 1e-3) -> Tensor:
    """Tokens with probability >= threshold, and always the argmax, so no row is empty."""
    support = logits.softmax(-1) >= threshold
    return support.scatter(-1, logits.argmax(-1, keepdim=True), True)


def dirichlet_concentration(logits: Tensor, support: Tensor, gamma: float = 1.0, clamp: float = 1e-3) -> Tensor:
    """gamma * p over the support (zero elsewhere), p = softmax(logits) clamped below
    at `clamp` and renormalised so that near-zero tokens keep a usable concentration."""
    if gamma <= 0:
        raise ValueError(f"gamma={gamma} must be positive")
    probs = logits.softmax(-1).clamp_min(clamp).masked_fill(~support, 0.0)
    return gamma * probs / probs.sum(-1, keepdim=True)


def _log_standard_gamma(concentration: Tensor, generator: torch.Generator | None) -> Tensor:
    """log of Gamma(concentration, 1) variates for a 1-D tensor, drawn from `generator`.

    Marsaglia-Tsang on concentration + 1, then the U^(1/a) boost, all in log space:
    concentrations near gamma * clamp would underflow to 0 otherwise.
    """
    d = concentration + 2.0 / 3.0
    c = (9.0 * d).rsqrt()
    log_gamma = torch.empty_like(concentration)
    pending = torch.arange(concentration.numel(), device=concentration.device)
    while pending.numel() > 0:  # rejection rounds; each accepts over 95% of what is left
        d_p, c_p = d[pending], c[pending]
        normal = torch.randn(pending.shape, generator=generator, dtype=d.dtype, device=d.device)
        uniform = torch.rand(pending.shape, generator=generator, dtype=d.dtype, device=d.device)
        v = (1.0 + c_p * normal) ** 3
        accepted = (v > 0) & (uniform.log() < 0.5 * normal**2 + d_p - d_p * v + d_p * v.log())
        log_gamma[pending[accepted]] = (d_p[accepted] * v[accepted]).log()
        pending = pending[~accepted]
    uniform = torch.rand(concentration.shape, generator=generator, dtype=d.dtype, device=d.device)
    return log_gamma + uniform.log() / concentration


def dirichlet_sample(
    logits: Tensor, gamma: float = 1.0, threshold: float = 1e-3, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """alpha ~ Dirichlet(dirichlet_concentration) over dirichlet_support; returns (alpha, support).

    alpha is floored at the smallest normal float on the support and renormalised,
    so its log-density stays finite however small a coordinate came out.
    """
    logits = logits.detach()
    support = dirichlet_support(logits, threshold)
    concentration = dirichlet_concentration(logits, support, gamma)
    log_gamma = torch.full_like(concentration, -math.inf)
    log_gamma[support] = _log_standard_gamma(concentration[support], generator)
    alpha = log_gamma.softmax(-1)  # G_i / sum G, computed without leaving log space
    alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny).masked_fill(~support, 0.0)
    return alpha / alpha.sum(-1, keepdim=True), support


def dirichlet_log_prob(
    logits: Tensor, alpha: Tensor, support: Tensor, gamma: float = 1.0, clamp: float = 1e-3
) -> Tensor:
    """Dirichlet log-density of alpha over `support` (e.g. the old rollout's), as a function of logits."""
    concentration = dirichlet_concentration(logits, support, gamma, clamp)
    # Off the support, a = 1 and x = 1 make every term vanish.
    a = torch.where(support, concentration, 1.0)
    x = torch.where(support, alpha, 1.0)
    return torch.lgamma(concentration.sum(-1)) - torch.lgamma(a).sum(-1) + ((a - 1.0) * x.log()).sum(-1)


def sample_log_probs(
    feed: str,
    step_logits: Tensor,
    step_inputs: Tensor,
    step_samples: Tensor | None,
    *,
    K: int = 1,
    normalize: bool = True,
    temperature: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """[N, S] log-prob of each recorded step (MTS counts, or Dirichlet alpha on its support) under step_logits
    [N, S, V]; zeros for the deterministic feeds. One batched call for all steps: rollouts record, GRPO rescores."""
    if feed == "mts":
        return mts_log_prob(step_logits, step_samples, K, normalize, temperature)
    if feed == "dirichlet":
        return dirichlet_log_prob(step_logits, step_inputs, step_samples, gamma)
    return step_logits.new_zeros(step_logits.shape[:2])


def entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension; -inf logits count as zero probability."""
    log_probs = logits.log_softmax(-1)
    return -(log_probs.exp() * log_probs.clamp_min(torch.finfo(log_probs.dtype).min)).sum(-1)


@dataclass
class Rollout:
    step_inputs: Tensor  # [N, S, V] mixture weights fed at each step ([N, S, d] hidden states for feed="hidden")
    step_logits: Tensor  # [N, S, V] logits that produced each step input
    step_log_probs: Tensor  # [N, S] log-prob of each step's sample (zeros for deterministic feeds)
    step_samples: Tensor | None  # [N, S, V] MTS counts (long) or Dirichlet support (bool); None otherwise
    answer_logits: Tensor  # [N, V]
    answer: Tensor  # [N] argmax, or sampled when sample_answer=True
    answer_log_prob: Tensor  # [N] log softmax(answer_logits) at the answer


def rollout(
    model: GPT,
    prompt_ids: Tensor,
    n_steps: int,
    feed: str = "softmax",
    *,
    K: int = 1,
    normalize: bool = True,
    temperature: float = 1.0,
    gamma: float = 1.0,
    sample_answer: bool = False,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Run the prompt [N, P] once, then feed the model's own output back for n_steps
    positions; the logits after the last step give the answer.

    feed: "softmax" (CoT2, softmax(z / temperature)), "argmax" (greedy discrete CoT),
    "mts" (K-token multi-token sampling), "dirichlet", or "hidden" (COCONUT: the last
    hidden state itself). Gradients flow unless the caller disables them.
    The answer is read off the untempered logits.
    """
    if feed not in FEEDS:
        raise ValueError(f"unknown feed {feed!r}; expected one of {', '.join(FEEDS)}")
    if n_steps < 0:
        raise ValueError(f"n_steps={n_steps} must be non-negative")
    batch, prompt_length = prompt_ids.shape
    cache = model.new_cache(batch, prompt_length + n_steps)
    logits, hidden = model(model.token_embedding(prompt_ids), cache)
    logits, hidden = logits[:, -1], hidden[:, -1]

    inputs, step_logits, samples = [], [], []
    for _ in range(n_steps):
        sample = None
        if feed == "softmax":
            step_input = (logits / temperature).softmax(-1)
        elif feed == "argmax":
            step_input = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        elif feed == "mts":
            step_input, sample = mts_sample(logits, K, normalize, temperature, generator)
        elif feed == "dirichlet":
            step_input, sample = dirichlet_sample(logits, gamma, generator=generator)
        else:
            step_input = hidden
        inputs.append(step_input)
        step_logits.append(logits)
        if sample is not None:
            samples.append(sample)
        embedding = step_input if feed == "hidden" else model.mixture_embedding(step_input)
        logits, hidden = model(embedding.unsqueeze(1), cache)
        logits, hidden = logits[:, 0], hidden[:, 0]

    answer_log_probs = logits.log_softmax(-1)
    if sample_answer:
        answer = torch.multinomial(answer_log_probs.detach().exp(), 1, generator=generator).squeeze(1)
    else:
        answer = logits.argmax(-1)

    vocab = logits.shape[-1]
    width = hidden.shape[-1] if feed == "hidden" else vocab
    step_samples = None
    if feed in ("mts", "dirichlet"):
        no_samples = torch.zeros(batch, 0, vocab, dtype=torch.long if feed == "mts" else torch.bool)
        step_samples = _stack_steps(samples, no_samples.to(logits.device))
    all_inputs = _stack_steps(inputs, logits.new_zeros(batch, 0, width))
    all_logits = _stack_steps(step_logits, logits.new_zeros(batch, 0, vocab))
    return Rollout(
        step_inputs=all_inputs,
        step_logits=all_logits,
        step_log_probs=sample_log_probs(feed, all_logits, all_inputs, step_samples, K=K, normalize=normalize,
                                        temperature=temperature, gamma=gamma),
        step_samples=step_samples,
        answer_logits=logits,
        answer=answer,
        answer_log_prob=answer_log_probs.gather(-1, answer.unsqueeze(-1)).squeeze(-1),
    )


def _stack_steps(steps: list[Tensor], empty: Tensor) -> Tensor:
    """Stack per-step [N, ...] tensors into [N, S, ...]; `empty` stands in when S = 0."""
    return torch.stack(steps, dim=1) if steps else empty


def teacher_forced_logits(model: GPT, prompt_ids: Tensor, step_inputs: Tensor) -> tuple[Tensor, Tensor]:
    """One parallel forward over [prompt tokens ; mixture steps [N, S, V]].

    Returns (step_logits [N, S, V], answer_logits [N, V]): the logits at positions
    P-1 .. P-1+S, i.e. those that predicted each step input and then the answer,
    matching what rollout() produced step by step.
    """
    prompt_length, n_steps = prompt_ids.shape[1], step_inputs.shape[1]
    embeddings = torch.cat([model.token_embedding(prompt_ids), model.mixture_embedding(step_inputs)], dim=1)
    logits, _ = model(embeddings)
    predicting = logits[:, prompt_length - 1 :]
    return predicting[:, :n_steps], predicting[:, n_steps]
