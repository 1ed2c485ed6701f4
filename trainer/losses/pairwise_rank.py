"""Rank imitation, hard vs easy negatives (RI_HI): a teacher-weighted pairwise (BPR) loss.

For one query, hard negatives ``j`` (BM25 look-alikes) and easy negatives ``k`` (unrelated
passages), with student logits ``z_S`` and teacher probabilities ``s_T``:

    lambda_jk = max(0, s_T_j - s_T_k)
    L_RI_HI   = mean_{j,k} [ -lambda_jk * log sigmoid(z_S_j - z_S_k) ]

averaged over the queries (the mean runs over all ``H * E`` pairs, as in the released code's
``/ (bs * neg_K * inbatch)``). Only pairs the teacher orders hard-above-easy count, in
proportion to how sure it is. The paper describes an NDCG-based weight instead; the released
code uses this difference of probabilities, which needs no ranking of the whole list.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def pairwise_rank_loss(hard_logits: torch.Tensor, easy_logits: torch.Tensor,
                       hard_probs: torch.Tensor, easy_probs: torch.Tensor) -> torch.Tensor:
    """L_RI_HI for ``(B, H)`` hard and ``(B, E)`` easy student logits and teacher probs."""
    if hard_logits.shape != hard_probs.shape or easy_logits.shape != easy_probs.shape:
        raise ValueError(
            f"hard logits {tuple(hard_logits.shape)} / probs {tuple(hard_probs.shape)} and easy "
            f"logits {tuple(easy_logits.shape)} / probs {tuple(easy_probs.shape)} must match"
        )
    if hard_logits.shape[-1] == 0 or easy_logits.shape[-1] == 0:
        return hard_logits.sum() * 0.0 + easy_logits.sum() * 0.0
    weights = (hard_probs[:, :, None] - easy_probs[:, None, :]).clamp(min=0).to(hard_logits.dtype)
    margins = hard_logits[:, :, None] - easy_logits[:, None, :]
    return (-weights * F.logsigmoid(margins)).mean()
