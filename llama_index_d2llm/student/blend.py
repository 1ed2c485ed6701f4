"""How far to trust the IEM over the first stage it rescores: a rank blend chosen on dev.

    score(d) = (1 - w) / (K + rank_first(d)) + w / (K + rank_iem(d)),        K = 60

``rank_first(d)`` is the candidate's 1-based position in the first stage's order (cosine for
dense search, the fused order for hybrid search) and ``rank_iem(d)`` its position by IEM
logit. ``w = 0`` returns the first stage's order unchanged, so the IEM can never make the
ranking worse than the search it rescores; ``w = 1`` orders by the IEM alone (the paper's
rescoring). Ranks, not scores, because the hybrid first stage has no score on the IEM's scale.

Why a blend at all: on held-out SciFact claims the IEM alone ranked the dense top 100 slightly
worse than its cosine, and the hybrid top 100 much worse (it threw away the lexical evidence).
The distiller picks ``w`` per first stage on a whole-corpus dev ranking and records it in the
student's config (``iem_weights``); a weight missing there means 1 (students distilled before
the blend existed).
"""

from __future__ import annotations

import torch

#: The first stages a student records an IEM weight for.
FIRST_STAGES = ("dense", "hybrid")
#: Rank constant of the blend (reciprocal rank fusion's usual 60).
RANK_CONSTANT = 60
#: Weights the distiller tries on dev.
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_first_stage(first_stage: str) -> str:
    if first_stage not in FIRST_STAGES:
        raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {first_stage!r}")
    return first_stage


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Weights in [0, 1] for known first stages, or a ValueError naming the bad entry."""
    for stage, weight in weights.items():
        check_first_stage(stage)
        if not isinstance(weight, (int, float)) or not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"the IEM weight for the {stage} first stage must be a number in "
                             f"[0, 1], got {weight!r}")
    return {stage: float(weight) for stage, weight in weights.items()}


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each entry of the last dimension, best (highest) first; ties keep order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return ranks


def blend_ranks(iem_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """Blended scores of candidates given in first-stage order (last dimension).

    ``iem_logits``: ``(N,)`` or ``(Q, N)``, candidate ``i`` being the first stage's
    ``i``-th best. Returns scores of the same shape, higher is better.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"IEM weight must be in [0, 1], got {weight}")
    count = iem_logits.shape[-1]
    first = torch.arange(1, count + 1, dtype=torch.float64).expand(iem_logits.shape)
    iem = _ranks(iem_logits.double()).double()
    return (1.0 - weight) / (RANK_CONSTANT + first) + weight / (RANK_CONSTANT + iem)
