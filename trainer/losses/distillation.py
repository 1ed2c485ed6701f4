"""The full D2LLM distillation objective: the weighted sum of the individual losses.

    L = w_inbatch L_inbatch + w_CI L_CI + alpha L_RI_PH + beta L_RI_HI + gamma L_FI + w_vec L_vec

Defaults are the released D2LLM weights (in-batch 1, CI 1, Pearson 1, pairwise 0.01, feature
0.001, temperatures 1) plus the vector loss (weight 1, temperature 0.05) that this package adds
so that the PMA vectors work for first-stage cosine search. A weight of 0 skips a term (it is
not even computed). Each example carries its task, and the IEM branch of that task scores it,
so symmetric and asymmetric examples can share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from llama_index_d2llm.student.settings import check_finite_floats, from_known_keys
from llama_index_d2llm.trainer.losses.contrastive_imitation import contrastive_imitation_loss
from llama_index_d2llm.trainer.losses.feature_imitation import feature_imitation_loss
from llama_index_d2llm.trainer.losses.in_batch import in_batch_loss
from llama_index_d2llm.trainer.losses.pairwise_rank import pairwise_rank_loss
from llama_index_d2llm.trainer.losses.rank_imitation import rank_imitation_loss
from llama_index_d2llm.trainer.losses.vector_contrastive import vector_contrastive_loss
from llama_index_d2llm.trainer.options import setting


@dataclass
class LossWeights:
    """Weights and temperatures of the distillation losses (JSON round trip via ``asdict``)."""

    in_batch: float = setting(1.0, flag="--in-batch-weight", help=(
        "In-batch InfoNCE on IEM logits."))
    contrastive_imitation: float = setting(1.0, flag="--ci-weight", help=(
        "Contrastive imitation: InfoNCE over [positive, hard negatives] weighted by the "
        "teacher."))
    rank_imitation: float = setting(1.0, flag="--pearson-weight", help=(
        "Rank imitation: 1 - Pearson(teacher, student) over [positive, hard negatives]."))
    pairwise_rank: float = setting(0.01, flag="--pairwise-weight", help=(
        "Rank imitation hard vs easy negatives (weighted BPR)."))
    feature_imitation: float = setting(0.001, flag="--feature-weight", help=(
        "Feature imitation: teacher vs student cosine matrices."))
    vector: float = setting(1.0, flag="--vector-loss-weight", help=(
        "Teacher-weighted contrastive loss on the vectors' cosine, for first-stage vector "
        "search (0 disables it)."))
    temperature_in_batch: float = setting(1.0, help="Temperature of the in-batch loss.")
    temperature_contrastive: float = setting(1.0, flag="--temperature-ci", help=(
        "Temperature of contrastive imitation."))
    temperature_vector: float = setting(0.05, help="Temperature of the vector loss.")

    def __post_init__(self) -> None:
        check_finite_floats(self, lambda name, value: ValueError(
            f"loss {name} must be a finite number, got {value!r}"))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("temperature") and not value > 0:
                raise ValueError(f"loss {f.name} must be > 0, got {value}")
            if not f.name.startswith("temperature") and value < 0:
                raise ValueError(f"loss weight {f.name} must be >= 0 (0 disables it), got {value}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossWeights:
        return from_known_keys(cls, data, lambda unknown, known: ValueError(
            f"unknown loss settings {unknown}; known: {known}"))

    @property
    def needs_teacher_features(self) -> bool:
        return self.feature_imitation > 0

    @property
    def needs_easy_negatives(self) -> bool:
        return self.pairwise_rank > 0


def _task_groups(tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        groups.setdefault(task, []).append(index)
    return {task: torch.tensor(index, dtype=torch.long) for task, index in groups.items()}


class D2LLMDistillationLoss(nn.Module):
    """Computes every enabled loss for one batch; returns the total and each term (detached)."""

    def __init__(self, weights: LossWeights | None = None):
        super().__init__()
        self.weights = weights or LossWeights()

    def forward(
        self,
        iem: nn.Module,
        query_vectors: torch.Tensor,
        candidate_vectors: torch.Tensor,
        tasks: Sequence[str],
        teacher_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        *,
        teacher_cosines: torch.Tensor | None = None,
        easy_vectors: torch.Tensor | None = None,
        easy_probs: torch.Tensor | None = None,
        false_negatives: torch.Tensor | None = None,
        mined_vectors: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Shapes: queries ``(B, d)``, candidates ``(B, 1 + H, d)`` [positive, hard negatives],
        teacher logits/probs ``(B, 1 + H)``, teacher cosines ``(B, 1 + H, 1 + H)``, easy
        negatives ``(B, E, d)`` with teacher probs ``(B, E)``, ``false_negatives`` ``(B, B)``
        True where another example's positive is relevant to this query; ``mined_vectors``
        ``(B, N, d)`` the queries' mined negatives (judgement-labelled, no teacher score),
        extra negatives of the in-batch and vector terms."""
        w = self.weights
        batch = query_vectors.shape[0]
        positives = candidate_vectors[:, 0]
        device = query_vectors.device
        features = logits = easy_logits = in_batch_logits = mined_logits = None
        mined = mined_vectors if mined_vectors is not None and mined_vectors.shape[1] else None
        need_easy = (w.pairwise_rank > 0 and easy_vectors is not None and easy_probs is not None
                     and easy_vectors.shape[1] > 0)
        for task, index in _task_groups(tasks).items():
            index = index.to(device)
            queries = query_vectors[index]
            group_features = iem.features(queries, candidate_vectors[index], task)
            if features is None:
                features = query_vectors.new_zeros((batch, *group_features.shape[1:]))
                logits = query_vectors.new_zeros(candidate_vectors.shape[:2])
            features[index] = group_features
            logits[index] = iem.logits(queries, candidate_vectors[index], group_features)
            if need_easy:
                if easy_logits is None:
                    easy_logits = query_vectors.new_zeros(easy_vectors.shape[:2])
                easy_logits[index] = iem(queries, easy_vectors[index], task)
            if w.in_batch > 0:
                if in_batch_logits is None:
                    in_batch_logits = query_vectors.new_zeros((batch, batch))
                in_batch_logits[index] = iem(queries, positives, task)
                if mined is not None:
                    if mined_logits is None:
                        mined_logits = query_vectors.new_zeros(mined.shape[:2])
                    mined_logits[index] = iem(queries, mined[index], task)

        terms: dict[str, torch.Tensor] = {}
        if w.in_batch > 0:
            terms["in_batch"] = in_batch_loss(in_batch_logits, false_negatives,
                                              w.temperature_in_batch, mined_logits)
        if w.contrastive_imitation > 0:
            terms["contrastive_imitation"] = contrastive_imitation_loss(
                logits, teacher_probs, w.temperature_contrastive)
        if w.rank_imitation > 0 and logits.shape[1] > 1:
            terms["rank_imitation"] = rank_imitation_loss(logits, teacher_logits)
        if need_easy:
            terms["pairwise_rank"] = pairwise_rank_loss(logits[:, 1:], easy_logits,
                                                        teacher_probs[:, 1:], easy_probs)
        if w.feature_imitation > 0 and teacher_cosines is not None:
            terms["feature_imitation"] = feature_imitation_loss(features, teacher_cosines)
        if w.vector > 0:
            terms["vector"] = vector_contrastive_loss(query_vectors, candidate_vectors,
                                                      teacher_probs, false_negatives,
                                                      w.temperature_vector, mined)
        if not terms:
            raise ValueError("every loss weight is 0: enable at least one loss")
        total = sum(getattr(w, name) * value for name, value in terms.items())
        result = {name: value.detach() for name, value in terms.items()}
        result["loss"] = total
        return result
