"""Pooling by Multihead Attention (PMA): one learnable seed attends over the token states.

    h   = LayerNorm(seed + MultiHeadAttention(seed, H, H, key_padding_mask))
    out = LayerNorm(h + FFN(h))

Unlike the released D2LLM code, scores are scaled by sqrt(head width) (standard attention),
and the residual adds the seed that was attended with. Padding never receives weight.
"""

from __future__ import annotations

import torch
from torch import nn


class PMAPooling(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int = 32, ffn_size: int | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"pma_heads={num_heads} does not divide the backbone's hidden size "
                f"{hidden_size}: choose a divisor of {hidden_size}"
            )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.seed = nn.Parameter(torch.randn(1, 1, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm_attention = nn.LayerNorm(hidden_size)
        ffn_size = ffn_size or hidden_size
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, ffn_size), nn.ReLU(), nn.Linear(ffn_size, hidden_size)
        )
        self.norm_ffn = nn.LayerNorm(hidden_size)

    def forward(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool ``(batch, tokens, hidden)`` states into ``(batch, hidden)``.

        ``attention_mask`` is 1 for real tokens and 0 for padding (the tokenizer's mask).
        """
        batch = token_states.shape[0]
        seed = self.seed.to(token_states.dtype).expand(batch, -1, -1)
        attended, _ = self.attention(
            seed, token_states, token_states,
            key_padding_mask=attention_mask == 0, need_weights=False,
        )
        h = self.norm_attention(seed + attended)
        return self.norm_ffn(h + self.ffn(h)).squeeze(1)
