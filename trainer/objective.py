"""The distillation objective as one module: the student's vectors fed to the losses.

``DistillationModel`` is what the training loop optimizes (one forward per batch, so that DDP
sees the whole step); ``evaluate_objective`` measures it without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.modes import eval_mode
from llama_index_d2llm.trainer.dataset import Collator, TrainingBatch, TrainingExample
from llama_index_d2llm.trainer.encoding import TextEncoder, backbone_encoder, encode_distinct
from llama_index_d2llm.trainer.losses import D2LLMDistillationLoss


class DistillationModel(nn.Module):
    """Student + objective in one module, so that DDP sees one forward per batch."""

    def __init__(self, student: D2LLMStudent, loss: D2LLMDistillationLoss, encoder: TextEncoder,
                 chunk: int = 64):
        super().__init__()
        self.student = student
        self.loss = loss
        self.encoder = encoder
        self.chunk = chunk

    def forward(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        size, listed = len(batch), len(batch.candidate_texts[0])
        easy = len(batch.easy_texts[0]) if batch.easy_texts else 0
        queries = encode_distinct(self.encoder, batch.queries, "query", self.chunk)
        mined = len(batch.mined_texts[0]) if batch.mined_texts else 0
        passages = [t for row in batch.candidate_texts for t in row]
        passages += [t for row in batch.easy_texts for t in row]
        passages += [t for row in batch.mined_texts for t in row]
        vectors = encode_distinct(self.encoder, passages, "passage", self.chunk)
        candidates = vectors[:size * listed].view(size, listed, -1)
        end = size * (listed + easy)
        easy_vectors = vectors[size * listed:end].view(size, easy, -1) if easy else None
        mined_vectors = vectors[end:].view(size, mined, -1) if mined else None
        return self.loss(
            self.student.iem, queries, candidates, batch.tasks, batch.teacher_logits,
            batch.teacher_probs, teacher_cosines=batch.teacher_cosines,
            easy_vectors=easy_vectors, easy_probs=batch.easy_probs if easy else None,
            false_negatives=batch.false_negatives, mined_vectors=mined_vectors,
        )


def evaluate_objective(student: D2LLMStudent, examples: Sequence[TrainingExample],
                       texts: dict[str, str], losses: Any, *, encoder: TextEncoder | None = None,
                       batch_size: int = 16) -> dict[str, float]:
    """Each loss term averaged over ``examples`` in fixed consecutive batches (no gradient).

    A fixed, deterministic measure of the objective (unlike the running training loss, which
    mixes batches and weights of different steps): used to check that training lowers it.
    """
    encoder = encoder or backbone_encoder(student)
    model = DistillationModel(student, D2LLMDistillationLoss(losses), encoder)
    collate = Collator(texts)
    totals: dict[str, float] = {}
    with eval_mode(student), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            for name, value in model(collate(chunk).to(student.device)).items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(chunk)
    return {name: value / len(examples) for name, value in totals.items()}
