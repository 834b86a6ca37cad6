"""GRPO for continuous tokens (COT2_REFERENCE section 4): rollouts, group advantages, clipped loss.

The policy acts at every reasoning step and once more at the answer. A step's action is a
continuous token: K tokens drawn from softmax(z_t / K) and averaged (MTS; K = 1 is
discrete CoT sampling), or alpha ~ Dirichlet(gamma * p) over the support of p. The answer
is one token drawn from softmax(z). A rollout's log-probability is the sum of these S + 1
terms.

Choices made here:
- The ratio pi_theta / pi_old and its clipping are per token (per step, plus the answer), as
  in the paper's token-level objective; the advantage of the rollout is shared by its
  tokens, and the loss is the mean over every token of every rollout in the batch.
- pi_old is the policy that sampled the batch: its log-probs are recorded by the rollout
  and stay fixed for all `ppo_epochs` passes over the batch. With one pass the ratio is 1
  and the update is the plain policy gradient (the reference implementation's behaviour).
- The advantage is (r - mean_G) / (std_G + eps) with the unbiased std over the G rollouts
  of a prompt; a group whose rewards are all equal carries no signal and gets 0.
- KL to the start policy uses the k3 estimator exp(q - p) - (q - p) - 1 per token (p the
  policy's log-prob, q the start policy's), averaged like the clipped term.
- The model runs without dropout (eval mode): the log-probs recomputed in one
  teacher-forced pass must equal those the rollout recorded, or the ratio would not start at 1.

Nothing here reads or writes files; `cot2cli.stages.rl` does the bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cot2cli.continuous import Rollout, entropy, rollout, sample_log_probs, teacher_forced_logits
from cot2cli.errors import Diverged
from cot2cli.evaluation import chunks
from cot2cli.model import GPT

SAMPLERS = ("mts", "dirichlet")

RewardFn = Callable[[Tensor, Tensor], Tensor]
"""(answer tokens [N], dataset indices [N]) -> [N] float rewards."""


@dataclass(frozen=True)
class Sampler:
    """How the policy turns step logits into a continuous token."""

    kind: str  # "mts" or "dirichlet"
    K: int = 3  # mts: tokens per step
    normalize: bool = True  # mts: sample from softmax(z / K) instead of softmax(z)
    gamma: float = 1.0  # dirichlet: concentration scale

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; expected one of {', '.join(SAMPLERS)}")

    def sample(
        self, model: GPT, prompt: Tensor, n_steps: int, generator: torch.Generator | None = None
    ) -> Rollout:
        """Self-fed rollout with sampled steps and a sampled answer, without gradients."""
        with torch.no_grad():
            return rollout(model, prompt, n_steps, self.kind, K=self.K, normalize=self.normalize, gamma=self.gamma,
                           sample_answer=True, generator=generator)

    def step_log_probs(self, step_logits: Tensor, step_inputs: Tensor, step_samples: Tensor) -> Tensor:
        """[N, S] log-prob of recorded steps (MTS counts or Dirichlet alpha on its support) under step_logits."""
        return sample_log_probs(self.kind, step_logits, step_inputs, step_samples, K=self.K,
                                normalize=self.normalize, gamma=self.gamma)


@dataclass(frozen=True)
class GRPOSettings:
    group_size: int = 8  # G rollouts per prompt
    batch_size: int = 16  # prompts per rollout batch (and per optimisation step)
    clip_eps: float = 0.1
    ppo_epochs: int = 1  # passes over one rollout batch with the same pi_old
    kl_coef: float = 0.0
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    advantage_eps: float = 1e-6


@dataclass
class RolloutBatch:
    """One rollout batch as sampled: enough to recompute any policy's log-probs in one pass."""

    prompt: Tensor  # [N, P], each prompt repeated G times in a row
    sampled: Rollout  # recorded step inputs, MTS counts / Dirichlet support, sampled answers
    old_log_probs: Tensor  # [N, S + 1] per-token log-probs under the sampling policy (pi_old)
    reward: Tensor  # [N]
    advantage: Tensor  # [N]


class PolicyDiverged(Diverged):
    """The GRPO loss became NaN or infinite; the update that would have used it is not applied."""


@dataclass
class UpdateStats:
    loss: float
    clipped_fraction: float  # share of token ratios outside [1 - eps, 1 + eps], over all passes
    kl: float  # k3 KL to the start policy per token, last pass (0 without a start policy)


def group_advantages(reward: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(r - mean_G) / (std_G + eps) over consecutive groups of G rewards [N]; all-equal groups get 0."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size} must be at least 2: one rollout has nothing to compare with")
    groups = reward.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred)).flatten()


