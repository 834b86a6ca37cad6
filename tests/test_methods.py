"""Training methods: the parallel CSFT loss equals a step loop, and every method learns a tiny set."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cot2cli.errors import Cot2Error
from cot2cli.methods import Batch, decode, method_loss
from cot2cli.model import GPT
from tasks import get_task


@pytest.fixture(scope="module")
def tiny():
    task = get_task(SimpleNamespace(name="mnns", lo=1, hi=4, seq_length=3, max_instances=10_000, val_fraction=0.2,
                                    seed=0))
    data = task.build()
    return task, data


def method_cfg(name="cot2", feed="teacher", supervised_steps=None, self_feed_from_epoch=None):
    return SimpleNamespace(name=name, feed=feed, budget=None, supervised_steps=supervised_steps,
                           self_feed_from_epoch=self_feed_from_epoch, epochs_per_stage=2)


def make_model(data, seed=0):
    torch.manual_seed(seed)
    n_positions = data.prompt.shape[1] + data.n_steps + 1
    return GPT(data.vocab_size, n_positions, n_layer=1, n_head=2, d_model=16, dropout=0.0)


def batch_of(task, data, n=32):
    targets = task.step_targets(data)
    return Batch(data.prompt[:n], data.trace[:n], data.answer[:n], targets[:n])


def test_teacher_forced_csft_loss_equals_a_step_loop(tiny):
    task, data = tiny
    model = make_model(data)
    batch = batch_of(task, data)
    loss = method_loss(model, method_cfg(), batch, epoch=0)
    # Step by step: the prefix grows by one mixture embedding alpha*_t^T E per step.
    inputs = model.token_embedding(batch.prompt)
    kl_total = torch.zeros(())
    for t in range(batch.trace.shape[1]):
        logits, _ = model(inputs)
        target = batch.targets[:, t]
        kl = (target * (target.clamp_min(1e-30).log() - logits[:, -1].log_softmax(-1))).sum(-1).mean()
        kl_total = kl_total + kl
        inputs = torch.cat([inputs, model.mixture_embedding(target).unsqueeze(1)], dim=1)
    logits, _ = model(inputs)
    answer = F.cross_entropy(logits[:, -1], batch.answer)
    torch.testing.assert_close(loss.total, kl_total + answer)
    torch.testing.assert_close(loss.answer, answer)


def test_supervised_steps_drop_the_other_kl_terms(tiny):
    task, data = tiny
    model = make_model(data)
    batch = batch_of(task, data)
    full = method_loss(model, method_cfg(), batch, 0)
    only_first = method_loss(model, method_cfg(supervised_steps=[1]), batch, 0)
    torch.testing.assert_close(only_first.total, full.steps[0] + full.answer)
    assert only_first.steps[1] == 0


def test_curriculum_switches_teacher_to_self_feed(tiny):
    task, data = tiny
    model = make_model(data).eval()
    batch = batch_of(task, data)
    self_fed = method_loss(model, method_cfg(feed="self"), batch, 0)
    assert torch.equal(method_loss(model, method_cfg(self_feed_from_epoch=3), batch, 3).total, self_fed.total)
    assert not torch.equal(method_loss(model, method_cfg(self_feed_from_epoch=3), batch, 2).total, self_fed.total)


@pytest.mark.parametrize("name, feed", [("cot2", "teacher"), ("cot2", "self"), ("discrete", "teacher"),
                                        ("nocot", "teacher"), ("coconut", "teacher")])
def test_every_method_learns_a_tiny_set(tiny, name, feed):
    task, data = tiny
    model = make_model(data)
    steps = 0 if name == "nocot" else data.n_steps
    batch = batch_of(task, data, n=64)
    batch = Batch(batch.prompt, batch.trace[:, :steps], batch.answer, batch.targets)
    cfg = method_cfg(name, feed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    epoch = 4 if name == "coconut" else 0  # stage 2 of coconut: two hidden-state thoughts
    first = float(method_loss(model, cfg, batch, epoch).total.detach())
    for _ in range(40):
        optimizer.zero_grad()
        method_loss(model, cfg, batch, epoch).total.backward()
        optimizer.step()
    last = float(method_loss(model, cfg, batch, epoch).total.detach())
    assert last < 0.7 * first
    assert decode(model, name, batch.prompt, data.n_steps).shape == batch.answer.shape


@pytest.mark.parametrize("k", [0, 1, 2])
def test_coconut_stage_k_labels_line_up_with_an_uncached_forward(tiny, k):
    """Stage k: k thoughts (each the last hidden state so far), then trace[k:]; the positions
    from the last thought (or the last prompt token) on predict trace[k:] and the answer."""
    task, data = tiny
    model = make_model(data).eval()
    batch = batch_of(task, data, n=8)
    prompt_length = batch.prompt.shape[1]
    inputs = model.token_embedding(batch.prompt)
    for _ in range(k):
        _, hidden = model(inputs)
        inputs = torch.cat([inputs, hidden[:, -1:]], dim=1)
    logits, _ = model(torch.cat([inputs, model.token_embedding(batch.trace[:, k:])], dim=1))
    labels = torch.cat([batch.trace[:, k:], batch.answer.unsqueeze(1)], dim=1)
    expected = F.cross_entropy(logits[:, prompt_length - 1 + k :].transpose(1, 2), labels, reduction="none").mean(0)
    loss = method_loss(model, method_cfg("coconut"), batch, epoch=2 * k)  # epochs_per_stage=2
    torch.testing.assert_close(loss.total, expected.mean())
    torch.testing.assert_close(loss.answer, expected[-1])
    assert torch.all(loss.steps[:k] == 0)


def test_coconut_resets_the_optimizer_when_a_stage_begins():
    from cot2cli.stages.train import stage_begins

    coconut = SimpleNamespace(name="coconut", epochs_per_stage=2, reset_optimizer=True)
    assert [e for e in range(10) if stage_begins(coconut, e, n_steps=3)] == [2, 4, 6]  # stages 1, 2, 3
    kept = SimpleNamespace(**{**vars(coconut), "reset_optimizer": False})
    assert not any(stage_begins(kept, e, 3) for e in range(10))
    assert not any(stage_begins(method_cfg("discrete"), e, 3) for e in range(10))


def test_coconut_model_is_built_with_the_methods_dropout(tmp_path):
    from hydra import compose, initialize_config_module

    from cot2cli.config import register_configs
    from cot2cli.stages.train import prepare

    register_configs()
    tiny = ["task.seq_length=3", "task.hi=5", "model=gpt2_1l1h", "model.d_model=16", "model.dropout=0.1",
            "device=cpu", f"paths.outputs={tmp_path}"]
    with initialize_config_module(config_module="cot2cli.conf", version_base="1.3"):
        def dropout(*overrides: str) -> float:
            return prepare(compose(config_name="train", overrides=[*tiny, *overrides])).model_args["dropout"]

        assert dropout("method=coconut") == 0.0  # conf/method/coconut.yaml
        assert dropout("method=coconut", "method.dropout=0.05") == 0.05
        assert dropout("method=coconut", "method.dropout=null") == 0.1
        assert dropout("method=discrete") == 0.1  # the other methods keep model.dropout by default
        assert dropout("method=discrete", "method.dropout=0.0") == 0.0
        with pytest.raises(Cot2Error, match=r"method.dropout=1.5 is out of range"):
            dropout("method=coconut", "method.dropout=1.5")
