"""Pooling by Multihead Attention (PMA): one learnable seed attends over the token states.

    h   = LayerNorm(seed + MultiHeadAttention(seed, H, H, key_padding_mask))
    out = LayerNorm(h + FFN(h))

Unlike the released D2LLM code, scores are scaled by sqrt(head width) (standard attention),
and the residual adds the seed that was attended with. Padding never receives weight.

With a single query (the seed), multi-head attention can be computed without projecting every
token to keys and values (``tokens x hidden^2`` work, which dominated a frozen-backbone
training step): a head's scores are ``x_t . (W_k,h^T q_h)`` (the key bias only shifts all
scores of a head equally, so it cancels in the softmax), and since the weights sum to one its
output is ``W_v,h (sum_t a_t x_t) + b_v,h``. That is ``tokens x hidden x heads`` work, the same
function as ``nn.MultiheadAttention`` with the same parameters (kept, so checkpoints load).

With ``base_pooling`` ("mean", "cls": ``pooling.py``) the output is the backbone's own pooling
plus a gated PMA, ``base_pool(H) + gate * PMA(H)`` with ``gate`` starting at 0: an untrained
student embeds exactly as its encoder does, and training learns how much PMA to add.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_index_d2llm.student.pooling import base_pool, check_base_pooling


class PMAPooling(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int = 32, ffn_size: int | None = None,
                 base_pooling: str | None = None):
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
        self.base_pooling = check_base_pooling(base_pooling)
        if self.base_pooling is not None:  # only then: older checkpoints have no gate
            self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool ``(batch, tokens, hidden)`` states into ``(batch, hidden)``.

        ``attention_mask`` is 1 for real tokens and 0 for padding (the tokenizer's mask).
        """
        batch = token_states.shape[0]
        seed = self.seed.to(token_states.dtype).expand(batch, -1, -1)
        if self.attention.dropout and self.training:  # the general path applies dropout
            attended, _ = self.attention(
                seed, token_states, token_states,
                key_padding_mask=attention_mask == 0, need_weights=False,
            )
        else:
            attended = self._attend_with_one_query(token_states, attention_mask)
        h = self.norm_attention(seed + attended)
        pooled = self.norm_ffn(h + self.ffn(h)).squeeze(1)
        if self.base_pooling is None:
            return pooled
        base = base_pool(token_states, attention_mask, self.base_pooling)
        return base + self.gate.to(pooled.dtype) * pooled

    def _attend_with_one_query(self, token_states: torch.Tensor,
                               attention_mask: torch.Tensor) -> torch.Tensor:
        """``nn.MultiheadAttention(seed, x, x)`` in O(tokens x hidden x heads), ``(B, 1, h)``."""
        hidden, heads = self.hidden_size, self.num_heads
        width = hidden // heads
        w_q, w_k, w_v = self.attention.in_proj_weight.split(hidden)
        b_q, _, b_v = self.attention.in_proj_bias.split(hidden)
        query = (self.seed.reshape(1, hidden) @ w_q.T + b_q).reshape(heads, width)
        # key directions per head: (hidden, heads), scaled as in scaled dot-product attention
        directions = torch.einsum("hd,hde->eh", query, w_k.reshape(heads, width, hidden))
        scores = token_states @ (directions * width**-0.5).to(token_states.dtype)  # (B, T, H)
        scores = scores.masked_fill((attention_mask == 0)[..., None], float("-inf"))
        weights = scores.softmax(dim=1)
        pooled = torch.einsum("bth,bte->bhe", weights, token_states)  # (B, H, hidden)
        values = torch.einsum("bhe,hde->bhd", pooled, w_v.reshape(heads, width, hidden))
        values = values.reshape(-1, hidden) + b_v
        return self.attention.out_proj(values).unsqueeze(1)
