"""Feature imitation (FI): match the teacher's similarity structure over one query's list.

For one query's list [positive, hard negatives] of ``n`` candidates, ``Y_T`` the teacher's
last-token features of each (query, candidate) prompt and ``F_S`` the student's IEM branch
features of each (query vector, candidate vector) pair, with ``cos(X)`` the ``n x n`` matrix
of row cosines:

    L_FI = || cos(Y_T) - cos(F_S) ||_F^2

averaged over the queries. Only the cosine matrices are compared, so teacher and student
features may have different widths; the teacher's matrix is computed once and cached.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cosine_matrix(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(..., n, n)`` cosine similarities between the rows of ``(..., n, h)`` features."""
    unit = F.normalize(features, dim=-1, eps=eps)
    return unit @ unit.transpose(-1, -2)


def feature_imitation_loss(student_features: torch.Tensor,
                           teacher_cosines: torch.Tensor) -> torch.Tensor:
    """L_FI for ``(B, n, h)`` student features and ``(B, n, n)`` teacher cosine matrices."""
    if (student_features.dim() != 3 or teacher_cosines.shape
            != (*student_features.shape[:2], student_features.shape[1])):
        raise ValueError(
            f"student features {tuple(student_features.shape)} must be (batch, n, h) and teacher "
            f"cosines {tuple(teacher_cosines.shape)} (batch, n, n)"
        )
    difference = cosine_matrix(student_features) - teacher_cosines.to(student_features.dtype)
    return difference.pow(2).sum(dim=(-1, -2)).mean()
