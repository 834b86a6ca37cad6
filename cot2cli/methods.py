"""The supervised methods: what each feeds the model, what it is scored on, how it decodes.

All four see the same task tensors (prompt, trace, answer, CSFT step targets); none knows
which task it runs on.
- discrete: next-token cross-entropy on the trace and the answer; greedy decoding.
- nocot:    the answer right after the prompt.
- cot2:     sum over supervised steps of KL(alpha*_t || softmax(z_t)) plus answer cross-entropy;
            the step inputs are alpha*_t (teacher) or the model's own softmax (self);
            decoding feeds the full softmax back.
- coconut:  the first k steps are the previous position's hidden state (k grows stage by
            stage), the rest discrete tokens; decoding feeds hidden states for every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cot2cli.continuous import rollout, teacher_forced_logits
from cot2cli.model import GPT

DECODE_FEED = {"cot2": "softmax", "discrete": "argmax", "nocot": "argmax", "coconut": "hidden"}


@dataclass
class Batch:
    prompt: Tensor  # [b, P]
    trace: Tensor  # [b, S]
    answer: Tensor  # [b]
    targets: Tensor | None = None  # [b, S, V] CSFT step targets (cot2 only)


@dataclass
class Loss:
    total: Tensor
    steps: Tensor  # [S] per-step term (KL for cot2, CE otherwise; 0 where unsupervised)
    answer: Tensor  # answer cross-entropy


def reasoning_steps(method: str, n_steps: int) -> int:
    """Positions between prompt and answer: none for no-CoT."""
    return 0 if method == "nocot" else n_steps


def coconut_stage(epoch: int, epochs_per_stage: int, n_steps: int) -> int:
    """How many leading steps are continuous thoughts at this (0-based) epoch."""
    return min(n_steps, epoch // max(1, epochs_per_stage))


def method_loss(model: GPT, method_cfg, batch: Batch, epoch: int) -> Loss:
    name = str(method_cfg.name)
    if name == "cot2":
        return _cot2_loss(model, method_cfg, batch, epoch)
    if name == "coconut":
        k = coconut_stage(epoch, method_cfg.epochs_per_stage, batch.trace.shape[1])
        return _coconut_loss(model, batch, k)
    if name == "nocot":
        logits, _ = model(model.token_embedding(batch.prompt))
        answer = F.cross_entropy(logits[:, -1], batch.answer)
        return Loss(answer, answer.new_zeros(0), answer)
    return _discrete_loss(model, batch)


def _discrete_loss(model: GPT, batch: Batch) -> Loss:
    prompt_length = batch.prompt.shape[1]
    tokens = torch.cat([batch.prompt, batch.trace], dim=1)
    logits, _ = model(model.token_embedding(tokens))
    labels = torch.cat([batch.trace, batch.answer.unsqueeze(1)], dim=1)
    return _token_losses(logits[:, prompt_length - 1 :], labels)


def _token_losses(logits: Tensor, labels: Tensor) -> Loss:
    """Cross-entropy per position [b, S+1, V] vs [b, S+1]; the total is the mean over positions."""
    per_position = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(0)
    return Loss(per_position.mean(), per_position[:-1], per_position[-1])


def use_self_feed(method_cfg, epoch: int) -> bool:
    if str(method_cfg.feed) == "self":
        return True
    switch = method_cfg.self_feed_from_epoch
    return switch is not None and epoch >= switch


def _cot2_loss(model: GPT, method_cfg, batch: Batch, epoch: int) -> Loss:
    n_steps = batch.trace.shape[1]
    if use_self_feed(method_cfg, epoch):
        fed = rollout(model, batch.prompt, n_steps, "softmax")
        step_logits, answer_logits = fed.step_logits, fed.answer_logits
    else:
        step_logits, answer_logits = teacher_forced_logits(model, batch.prompt, batch.targets)
    # KL(a || p) = CE(a, p) - H(a): one fused soft-target cross-entropy, and H(a) carries no gradient.
    cross = F.cross_entropy(step_logits.transpose(1, 2), batch.targets.transpose(1, 2), reduction="none").mean(0)
    kl = cross - target_entropy(batch.targets)
    if method_cfg.supervised_steps is not None:
        kl = kl * supervised_mask(method_cfg.supervised_steps, n_steps, kl.device)
    answer = F.cross_entropy(answer_logits, batch.answer)
    return Loss(kl.sum() + answer, kl, answer)


@torch.no_grad()
def target_entropy(targets: Tensor) -> Tensor:
    """[b, S, V] distributions -> [S] mean entropy over the batch."""
    return -torch.special.xlogy(targets, targets).sum(-1).mean(0)


def supervised_mask(steps: list[int], n_steps: int, device: torch.device) -> Tensor:
    mask = torch.zeros(n_steps, device=device)
    mask[[s - 1 for s in steps]] = 1.0
    return mask


def _coconut_loss(model: GPT, batch: Batch, k: int) -> Loss:
    """Stage k: k hidden-state thoughts, then the remaining trace tokens and the answer as language."""
    b, prompt_length = batch.prompt.shape
    n_steps = batch.trace.shape[1]
    cache = model.new_cache(b, prompt_length + n_steps)
    logits, hidden = model(model.token_embedding(batch.prompt), cache)
    last_logits, thought = logits[:, -1:], hidden[:, -1:]
    for _ in range(k):
        last_logits, thought = model(thought, cache)
    predicting = last_logits
    if k < n_steps:
        rest, _ = model(model.token_embedding(batch.trace[:, k:]), cache)
        predicting = torch.cat([last_logits, rest], dim=1)
    labels = torch.cat([batch.trace[:, k:], batch.answer.unsqueeze(1)], dim=1)
    loss = _token_losses(predicting, labels)
    steps = torch.cat([loss.steps.new_zeros(k), loss.steps])
    return Loss(loss.total, steps, loss.answer)


@torch.no_grad()
def decode(model: GPT, method: str, prompt: Tensor, n_steps: int) -> Tensor:
    """The method's own deterministic decoding; returns the predicted answer tokens [b]."""
    return rollout(model, prompt, reasoning_steps(method, n_steps), DECODE_FEED[method]).answer
