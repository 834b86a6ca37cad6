"""Speed figure for `make bench`: one GRPO epoch on MNNS, as the paper's GRPO runs are shaped.

MNNS 1..9 with m = 4 (about 5,250 train prompts x G = 8 rollouts), GPT 1 layer, 1 head,
d = 32, MTS with K = 3, 16 prompts per batch, then the per-epoch validation pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from cot2cli.grpo import GRPOSettings, Sampler, train_epoch
from cot2cli.model import GPT
from cot2cli.stages.rl import rl_data, validation_row
from tasks import get_task
from tasks.mnns import MNNSConfig


def bench_grpo_epoch(device: str = "cpu") -> Callable[[], None]:
    """Build the data and a model once; the returned function runs one GRPO epoch plus validation."""
    task = get_task(OmegaConf.structured(MNNSConfig(lo=1, hi=9, seq_length=4)))
    data = task.build()
    rl = rl_data(task, data, torch.device(device))
    torch.manual_seed(0)
    model = GPT(data.vocab_size, data.prompt.shape[1] + data.n_steps + 1, n_layer=1, n_head=1, d_model=32).to(device)
    model.eval()
    start_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.01, fused=True)  # as cot2 rl
    sampler, settings = Sampler("mts", K=3), GRPOSettings(group_size=8, batch_size=16)
    generator = torch.Generator(device=device).manual_seed(0)

    def epoch() -> None:
        order = torch.randperm(len(rl.train_prompt), generator=generator, device=device)
        train_epoch(model, optimizer, rl.train_prompt, rl.train_index, rl.n_steps, rl.reward, sampler, settings,
                    generator, start_model, order)
        validation_row(model, start_model, rl, "cot2", sampler, 4096, seed=0)

    return epoch
