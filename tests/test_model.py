import pytest
import torch
import torch.nn.functional as F

from cot2cli.continuous import rollout, teacher_forced_logits
from cot2cli.model import GPT

VOCAB = 11
N_POSITIONS = 32
D_MODEL = 16


@pytest.fixture(
    params=[{}, {"smeared_keys": True}, {"head_dim": 12}],  # heads of 12: wider than d_model // n_head = 8
    ids=["gpt2", "smeared_keys", "head_dim"],
)
def model(request: pytest.FixtureRequest) -> GPT:
    torch.manual_seed(0)
    model = GPT(VOCAB, N_POSITIONS, n_layer=2, n_head=2, d_model=D_MODEL, dropout=0.1, **request.param)
    if request.param.get("smeared_keys"):  # shares away from the initial 1/2, different per head
        with torch.no_grad():
            for block in model.blocks:
                block.attn.key_smear.copy_(torch.randn(2))
    return model.eval()


def test_one_hot_mixture_matches_token_input(model: GPT) -> None:
    ids = torch.randint(VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    token_logits, token_hidden = model(model.token_embedding(ids))
    mixture_logits, mixture_hidden = model(model.mixture_embedding(F.one_hot(ids, VOCAB).float()))
    torch.testing.assert_close(mixture_logits, token_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixture_hidden, token_hidden, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_cached_decoding_matches_full_forward(model: GPT, grad_enabled: bool) -> None:
    embeddings = torch.randn(4, 12, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(grad_enabled):
        full_logits, full_hidden = model(embeddings)

        cache = model.new_cache(4, 12)
        one_at_a_time = [model(embeddings[:, t : t + 1], cache) for t in range(12)]
        assert cache.length == 12
        torch.testing.assert_close(torch.cat([logits for logits, _ in one_at_a_time], 1), full_logits)
        torch.testing.assert_close(torch.cat([hidden for _, hidden in one_at_a_time], 1), full_hidden)

        cache = model.new_cache(4)
        prefix, _ = model(embeddings[:, :5], cache)
        chunk, _ = model(embeddings[:, 5:11], cache)
        last, _ = model(embeddings[:, 11:], cache)
        assert cache.length == 12
        torch.testing.assert_close(torch.cat([prefix, chunk, last], 1), full_logits)


def test_smeared_keys_with_no_share_equal_the_plain_model() -> None:
    torch.manual_seed(0)
    plain = GPT(VOCAB, N_POSITIONS, n_layer=2, n_head=2, d_model=D_MODEL).eval()
    with torch.no_grad():  # sharp attention, so that which keys it sees shows in the logits
        for block in plain.blocks:
            block.attn.qkv.weight.mul_(30.0)
    smeared = GPT(VOCAB, N_POSITIONS, n_layer=2, n_head=2, d_model=D_MODEL, smeared_keys=True).eval()
    smeared.load_state_dict(plain.state_dict(), strict=False)
    embeddings = torch.randn(3, 9, D_MODEL, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(smeared(embeddings)[0], plain(embeddings)[0], atol=1e-4)  # share 1/2 at init
    with torch.no_grad():
        for block in smeared.blocks:
            block.attn.key_smear.fill_(-40.0)  # sigmoid(-40) ~ 4e-18: no share of the predecessor
    torch.testing.assert_close(smeared(embeddings)[0], plain(embeddings)[0], atol=1e-6, rtol=0)


def test_self_fed_rollout_backpropagates(model: GPT) -> None:
    prompt = torch.randint(VOCAB, (5, 4), generator=torch.Generator().manual_seed(3))
    result = rollout(model.train(), prompt, n_steps=3, feed="softmax")
    F.cross_entropy(result.answer_logits, torch.zeros(5, dtype=torch.long)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_position_overflow_raises(model: GPT) -> None:
    with pytest.raises(ValueError, match="sequence of length 33 exceeds the model's n_positions=32"):
        model(torch.zeros(1, 33, D_MODEL))
    cache = model.new_cache(1)
    model(torch.zeros(1, 30, D_MODEL), cache)
    with pytest.raises(ValueError, match="sequence of length 33 exceeds the model's n_positions=32"):
        model(torch.zeros(1, 3, D_MODEL), cache)


def test_invalid_sizes_raise() -> None:
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_head=4"):
        GPT(VOCAB, N_POSITIONS, n_layer=1, n_head=4, d_model=30)
    with pytest.raises(ValueError, match="n_layer=0"):
        GPT(VOCAB, N_POSITIONS, n_layer=0, n_head=2, d_model=16)
    with pytest.raises(ValueError, match="head_dim=0 must be at least 1"):
        GPT(VOCAB, N_POSITIONS, n_layer=1, n_head=2, d_model=16, head_dim=0)


def test_head_dim_sets_the_attention_width_apart_from_d_model() -> None:
    default = GPT(VOCAB, N_POSITIONS, n_layer=1, n_head=4, d_model=16)
    assert default.head_dim == 4 and default.blocks[0].attn.qkv.weight.shape == (3 * 16, 16)
    wide = GPT(VOCAB, N_POSITIONS, n_layer=1, n_head=3, d_model=16, head_dim=8)  # 3 does not divide 16: allowed
    assert wide.blocks[0].attn.qkv.weight.shape == (3 * 3 * 8, 16)
    assert wide.blocks[0].attn.proj.weight.shape == (16, 3 * 8)
    assert wide.new_cache(2).keys[0].shape == (2, 3, N_POSITIONS, 8)
    logits, hidden = wide(torch.randn(2, 5, 16))
    assert logits.shape == (2, 5, VOCAB) and hidden.shape == (2, 5, 16)


def test_teacher_forcing_the_greedy_path_reproduces_greedy_rollout(model: GPT) -> None:
    prompt = torch.randint(VOCAB, (6, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        greedy = rollout(model, prompt, n_steps=4, feed="argmax")
        step_logits, answer_logits = teacher_forced_logits(model, prompt, greedy.step_inputs)
    assert torch.equal(greedy.step_inputs, F.one_hot(greedy.step_logits.argmax(-1), VOCAB).float())
    torch.testing.assert_close(step_logits, greedy.step_logits)
    torch.testing.assert_close(answer_logits, greedy.answer_logits)
    assert torch.equal(greedy.answer, answer_logits.argmax(-1))
