"""How a first stage's candidates are rescored: a fusion of their evidence, weighed on dev.

    score(d) = z(cos(q, d)) + lexical * z(bm25(q, d)) + iem * z(iem(q, d))

``z`` standardises a score over the query's candidate list (mean 0, standard deviation 1), so
the three evidences are on one scale whatever their units: the cosine of the student's vectors,
the candidate's BM25 score (Qdrant's, hybrid search only), and the IEM's logit. ``lexical``
and ``iem`` are the weights the distiller chose on dev for this first stage
(``FusionWeights``); a first stage with no recorded fusion (``None``) keeps its own order.

Why scores, not ranks: reciprocal rank fusion, Qdrant's hybrid query, keeps only each list's
order. On held-out SciFact claims (5 folds) the candidates RRF returns, reordered by
``z(cos) + 0.5 z(bm25)``, scored nDCG@10 0.80 against RRF's own 0.73: a passage whose BM25
score stands far above the rest, or whose cosine does, is the relevant one more often than
its rank says. The IEM's logit enters the same way, weighted by what it adds on dev.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: The first stages a student records a fusion for.
FIRST_STAGES = ("dense", "hybrid")
#: The fusion used where the distiller recorded none (no dev queries): cosine and BM25 at the
#: weight that held out best on SciFact, the IEM left out until dev says it helps.
DEFAULT_LEXICAL_WEIGHT = 0.5


def check_first_stage(first_stage: str) -> str:
    if first_stage not in FIRST_STAGES:
        raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {first_stage!r}")
    return first_stage


@dataclass(frozen=True)
class FusionWeights:
    """Weights of BM25 (``lexical``) and the IEM (``iem``) beside the cosine (weight 1)."""

    lexical: float = 0.0
    iem: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lexical", "iem"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):  # JSON reads NaN and Infinity
                raise ValueError(f"the fusion's {name} weight must be a finite number >= 0, "
                                 f"got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def describe(self) -> str:
        """The fusion in words, e.g. ``cosine + 0.5 BM25 + 1 IEM``."""
        parts = ["cosine"]
        parts += [f"{weight:g} {name}" for name, weight in (("BM25", self.lexical),
                                                            ("IEM", self.iem)) if weight > 0]
        return " + ".join(parts)


def default_fusion(first_stage: str) -> FusionWeights:
    """The fusion of a student that recorded none for this first stage."""
    lexical = DEFAULT_LEXICAL_WEIGHT if check_first_stage(first_stage) == "hybrid" else 0.0
    return FusionWeights(lexical=lexical)


def check_fusion(fusion: Mapping[str, Any] | None) -> dict[str, FusionWeights | None]:
    """``{first stage: FusionWeights or None}`` from a config's JSON form, or a ValueError
    naming the bad entry. ``None`` keeps the first stage's order."""
    if fusion is not None and not isinstance(fusion, Mapping):
        raise ValueError(f"the fusion must be {{first stage: weights}}, got {fusion!r}")
    checked: dict[str, FusionWeights | None] = {}
    for stage, weights in (fusion or {}).items():
        check_first_stage(stage)
        if weights is None or isinstance(weights, FusionWeights):
            checked[stage] = weights
        elif isinstance(weights, Mapping) and set(weights) <= {"lexical", "iem"}:
            checked[stage] = FusionWeights(**weights)
        else:
            raise ValueError(f"the fusion for the {stage} first stage must be null or "
                             f"{{'lexical': w, 'iem': w}}, got {weights!r}")
    return checked


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores standardised over the last dimension (a list with no spread gives zeros)."""
    scores = scores.double()
    if scores.shape[-1] < 2:
        return torch.zeros_like(scores)
    centred = scores - scores.mean(-1, keepdim=True)
    spread = scores.std(-1, keepdim=True, unbiased=False)
    return torch.where(spread > 0, centred / spread.clamp_min(1e-12), torch.zeros_like(scores))


def first_stage_scores(count: int | tuple[int, ...]) -> torch.Tensor:
    """Scores that keep candidates in their given order: ``1 / (60 + position)``."""
    shape = (count,) if isinstance(count, int) else count
    positions = torch.arange(1, shape[-1] + 1, dtype=torch.float64)
    return (1.0 / (60.0 + positions)).expand(shape).clone()


def fuse(cosine: torch.Tensor, iem_logits: torch.Tensor, weights: FusionWeights | None,
         lexical: torch.Tensor | None = None) -> torch.Tensor:
    """Fused scores of candidates given in first-stage order (last dimension); higher is
    better. ``lexical`` (their BM25 scores) is needed when ``weights.lexical > 0``."""
    if weights is None:
        return first_stage_scores(tuple(cosine.shape))
    fused = standardize(cosine)
    if weights.lexical > 0:
        if lexical is None:
            raise ValueError("this fusion weighs the candidates' BM25 scores, but none were "
                             "given: pass lexical= (hybrid search returns them)")
        fused = fused + weights.lexical * standardize(lexical.to(fused.device))
    if weights.iem > 0:
        fused = fused + weights.iem * standardize(iem_logits)
    return fused
