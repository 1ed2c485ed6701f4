"""Rank imitation, positives vs hard negatives (RI_PH): one minus the Pearson correlation.

For one query's list [positive, hard negatives] with student logits ``z_S`` and teacher
logits ``z_T`` (the teacher's yes-vs-no log-odds):

    L_RI_PH = 1 - Pearson(z_T, z_S)
            = 1 - sum_j (z_T_j - mean z_T)(z_S_j - mean z_S)
                  / (||z_T - mean z_T|| * ||z_S - mean z_S|| + eps)

averaged over the queries. Pearson ignores the scale and offset of the student's logits and
asks only that they order (and space) the list like the teacher. The released code correlates
with the teacher's probability ``s_T``; the log-odds are used here because probabilities
saturate near 0 and 1, where a confident teacher would stop telling its candidates apart.
"""

from __future__ import annotations

import torch


def pearson_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two ``(B, n)`` tensors, ``(B,)``; constant rows give 0."""
    x = x - x.mean(dim=-1, keepdim=True)
    y = y - y.mean(dim=-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + eps)


def rank_imitation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """L_RI_PH for ``(B, 1 + H)`` student and teacher logits over [positive, hard negatives]."""
    if student_logits.shape != teacher_logits.shape or student_logits.shape[-1] < 2:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be (batch, n) with n >= 2: a correlation needs two candidates"
        )
    return (1.0 - pearson_correlation(student_logits, teacher_logits.to(student_logits.dtype))
            ).mean()
