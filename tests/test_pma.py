"""PMA's one-query attention equals nn.MultiheadAttention with the same parameters."""

from __future__ import annotations

import torch

from llama_index_d2llm.student.pma import PMAPooling


def test_fast_single_query_attention_matches_multihead_attention():
    torch.manual_seed(0)
    pma = PMAPooling(32, num_heads=4)
    with torch.no_grad():  # non-zero biases, so that every term of the rewrite is exercised
        pma.attention.in_proj_bias.normal_()
        pma.attention.out_proj.bias.normal_()
    states = torch.randn(3, 7, 32, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    seed = pma.seed.expand(3, -1, -1)
    reference, _ = pma.attention(seed, states, states, key_padding_mask=mask == 0,
                                 need_weights=False)
    fast = pma._attend_with_one_query(states, mask)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(fast.sum(), [states, pma.attention.in_proj_weight])
    reference_grads = torch.autograd.grad(reference.sum(), [states, pma.attention.in_proj_weight])
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # padding gets no weight: changing padded states changes nothing
    changed = states.detach().clone()
    changed[1, 4:] = 100.0
    torch.testing.assert_close(pma(changed, mask)[1], pma(states.detach(), mask)[1])