def clipped_surrogate(
    log_probs: Tensor, old_log_probs: Tensor, advantage: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective per token: min(rho A, clip(rho, 1 +- eps) A), rho = pi / pi_old.

    log_probs, old_log_probs: [N, T]; advantage: [N]. Returns (objective [N, T], clipped [N, T] bool).
    """
    ratio = (log_probs - old_log_probs).exp()
    advantage = advantage.unsqueeze(1)
    objective = torch.minimum(ratio * advantage, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage)
    return objective, (ratio - 1.0).abs() > clip_eps


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: non-negative, unbiased, low variance."""
    log_ratio = ref_log_probs - log_probs
    return log_ratio.expm1() - log_ratio  # expm1 keeps it accurate (and >= 0) when the policies nearly agree


def recorded_log_probs(sampled: Rollout) -> Tensor:
    """[N, S + 1] per-token log-probs that the sampling policy itself recorded: steps, then the answer."""
    return torch.cat([sampled.step_log_probs, sampled.answer_log_prob.unsqueeze(1)], dim=1)


def token_log_probs(model: GPT, prompt: Tensor, sampled: Rollout, sampler: Sampler) -> Tensor:
    """[N, S + 1] log-probs of a rollout's recorded steps and answer under `model`: one teacher-forced pass."""
    step_logits, answer_logits = teacher_forced_logits(model, prompt, sampled.step_inputs)
    steps = sampler.step_log_probs(step_logits, sampled.step_inputs, sampled.step_samples)
    answer = answer_logits.log_softmax(-1).gather(1, sampled.answer.unsqueeze(1))
    return torch.cat([steps, answer], dim=1)


def collect(
    model: GPT,
    prompt: Tensor,
    index: Tensor,
    n_steps: int,
    reward_fn: RewardFn,
    sampler: Sampler,
    settings: GRPOSettings,
    generator: torch.Generator | None = None,
) -> RolloutBatch:
    """G rollouts of each prompt [B, P] (dataset indices `index` [B]) as one batch, rewarded and scored."""
    group = settings.group_size
    repeated = prompt.repeat_interleave(group, 0)
    sampled = sampler.sample(model, repeated, n_steps, generator)
    reward = reward_fn(sampled.answer, index.repeat_interleave(group, 0)).to(sampled.answer_logits.dtype)
    advantage = group_advantages(reward, group, settings.advantage_eps)
    return RolloutBatch(repeated, sampled, recorded_log_probs(sampled), reward, advantage)


def update(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    sampler: Sampler,
    settings: GRPOSettings,
    ref_model: GPT | None = None,
) -> UpdateStats:
    """`ppo_epochs` gradient steps on one rollout batch, all against the batch's recorded pi_old."""
    ref_log_probs = None
    if ref_model is not None and settings.kl_coef > 0:
        with torch.no_grad():
            ref_log_probs = token_log_probs(ref_model, batch.prompt, batch.sampled, sampler)
    clipped = torch.zeros((), device=batch.reward.device)
    loss = kl = torch.zeros((), device=batch.reward.device)
    for _ in range(settings.ppo_epochs):
        log_probs = token_log_probs(model, batch.prompt, batch.sampled, sampler)
        objective, clipped_now = clipped_surrogate(log_probs, batch.old_log_probs, batch.advantage, settings.clip_eps)
        loss = -objective.mean()
        if ref_log_probs is not None:
            kl = k3_kl(log_probs, ref_log_probs).mean()
            loss = loss + settings.kl_coef * kl
        if not torch.isfinite(loss):
            raise PolicyDiverged(f"GRPO loss is {float(loss.detach())}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        clipped = clipped + clipped_now.float().mean()
    return UpdateStats(float(loss.detach()), float(clipped) / settings.ppo_epochs, float(kl.detach()))


@dataclass
class EpochStats:
    reward: float  # mean reward of every rollout sampled this epoch
    loss: float  # mean of the last pass's loss per rollout batch
    clipped_fraction: float
    kl: float  # mean k3 KL per token in the loss (0 when kl_coef = 0)


def train_epoch(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    prompt: Tensor,
    index: Tensor,
    n_steps: int,
    reward_fn: RewardFn,
    sampler: Sampler,
    settings: GRPOSettings,
    generator: torch.Generator | None = None,
    ref_model: GPT | None = None,
    order: Tensor | None = None,
) -> EpochStats:
    """One pass over the prompts [M, P] (in `order`, default as given), batch_size prompts per rollout batch."""
    order = torch.arange(len(prompt), device=prompt.device) if order is None else order
    reward_sum, loss, clipped, kl = 0.0, 0.0, 0.0, 0.0
    for start in range(0, len(order), settings.batch_size):
        chosen = order[start : start + settings.batch_size]
        batch = collect(model, prompt[chosen], index[chosen], n_steps, reward_fn, sampler, settings, generator)
        stats = update(model, optimizer, batch, sampler, settings, ref_model)
        reward_sum += float(batch.reward.sum())
        loss, clipped, kl = loss + stats.loss, clipped + stats.clipped_fraction, kl + stats.kl
    batches = max(1, math.ceil(len(order) / settings.batch_size))
    return EpochStats(reward_sum / max(1, len(order) * settings.group_size), loss / batches, clipped / batches,
                      kl / batches)


@dataclass
class PolicyEvaluation:
    success: float  # share of sampled rollouts (steps and answer sampled) that earn reward 1
    step_entropy: list[float]  # mean entropy of softmax(z_t) at each step along the sampled rollouts
    kl_to_start: float  # k3 estimate of KL(pi || pi_start) per rollout (summed over its S + 1 tokens)


@torch.no_grad()
def evaluate_policy(
    model: GPT,
    ref_model: GPT,
    prompt: Tensor,
    index: Tensor,
    n_steps: int,
    reward_fn: RewardFn,
    sampler: Sampler,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> PolicyEvaluation:
    """One sampled rollout per prompt, in batches of `batch_size`: success, step entropies, KL to the start."""
    totals = torch.zeros(n_steps + 2, dtype=torch.float64)
    for part in chunks(len(prompt), batch_size):
        sampled = sampler.sample(model, prompt[part], n_steps, generator)
        kl = k3_kl(recorded_log_probs(sampled), token_log_probs(ref_model, prompt[part], sampled, sampler)).sum(1)
        totals[0] += float(reward_fn(sampled.answer, index[part]).float().sum())
        totals[1 : n_steps + 1] += entropy(sampled.step_logits).sum(0).double().cpu()
        totals[n_steps + 1] += float(kl.sum())
    means = (totals / max(1, len(prompt))).tolist()
    return PolicyEvaluation(means[0], means[1 : n_steps + 1], means[n_steps + 1])
