"""Interaction Emulation Module (IEM): an MLP that emulates the teacher's yes/no judgement.

    f1(q, p)  = ReLU(W1 [q ; p] + b1)                    shared by both tasks
    f2_t(x)   = ReLU(W2_t x + b2_t)                     t in {symmetric, asymmetric}
    z_S       = w_out . f2_t(f1(q, p)) + b_out           shared output layer
              [+ exp(a) cos(q, p)]                       cosine skip (``cosine_skip=True``)

``f2_t(...)`` (the 512-d branch output) is the student feature used by feature imitation.

The cosine skip is this package's addition to the paper's head. In a vector database the IEM
rescores the first stage's top k, which holds many passages far from anything it saw in
training (it learns on BM25's hard negatives); a bare MLP scored such strangers at random and
ranked SciFact's dev claims far worse than the cosine it was rescoring. With the skip, the
MLP's output layer starts at zero and ``a`` at log(20), so an untrained head ranks exactly like
the first stage and training learns a correction to it.

Vectors come in unit-normalised (what Qdrant's cosine collections store), so their
coordinates are about 1/sqrt(d); they are rescaled by sqrt(d) to unit-variance coordinates
before f1, which keeps the default initialisation well conditioned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llama_index_d2llm.student.config import TASKS

#: Initial weight of the cosine skip: 1 / 0.05, the vector loss's temperature.
INITIAL_COSINE_SCALE = 20.0


class InteractionEmulation(nn.Module):
    def __init__(self, vector_size: int, hidden_size: int = 512, cosine_skip: bool = True):
        super().__init__()
        self.vector_size = vector_size
        self.input_scale = math.sqrt(vector_size)
        self.f1 = nn.Linear(2 * vector_size, hidden_size)
        self.f2 = nn.ModuleDict(
            {task: nn.Linear(hidden_size, hidden_size) for task in TASKS}
        )
        self.output = nn.Linear(hidden_size, 1)
        self.cosine_skip = cosine_skip
        if cosine_skip:
            self.log_cosine_scale = nn.Parameter(torch.tensor(math.log(INITIAL_COSINE_SCALE)))
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

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

    def cosine_term(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """``exp(a) cos(q, p)``, shaped like the logits (``(N,)``, ``(Q, N)``)."""
        single_query = queries.dim() == 1
        q = nn.functional.normalize(queries.float(), dim=-1)
        q = q.unsqueeze(0) if single_query else q
        p = nn.functional.normalize(passages.float(), dim=-1)
        cosine = q @ p.T if p.dim() == 2 else torch.einsum("qd,qnd->qn", q, p)
        cosine = cosine * self.log_cosine_scale.exp()
        return cosine.squeeze(0) if single_query else cosine

    def logits(self, queries: torch.Tensor, passages: torch.Tensor,
               features: torch.Tensor) -> torch.Tensor:
        """``z_S`` from features already computed for these vectors (adds the cosine skip)."""
        logits = self.logits_from_features(features)
        if self.cosine_skip:
            logits = logits + self.cosine_term(queries, passages).to(logits.dtype)
        return logits

    def forward(
        self, queries: torch.Tensor, passages: torch.Tensor, task: str = "asymmetric"
    ) -> torch.Tensor:
        """IEM logits ``z_S`` of shape ``(N,)`` or ``(Q, N)`` (see ``features``)."""
        return self.logits(queries, passages, self.features(queries, passages, task))
