"""Texts to student vectors during training: through the backbone, or from cached states.

Training, dev evaluation and student-negative mining all take a ``TextEncoder``, so that the
same code runs whether the backbone is tuned (LoRA) or frozen with its token states cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.trainer.token_states import TokenStateCache

#: ``encoder(texts, kind)`` -> one vector per text; ``kind`` is "query" or "passage".
TextEncoder = Callable[[Sequence[str], str], torch.Tensor]


def backbone_encoder(student: D2LLMStudent) -> TextEncoder:
    """Vectors through the (LoRA-tuned) backbone, with gradients when enabled."""
    return lambda texts, kind: student.embed(student.tokenize(list(texts), kind))


def cached_encoder(cache: TokenStateCache) -> TextEncoder:
    """Vectors from cached frozen-backbone states: PMA (and the tuned top blocks) run."""
    return cache.vectors


def encode_distinct(encoder: TextEncoder, texts: Sequence[str], kind: str,
                    chunk: int) -> torch.Tensor:
    """Vectors for ``texts`` (in order), each distinct text encoded once, ``chunk`` at a time."""
    distinct = list(dict.fromkeys(texts))
    vectors = torch.cat([encoder(distinct[i:i + chunk], kind)
                         for i in range(0, len(distinct), chunk)])
    position = {text: i for i, text in enumerate(distinct)}
    return vectors[torch.tensor([position[t] for t in texts], device=vectors.device)]
