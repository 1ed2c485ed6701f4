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


def embedded_texts() -> list[str]:
    """What LlamaIndex hands the embed model for each document: metadata, then the text."""
    from llama_index.core.schema import MetadataMode

    return [doc.get_content(metadata_mode=MetadataMode.EMBED) for doc in documents()]


def direct_scores(student: Any, query: str, task: str = "asymmetric") -> dict[str, float]:
    """The student's dense rescoring of every passage (its recorded fusion of cosine and IEM
    logit) computed straight from the student, keyed by passage text (no Qdrant)."""
    scores = student.rescore(student.encode([query], kind="query")[0],
                             student.encode(embedded_texts()), "dense", task=task)
    return dict(zip(TEXTS, scores.tolist(), strict=True))


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


#: The three ways a QdrantVectorStore collection can hold its dense vectors.
VECTOR_LAYOUTS = ("unnamed", "named", "custom-name")


def store_with_layout(layout: str, dimension: int, client: Any = None) -> Any:
    """A store whose collection holds dense vectors unnamed (what QdrantVectorStore creates
    by itself), named "text-dense" (its default name), or under a custom name."""
    from qdrant_client import QdrantClient, models

    client = client or QdrantClient(":memory:")
    params = models.VectorParams(size=dimension, distance=models.Distance.COSINE)
    if layout == "unnamed":
        return qdrant_store(client)
    name = "text-dense" if layout == "named" else "my-dense"
    client.create_collection("docs", vectors_config={name: params})
    store = qdrant_store(client, dense_vector_name=None if layout == "named" else name)
    assert store.dense_vector_name == name
    return store


def hybrid_store(embed: Any, client: Any = None, collection: str = "docs", **kwargs: Any) -> Any:
    """A D2LLMVectorStore (dense + BM25 sparse vectors) for ``embed``'s student."""
    from qdrant_client import QdrantClient

    from llama_index_d2llm import D2LLMVectorStore

    return D2LLMVectorStore(collection, embed, client=client or QdrantClient(":memory:"),
                            **kwargs)


def blas_threads() -> set[int]:
    """The thread counts of the BLAS libraries loaded in this process (threadpoolctl's view)."""
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
