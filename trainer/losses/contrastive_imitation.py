"""Contrastive imitation (CI): InfoNCE over [positive, hard negatives], weighted by the teacher.

For one query with student logits ``z = [z_+, z_1, ..., z_H]`` and teacher probabilities
``s = [s_+, s_1, ..., s_H]`` (``s_T``, the teacher's P(yes)):

    w      = [s_+, 1 - s_1, ..., 1 - s_H]
    L_CI   = -log( exp(w_+ z_+ / tau) / sum_j exp(w_j z_j / tau) )

averaged over the queries of a batch. This is the released D2LLM code's form: the weight
multiplies the logit before the softmax, so the gradient reaching a hard negative is scaled by
``1 - s_T``: a "negative" the teacher thinks answers the query is pushed down less, and a
positive the teacher doubts is pulled up less. With all weights 1 it is plain InfoNCE.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def teacher_weights(teacher_probs: torch.Tensor) -> torch.Tensor:
    """``[s_+, 1 - s_1, ..., 1 - s_H]`` for a ``(B, 1 + H)`` tensor of teacher P(yes)."""
    return torch.cat([teacher_probs[:, :1], 1.0 - teacher_probs[:, 1:]], dim=1)


def contrastive_imitation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """L_CI for ``(B, 1 + H)`` student logits and teacher probabilities (positive first)."""
    if student_logits.shape != teacher_probs.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} must both be (batch, 1 + negatives)"
        )
    weighted = teacher_weights(teacher_probs.to(student_logits.dtype)) * student_logits
    return -F.log_softmax(weighted / temperature, dim=1)[:, 0].mean()
