"""Interaction Emulation Module (IEM): an MLP that emulates the teacher's yes/no judgement.

    f1(q, p)  = ReLU(W1 [q ; p] + b1)                    shared by both tasks
    f2_t(x)   = ReLU(W2_t x + b2_t)                     t in {symmetric, asymmetric}
    z_S       = w_out . f2_t(f1(q, p)) + b_out           shared output layer

``f2_t(...)`` (the 512-d branch output) is the student feature used by feature imitation.

Vectors come in unit-normalised (what Qdrant's cosine collections store), so their
coordinates are about 1/sqrt(d); they are rescaled by sqrt(d) to unit-variance coordinates
before f1, which keeps the default initialisation well conditioned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llama_index_d2llm.student.config import TASKS


class InteractionEmulation(nn.Module):
    def __init__(self, vector_size: int, hidden_size: int = 512):
        super().__init__()
        self.vector_size = vector_size
        self.input_scale = math.sqrt(vector_size)
        self.f1 = nn.Linear(2 * vector_size, hidden_size)
        self.f2 = nn.ModuleDict(
            {task: nn.Linear(hidden_size, hidden_size) for task in TASKS}
        )
        self.output = nn.Linear(hidden_size, 1)

    def features(
        self, queries: torch.Tensor, passages: torch.Tensor, task: str = "asymmetric"
    ) -> torch.Tensor:
        """Branch features for every (query, passage) pair.

        ``queries``: ``(d,)`` or ``(Q, d)``; ``passages``: ``(N, d)`` (shared by all queries)
        or ``(Q, N, d)`` (one list per query). Returns ``(N, h)`` or ``(Q, N, h)``.

        W1 [q ; p] is split as W1q q + W1p p, so each query's half is computed once,
        not once per passage.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        single_query = queries.dim() == 1
        if single_query:
            queries = queries.unsqueeze(0)
        if queries.shape[-1] != self.vector_size or passages.shape[-1] != self.vector_size:
            raise ValueError(
                f"the IEM takes {self.vector_size}-d vectors, got queries {tuple(queries.shape)} "
                f"and passages {tuple(passages.shape)}: were they made by another model?"
            )
        weight_q, weight_p = self.f1.weight.split(self.vector_size, dim=1)
        dtype = self.f1.weight.dtype
        query_part = (queries.to(dtype) * self.input_scale) @ weight_q.T + self.f1.bias
        passage_part = (passages.to(dtype) * self.input_scale) @ weight_p.T
        if passages.dim() == 2:
            hidden = query_part[:, None, :] + passage_part[None, :, :]
        else:
            if passages.shape[0] != queries.shape[0]:
                raise ValueError("one passage list per query is needed for 3-d passages")
            hidden = query_part[:, None, :] + passage_part
        branch = torch.relu(self.f2[task](torch.relu(hidden)))
        return branch.squeeze(0) if single_query else branch

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.output(features).squeeze(-1)

    def forward(
        self, queries: torch.Tensor, passages: torch.Tensor, task: str = "asymmetric"
    ) -> torch.Tensor:
        """IEM logits ``z_S`` of shape ``(N,)`` or ``(Q, N)`` (see ``features``)."""
        return self.logits_from_features(self.features(queries, passages, task))
