import math

import pytest
import torch
from torch.distributions import Categorical, Dirichlet, Multinomial

from cot2cli.continuous import (
    dirichlet_concentration,
    dirichlet_log_prob,
    dirichlet_sample,
    entropy,
    mts_log_prob,
    mts_sample,
    rollout,
    teacher_forced_logits,
)
from cot2cli.model import GPT


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("K", [1, 2, 3, 6])
def test_mts_log_prob_matches_categorical_and_multinomial(K: int, normalize: bool) -> None:
    logits = random_logits(8, 7, seed=K)
    temperature = 0.8
    scaled = logits / (temperature * (K if normalize else 1))
    categorical = Categorical(logits=scaled)
    draws = categorical.sample((K,))  # [K, N]
    counts = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, draws.T, torch.ones_like(draws.T))

    log_prob = mts_log_prob(logits, counts, K, normalize, temperature)
    torch.testing.assert_close(log_prob, categorical.log_prob(draws).sum(0))
    log_coefficient = math.lgamma(K + 1) - torch.lgamma(counts + 1.0).sum(-1)
    multinomial = Multinomial(K, logits=scaled).log_prob(counts.double())
    torch.testing.assert_close(log_prob, multinomial - log_coefficient)

    weights, sampled = mts_sample(logits, K, normalize, temperature, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        mts_log_prob(logits, sampled, K, normalize, temperature),
        Multinomial(K, logits=scaled).log_prob(sampled.double())
        - (math.lgamma(K + 1) - torch.lgamma(sampled + 1.0).sum(-1)),
    )
    torch.testing.assert_close(weights, sampled.double() / K)


def test_mts_sample_counts_and_frequencies() -> None:
    K, repeats = 3, 5000
    logits = random_logits(4, 6, seed=10).float()
    weights, counts = mts_sample(logits.repeat(repeats, 1), K, generator=torch.Generator().manual_seed(11))
    assert counts.dtype == torch.long
    assert torch.equal(counts.sum(-1), torch.full((4 * repeats,), K))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4 * repeats))
    frequencies = counts.view(repeats, 4, 6).sum(0) / (repeats * K)
    torch.testing.assert_close(frequencies, (logits / K).softmax(-1), atol=0.015, rtol=0)


def test_dirichlet_log_prob_matches_torch_dirichlet() -> None:
    logits = random_logits(6, 10, seed=20, scale=3.0)
    for gamma in (0.5, 4.0):
        alpha, support = dirichlet_sample(logits, gamma, threshold=0.01, generator=torch.Generator().manual_seed(21))
        concentration = dirichlet_concentration(logits, support, gamma)
        log_prob = dirichlet_log_prob(logits, alpha, support, gamma)
        expected = torch.stack(
            [Dirichlet(concentration[row][support[row]]).log_prob(alpha[row][support[row]]) for row in range(6)]
        )
        torch.testing.assert_close(log_prob, expected)


def test_dirichlet_sample_moments_and_support() -> None:
    repeats = 20000
    logits = random_logits(3, 8, seed=30).float()
    for gamma in (0.5, 5.0):
        alpha, support = dirichlet_sample(
            logits.repeat(repeats, 1), gamma, threshold=0.01, generator=torch.Generator().manual_seed(31)
        )
        torch.testing.assert_close(alpha.sum(-1), torch.ones(3 * repeats))
        assert (alpha[~support] == 0).all() and (alpha[support] > 0).all()
        p = dirichlet_concentration(logits, support[:3], gamma) / gamma
        alpha = alpha.view(repeats, 3, 8)
        torch.testing.assert_close(alpha.mean(0), p, atol=0.01, rtol=0)
        torch.testing.assert_close(alpha.var(0), p * (1 - p) / (gamma + 1), atol=0.005, rtol=0.1)


