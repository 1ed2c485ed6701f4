"""Teacher-weighted contrastive loss on the PMA vectors, for first-stage nearest-neighbour search.

The paper trains the vectors only through the IEM, whose input they are; nothing asks their
plain cosine to rank well, yet a vector store finds candidates by cosine before the IEM
reranks them. This loss asks it directly. For query ``q`` with positive ``p``, hard negatives
``n_1 .. n_H`` (teacher probabilities ``s_j``) and the other in-batch positives ``b_k``, all
vectors unit-normalised:

    logits = [ cos(q, p),  (1 - s_1) cos(q, n_1), ..., (1 - s_H) cos(q, n_H),
               cos(q, b_1), ..., cos(q, b_K),  cos(q, m_1), ..., cos(q, m_N) ] / tau
    L_vec  = -log softmax(logits)[0]

averaged over the queries, with ``tau`` about 0.05 (cosines lie in [-1, 1], so a small
temperature is needed for a peaked softmax). Hard negatives carry the contrastive-imitation
weight ``1 - s_T`` (one the teacher accepts is pushed away less); the labelled positive and
in-batch positives are unweighted. In-batch columns that are relevant to the query are masked.
``m_1 .. m_N`` are optional mined negatives (the student's own best wrong answers over the
whole corpus, labelled by the judgements), unweighted: the candidates a vector search would
return, which BM25's negatives and the batch do not resemble.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from llama_index_d2llm.trainer.losses.in_batch import mask_false_negatives


def vector_contrastive_loss(query_vectors: torch.Tensor, candidate_vectors: torch.Tensor,
                            teacher_probs: torch.Tensor | None = None,
                            false_negatives: torch.Tensor | None = None,
                            temperature: float = 0.05,
                            mined_vectors: torch.Tensor | None = None) -> torch.Tensor:
    """L_vec for ``(B, d)`` queries and ``(B, 1 + H, d)`` candidates [positive, hard negatives].

    The in-batch negatives are the other rows' positives (``candidate_vectors[:, 0]``);
    ``false_negatives`` (``(B, B)``, diagonal False) masks those relevant to a query;
    ``teacher_probs`` (``(B, 1 + H)``) weights the hard negatives, None leaves them unweighted;
    ``mined_vectors`` (``(B, N, d)``) are extra negatives per query.
    """
    if candidate_vectors.dim() != 3 or query_vectors.shape[0] != candidate_vectors.shape[0]:
        raise ValueError(f"queries {tuple(query_vectors.shape)} must be (batch, d) and "
                         f"candidates {tuple(candidate_vectors.shape)} (batch, 1 + H, d)")
    queries = F.normalize(query_vectors, dim=-1)
    candidates = F.normalize(candidate_vectors, dim=-1)
    own = torch.einsum("bd,bnd->bn", queries, candidates)
    if teacher_probs is not None:
        weights = torch.cat([torch.ones_like(teacher_probs[:, :1]), 1.0 - teacher_probs[:, 1:]],
                            dim=1)
        own = own * weights.to(own.dtype)
    batch = queries @ candidates[:, 0].T
    eye = torch.eye(batch.shape[0], dtype=torch.bool, device=batch.device)
    mask = eye if false_negatives is None else eye | false_negatives.to(batch.device)
    others = mask_false_negatives(batch, mask)  # the own positive is already in `own`
    columns = [own, others]
    if mined_vectors is not None and mined_vectors.shape[1]:
        columns.append(torch.einsum("bd,bnd->bn", queries, F.normalize(mined_vectors, dim=-1)))
    logits = torch.cat(columns, dim=1) / temperature
    return -F.log_softmax(logits, dim=1)[:, 0].mean()
