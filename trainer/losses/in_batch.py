"""In-batch InfoNCE on IEM logits: each query against every positive of the batch.

For a batch of ``B`` queries whose positives are ``p_1 .. p_B``, ``Z_ij = IEM(q_i, p_j)``
(the query's own task branch):

    L_inbatch = mean_i [ -log( exp(Z_ii / tau) / sum_{j allowed} exp(Z_ij / tau) ) ]

where ``j`` is allowed unless ``p_j`` is also relevant to ``q_i`` (the same passage positive
for two queries, or two positives of one query): such a column is not a negative and is
masked out. This is the paper's in-batch term; the other queries' positives are free
negatives, since their vectors are computed for the batch anyway.

Mined negatives ``m_i1 .. m_iN`` of query ``i`` (passages its own first stage ranks high that
are not relevant, see ``--student-negatives``) join the denominator as
``exp(IEM(q_i, m_in) / tau)``: labelled by the judgements, they need no teacher score, and
they teach the IEM the mistakes it will be asked to correct when it reranks vector-search
candidates.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def mask_false_negatives(logits: torch.Tensor,
                         false_negatives: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with ``-inf`` where ``false_negatives`` is True (the diagonal must stay False)."""
    if false_negatives is None:
        return logits
    if false_negatives.shape != logits.shape:
        raise ValueError(f"mask {tuple(false_negatives.shape)} does not match logits "
                         f"{tuple(logits.shape)}")
    return logits.masked_fill(false_negatives.to(logits.device), float("-inf"))


def in_batch_loss(logits: torch.Tensor, false_negatives: torch.Tensor | None = None,
                  temperature: float = 1.0,
                  mined_logits: torch.Tensor | None = None) -> torch.Tensor:
    """L_inbatch for a ``(B, B)`` matrix of query-vs-positive logits (targets on the diagonal),
    with optional ``(B, N)`` logits of each query's mined negatives as extra columns."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"in-batch logits must be a square (batch, batch) matrix, got "
                         f"{tuple(logits.shape)}")
    logits = mask_false_negatives(logits / temperature, false_negatives)
    if mined_logits is not None and mined_logits.numel():
        if mined_logits.dim() != 2 or mined_logits.shape[0] != logits.shape[0]:
            raise ValueError(f"mined-negative logits {tuple(mined_logits.shape)} must be "
                             f"(batch, N) with batch {logits.shape[0]}")
        logits = torch.cat([logits, mined_logits / temperature], dim=1)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)