def test_dirichlet_sample_is_seedable_and_finite_for_tiny_concentrations() -> None:
    logits = random_logits(4, 50, seed=40, scale=4.0)
    first = dirichlet_sample(logits, gamma=0.1, threshold=1e-4, generator=torch.Generator().manual_seed(41))
    second = dirichlet_sample(logits, gamma=0.1, threshold=1e-4, generator=torch.Generator().manual_seed(41))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.isfinite(dirichlet_log_prob(logits, first[0], first[1], gamma=0.1)).all()


def test_entropy_by_hand() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]).log()
    torch.testing.assert_close(entropy(logits), torch.tensor([1.5 * math.log(2), 0.0]))
    torch.testing.assert_close(entropy(torch.zeros(2, 4)), torch.full((2,), math.log(4)))


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=9, n_positions=24, n_layer=2, n_head=2, d_model=16).eval()


def test_softmax_rollout_is_reproducible(model: GPT) -> None:
    prompt = torch.randint(9, (5, 4), generator=torch.Generator().manual_seed(50))
    with torch.no_grad():
        first = rollout(model, prompt, n_steps=3, feed="softmax")
        second = rollout(model, prompt, n_steps=3, feed="softmax")
    assert torch.equal(first.answer_logits, second.answer_logits)
    assert torch.equal(first.step_inputs, second.step_inputs)
    assert first.step_inputs.shape == (5, 3, 9) and first.step_samples is None
    assert torch.equal(first.step_log_probs, torch.zeros(5, 3))
    torch.testing.assert_close(first.step_inputs, first.step_logits.softmax(-1))


def test_unknown_feed_raises(model: GPT) -> None:
    with pytest.raises(ValueError, match="unknown feed 'beam'.*softmax, argmax, mts, dirichlet, hidden"):
        rollout(model, torch.zeros(2, 3, dtype=torch.long), n_steps=2, feed="beam")


@pytest.mark.parametrize("feed", ["mts", "dirichlet"])
def test_stochastic_rollout_log_probs_recompute_under_teacher_forcing(model: GPT, feed: str) -> None:
    prompt = torch.randint(9, (6, 4), generator=torch.Generator().manual_seed(60))
    with torch.no_grad():
        result = rollout(
            model,
            prompt,
            n_steps=3,
            feed=feed,
            K=3,
            gamma=2.0,
            sample_answer=True,
            generator=torch.Generator().manual_seed(61),
        )
        step_logits, answer_logits = teacher_forced_logits(model, prompt, result.step_inputs)
    torch.testing.assert_close(step_logits, result.step_logits)
    if feed == "mts":
        recomputed = mts_log_prob(step_logits, result.step_samples, K=3)
    else:
        recomputed = dirichlet_log_prob(step_logits, result.step_inputs, result.step_samples, gamma=2.0)
    torch.testing.assert_close(recomputed, result.step_log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        answer_logits.log_softmax(-1).gather(-1, result.answer[:, None]).squeeze(-1), result.answer_log_prob
    )


@pytest.mark.parametrize("feed", ["softmax", "argmax", "mts", "dirichlet", "hidden"])
def test_rollout_shapes_with_and_without_steps(model: GPT, feed: str) -> None:
    prompt = torch.randint(9, (3, 4), generator=torch.Generator().manual_seed(70))
    width = 16 if feed == "hidden" else 9
    with torch.no_grad():
        for n_steps in (0, 2):
            result = rollout(model, prompt, n_steps, feed, K=2, generator=torch.Generator().manual_seed(71))
            assert result.step_inputs.shape == (3, n_steps, width)
            assert result.step_logits.shape == (3, n_steps, 9)
            assert result.step_log_probs.shape == (3, n_steps)
            assert result.answer_logits.shape == (3, 9) and result.answer.shape == (3,)
            if feed in ("mts", "dirichlet"):
                assert result.step_samples.shape == (3, n_steps, 9)
    no_cot, _ = model(model.token_embedding(prompt))
    torch.testing.assert_close(rollout(model, prompt, 0).answer_logits, no_cot[:, -1])
