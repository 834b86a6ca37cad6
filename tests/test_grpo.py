import copy

import pytest
import torch
from omegaconf import OmegaConf

from cot2cli import grpo
from cot2cli.grpo import (
    GRPOSettings,
    Sampler,
    clipped_surrogate,
    collect,
    evaluate_policy,
    group_advantages,
    k3_kl,
    token_log_probs,
    train_epoch,
    update,
)
from cot2cli.model import GPT
from cot2cli.stages.rl import rl_data
from tasks import get_task
from tasks.mnns import MNNSConfig


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAMPLERS = [Sampler("mts", K=3), Sampler("mts", K=1), Sampler("mts", K=2, normalize=False), Sampler("dirichlet")]


@pytest.fixture(scope="module")
def tiny():
    """MNNS with 3 digits in 1..4: 64 instances, 2 reasoning steps."""
    task = get_task(OmegaConf.structured(MNNSConfig(lo=1, hi=4, seq_length=3)))
    data = task.build()
    return data, rl_data(task, data, torch.device("cpu"))


def tiny_model(data, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(data.vocab_size, data.prompt.shape[1] + data.n_steps + 1, n_layer=1, n_head=1, d_model=16).eval()


def test_group_advantages_by_hand() -> None:
    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    # group 1: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2; group 2: all equal; group 3: mean 1/2, std 0.577
    std3 = (4 * 0.25 / 3) ** 0.5
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -0.5 / std3, 0.5 / std3, -0.5 / std3, 0.5 / std3])
    torch.testing.assert_close(group_advantages(reward, 4, eps=0.0), expected)
    torch.testing.assert_close(group_advantages(reward, 4), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(group_advantages(torch.zeros(8), 4), torch.zeros(8))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(reward, 1)


def test_clipped_surrogate_by_hand() -> None:
    ratio = torch.tensor([[1.5, 0.5], [1.05, 1.5], [0.8, 1.0]])
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0], [-1.5, -0.7]])
    advantage = torch.tensor([1.0, -2.0, 0.5])
    objective, clipped = clipped_surrogate(old + ratio.log(), old, advantage, clip_eps=0.1)
    # A > 0: min(r, clip(r)) A; A < 0: the larger of r, clip(r) times A
    expected = torch.tensor([[1.1, 0.5], [-2.1, -3.0], [0.4, 0.5]])
    torch.testing.assert_close(objective, expected)
    assert clipped.tolist() == [[True, True], [False, True], [True, False]]


def test_k3_kl_is_zero_on_equal_policies_and_positive_otherwise() -> None:
    log_probs = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(k3_kl(log_probs, log_probs), torch.zeros(1, 2))
    ref = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(k3_kl(log_probs, ref), (ref - log_probs).exp() - (ref - log_probs) - 1)
    assert (k3_kl(log_probs, ref) > 0).all()


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"{s.kind}-K{s.K}-{s.normalize}")
def test_recomputed_log_probs_equal_the_rollouts_own(tiny, sampler: Sampler) -> None:
    data, rl = tiny
    model = tiny_model(data)
    settings = GRPOSettings(group_size=4)
    generator = torch.Generator().manual_seed(1)
    batch = collect(model, rl.train_prompt[:8], rl.train_index[:8], rl.n_steps, rl.reward, sampler, settings, generator)
    assert batch.prompt.shape[0] == 32 and batch.old_log_probs.shape == (32, rl.n_steps + 1)
    assert torch.equal(batch.prompt[:4], rl.train_prompt[:1].expand(4, -1))
    recomputed = token_log_probs(model, batch.prompt, batch.sampled, sampler)
    torch.testing.assert_close(recomputed, batch.old_log_probs, atol=1e-4, rtol=1e-5)
    if sampler.kind == "mts":
        assert torch.equal(batch.sampled.step_samples.sum(-1), torch.full((32, rl.n_steps), sampler.K))


def test_mts_with_K_1_feeds_one_hot_tokens(tiny) -> None:
    data, rl = tiny
    generator = torch.Generator().manual_seed(0)
    sampled = Sampler("mts", K=1).sample(tiny_model(data), rl.train_prompt, rl.n_steps, generator)
    assert torch.equal(sampled.step_inputs.max(-1).values, torch.ones(len(rl.train_prompt), rl.n_steps))


def test_pi_old_stays_fixed_across_ppo_epochs(tiny, monkeypatch) -> None:
    data, rl = tiny
    model = tiny_model(data)
    sampler, settings = Sampler("mts", K=3), GRPOSettings(group_size=4, ppo_epochs=2, clip_eps=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(2)
    batch = collect(model, rl.train_prompt, rl.train_index, rl.n_steps, rl.reward, sampler, settings, generator)
    assert batch.advantage.abs().sum() > 0
    old = batch.old_log_probs.clone()
    ratios = []

    def spy(log_probs, old_log_probs, advantage, clip_eps):
        ratios.append((log_probs - old_log_probs).exp().detach())
        return clipped_surrogate(log_probs, old_log_probs, advantage, clip_eps)

    monkeypatch.setattr(grpo, "clipped_surrogate", spy)
    stats = update(model, optimizer, batch, sampler, settings)
    assert len(ratios) == 2
    torch.testing.assert_close(ratios[0], torch.ones_like(ratios[0]), atol=1e-4, rtol=0)
    assert (ratios[1] - 1).abs().max() > 1e-3  # measured against the same pi_old, not a refreshed one
    assert torch.equal(batch.old_log_probs, old)
    assert stats.clipped_fraction > 0


def test_kl_term_pulls_towards_the_start_policy(tiny) -> None:
    data, rl = tiny
    sampler = Sampler("mts", K=3)
    start = tiny_model(data).requires_grad_(False)
    model = copy.deepcopy(start).requires_grad_(True)
    with torch.no_grad():
        model.ln_f.bias.add_(0.5 * torch.randn(model.d_model, generator=torch.Generator().manual_seed(3)))
    settings = GRPOSettings(group_size=4, kl_coef=1.0)
    batch = collect(model, rl.train_prompt, rl.train_index, rl.n_steps, lambda a, i: torch.ones(len(a)), sampler,
                    settings, torch.Generator().manual_seed(4))
    assert torch.equal(batch.advantage, torch.zeros_like(batch.advantage))  # only the KL term acts
    evaluate = lambda m: evaluate_policy(  # noqa: E731
        m, start, rl.valid.prompt, rl.valid_index, rl.n_steps, rl.reward, sampler, 64, torch.Generator().manual_seed(5)
    )
    before = evaluate(model).kl_to_start
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        stats = update(model, optimizer, batch, sampler, settings, ref_model=start)
    assert stats.kl > 0
    assert evaluate(model).kl_to_start < before
    assert evaluate(start).kl_to_start == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("sampler", [Sampler("mts", K=3), Sampler("dirichlet")], ids=lambda s: s.kind)
def test_grpo_epochs_raise_the_reward(tiny, sampler: Sampler) -> None:
    data, rl = tiny
    model = tiny_model(data, seed=1)
    start = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    settings = GRPOSettings(group_size=8, batch_size=16)
    generator = torch.Generator().manual_seed(6)

    def success() -> float:
        return evaluate_policy(model, start, rl.train_prompt, rl.train_index, rl.n_steps, rl.reward, sampler, 512,
                               torch.Generator().manual_seed(7)).success

    before = success()
    rewards = [train_epoch(model, optimizer, rl.train_prompt, rl.train_index, rl.n_steps, rl.reward, sampler, settings,
                           generator).reward for _ in range(6)]
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters(), strict=True))
    assert success() > before + 0.1
    assert rewards[-1] > rewards[0]
