"""Helpers shared by the LlamaIndex plugin tests: a small corpus, Qdrant stores, counters."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

CORPUS = [
    ("the cat sat on the mat", "animals"),
    ("a dog runs in the park", "animals"),
    ("quantum physics of the sun and the moon", "science"),
    ("water energy and the climate of the city", "science"),
    ("the history of music", "culture"),
    ("protein cell gene cancer", "science"),
    ("a computer network model learns from data", "science"),
    ("the river city and its history", "culture"),
]
TEXTS = [text for text, _ in CORPUS]
QUERY = "the cat and the dog"


def documents() -> list[Any]:
    from llama_index.core import Document

    return [Document(text=text, metadata={"topic": topic}) for text, topic in CORPUS]


def qdrant_store(client: Any = None, collection: str = "docs", **kwargs: Any) -> Any:
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    return QdrantVectorStore(client=client or QdrantClient(":memory:"),
                             collection_name=collection, **kwargs)


def build_index(embed: Any, store: Any = None) -> tuple[Any, Any]:
    """A VectorStoreIndex over CORPUS in a Qdrant collection, embedded by ``embed``."""
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    store = store if store is not None else qdrant_store()
    index = VectorStoreIndex.from_documents(
        documents(), storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embed, transformations=[SentenceSplitter(chunk_size=512)],
    )
    return index, store


def direct_scores(student: Any, query: str, texts: list[str], task: str = "asymmetric"
                  ) -> dict[str, float]:
    """IEM scores computed straight from the student, keyed by passage text."""
    logits = student.score(student.encode([query], kind="query")[0], student.encode(texts),
                           task=task)
    return dict(zip(texts, logits.tolist(), strict=True))


def count_encodes(monkeypatch: Any, student: Any) -> Counter:
    """Count the texts the student encodes, by kind ("query" / "passage")."""
    counts: Counter = Counter()
    original = student.encode

    def counting(texts, kind="passage", *args, **kwargs):
        counts[kind] += len(list(texts))
        return original(texts, kind, *args, **kwargs)

    monkeypatch.setattr(student, "encode", counting)
    return counts


def other_student(backbone: str, seed: int = 1) -> Any:
    """A second student on the same backbone with other weights (same dimension)."""
    from llama_index_d2llm import D2LLMStudent

    student = D2LLMStudent.from_backbone(backbone, pma_heads=4, iem_hidden_size=16,
                                         dtype="float32", seed=seed)
    with torch.no_grad():
        for name, param in student.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    student.merge_lora()
    return student
