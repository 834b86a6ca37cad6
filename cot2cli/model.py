"""A small GPT-2-style decoder on plain torch.

It takes input embeddings rather than token ids, so that CoT2 can feed a mixture
of token embeddings (alpha^T E) and COCONUT can feed a hidden state back in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Preallocated per-layer keys/values, so decoding one position at a time
    costs one short forward instead of re-running the whole prefix."""

    def __init__(self, keys: list[Tensor], values: list[Tensor]) -> None:
        self.keys = keys  # per layer: [B, n_head, max_length, head_dim]
        self.values = values
        self.length = 0  # positions already stored; advanced by GPT.forward
        self.last_raw_keys: list[Tensor | None] = [None] * len(keys)  # smeared keys: the newest unsmeared key

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store keys/values [B, H, T, hd] at positions length..length+T-1 and
        return every key/value of this layer up to and including them."""
        end = self.length + key.shape[2]
        if torch.is_grad_enabled() and (key.requires_grad or self.keys[layer].requires_grad):
            # Out of place: earlier positions' attention saved views of the old
            # buffer for backward, and an in-place write would invalidate them.
            self.keys[layer] = self.keys[layer].slice_scatter(key, dim=2, start=self.length, end=end)
            self.values[layer] = self.values[layer].slice_scatter(value, dim=2, start=self.length, end=end)
        else:
            self.keys[layer][:, :, self.length : end] = key
            self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, head_dim: int, dropout: float, smeared_keys: bool = False) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = head_dim
        self.qkv = nn.Linear(d_model, 3 * n_head * head_dim)
        self.proj = nn.Linear(n_head * head_dim, d_model)
        self.drop = nn.Dropout(dropout)
        # per head, the logit of the share of its predecessor's key in each key (0: half and half)
        self.key_smear = nn.Parameter(torch.zeros(n_head)) if smeared_keys else None

    def smear(self, key: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        """key_i + share * (key_{i-1} - key_i): a query can then find a token by the token before it, which a
        plain block only manages by composing two heads (the first position has no predecessor and keeps its key)."""
        first = cache is None or cache.length == 0
        before = key[:, :, :1] if first else cache.last_raw_keys[layer]
        if cache is not None:
            cache.last_raw_keys[layer] = key[:, :, -1:]
        previous = torch.cat([before, key[:, :, :-1]], 2)
        share = torch.sigmoid(self.key_smear).view(1, -1, 1, 1)
        return key + share * (previous - key)

    def forward(
        self, x: Tensor, cache: KVCache | None, layer: int, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.key_smear is not None:
            k = self.smear(k, cache, layer)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.drop(self.proj(y.transpose(1, 2).reshape(batch, length, -1)))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block, as in GPT-2."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, dropout: float, smeared_keys: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, head_dim, dropout, smeared_keys)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(
        self, x: Tensor, cache: KVCache | None, layer: int, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), cache, layer, attn_mask, is_causal)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder with learned positions and an output head tied to the token embedding.

    `smeared_keys` (off in GPT-2) lets every key carry a learned share of its predecessor's key.
    `head_dim` (GPT-2: d_model // n_head) sets each head's width apart from d_model, as T5's d_kv does.
    """

    def __init__(
        self,
        vocab_size: int,
        n_positions: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        dropout: float = 0.1,
        smeared_keys: bool = False,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        sizes = {
            "vocab_size": vocab_size,
            "n_positions": n_positions,
            "n_layer": n_layer,
            "n_head": n_head,
            "d_model": d_model,
        }
        if head_dim is not None:
            sizes["head_dim"] = head_dim
        for name, size in sizes.items():
            if size < 1:
                raise ValueError(f"{name}={size} must be at least 1")
        if head_dim is None and d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.n_positions = n_positions
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.head_dim = d_model // n_head if head_dim is None else head_dim
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(n_positions, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, self.head_dim, dropout, smeared_keys) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init; residual projections are scaled down so the residual
        stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """[...] token ids -> [..., d] embeddings."""
        return self.wte(ids)

    def mixture_embedding(self, weights: Tensor) -> Tensor:
        """[..., V] token weights -> [..., d]: the CoT2 continuous token alpha^T E."""
        return weights @ self.wte.weight

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """Empty cache for up to max_length positions (default n_positions)."""
        length = self.n_positions if max_length is None else max_length
        shape = (batch_size, self.n_head, length, self.head_dim)
        weight = self.wte.weight
        keys = [weight.new_empty(shape) for _ in range(self.n_layer)]
        values = [weight.new_empty(shape) for _ in range(self.n_layer)]
        return KVCache(keys, values)

    def forward(self, inputs_embeds: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """[B, T, d] input embeddings -> ([B, T, V] logits, [B, T, d] hidden states after ln_f).

        With a cache, the inputs sit at positions cache.length .. cache.length+T-1
        and attend to everything cached before them; the cache is then advanced by T.
        """
        length = inputs_embeds.shape[1]
        start = 0 if cache is None else cache.length
        end = start + length
        if end > self.n_positions:
            raise ValueError(f"sequence of length {end} exceeds the model's n_positions={self.n_positions}")
        if cache is not None and end > cache.max_length:
            raise ValueError(f"sequence of length {end} exceeds the cache's max_length={cache.max_length}")

        # A chunk after a non-empty cache is the only case is_causal cannot express:
        # sdpa aligns its causal mask to the top-left, but the queries sit at the end.
        attn_mask = None
        is_causal = start == 0
        if start > 0 and length > 1:
            attn_mask = torch.ones(length, end, dtype=torch.bool, device=inputs_embeds.device).tril(diagonal=start)

        x = self.drop(inputs_embeds + self.wpe.weight[start:end])
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, attn_mask, is_causal)
        if cache is not None:
            cache.length = end
        hidden = self.ln_f(x)
        return F.linear(hidden, self.wte.weight), hidden
