"""The documents-only benchmark's rankings through the product: ``D2LLMVectorStore`` (the
embedded store, a folder) and ``D2LLMRetriever``, exactly as the README uses them.

The corpus's passages go into a fresh store with the student's vectors (encoded once, the same
vectors as the in-memory rows) and the store's own BM25 vectors; every judged question is then
retrieved four ways (``similarity_top_k=100``, every candidate returned):

- ``bm25``: Qdrant's sparse search alone (the store's BM25 vectors, IDF on Qdrant's side);
- ``dense`` / ``hybrid``: the first stage's order (cosine; RRF of the dense and BM25 top 100s);
- ``dense_rescored`` / ``hybrid_rescored``: the retriever's order, rescored by the fusion the
  student recorded (the default fusion for a student that recorded none).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from typing import Any

import torch

from llama_index_d2llm.trainer.runs import RunDict

DEPTH = 100


def store_runs(student: Any, ids: list[str], texts: list[str], queries: dict[str, str],
               passage_vectors: torch.Tensor, query_vectors: torch.Tensor) -> dict[str, Any]:
    """Every row's run through a fresh embedded store, and the seconds each stage took."""
    from llama_index.core.schema import QueryBundle, TextNode

    from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMVectorStore
    from llama_index_d2llm.ranking import RETRIEVAL_SCORE_KEY

    embed = D2LLMEmbedding.from_student(student)
    nodes = [TextNode(id_=str(uuid.uuid5(uuid.NAMESPACE_URL, pid)), text=text,
                      metadata={"passage_id": pid}, embedding=passage_vectors[i].tolist(),
                      excluded_embed_metadata_keys=["passage_id"],
                      excluded_llm_metadata_keys=["passage_id"])
             for i, (pid, text) in enumerate(zip(ids, texts, strict=True))]
    vectors = dict(zip(queries, query_vectors.float().tolist(), strict=True))
    runs: dict[str, Any] = {"seconds": {}}
    with tempfile.TemporaryDirectory() as folder:
        store = D2LLMVectorStore("docs_only", embed, path=folder)
        try:
            start = time.perf_counter()
            for first in range(0, len(nodes), 512):
                store.add(nodes[first:first + 512])
            runs["seconds"]["add"] = round(time.perf_counter() - start, 2)
            runs["bm25"] = _sparse_run(store, queries)
            for stage in ("dense", "hybrid"):
                retriever = D2LLMRetriever(vector_store=store, embed_model=embed,
                                           similarity_top_k=DEPTH, top_n=DEPTH,
                                           hybrid=stage == "hybrid")
                first_stage: RunDict = {}
                rescored: RunDict = {}
                start = time.perf_counter()
                for query_id, text in queries.items():
                    hits = retriever.retrieve(QueryBundle(query_str=text,
                                                          embedding=vectors[query_id]))
                    rescored[query_id] = {h.node.metadata["passage_id"]: float(h.score)
                                          for h in hits}
                    first_stage[query_id] = {
                        h.node.metadata["passage_id"]: float(h.node.metadata[RETRIEVAL_SCORE_KEY])
                        for h in hits}
                runs["seconds"][stage] = round(time.perf_counter() - start, 2)
                runs[stage], runs[f"{stage}_rescored"] = first_stage, rescored
        finally:
            store.close()
    return runs


def _sparse_run(store: Any, queries: dict[str, str]) -> RunDict:
    """Qdrant's BM25 alone: the store's sparse vectors searched with the query's."""
    from llama_index_d2llm.sparse import SPARSE_VECTOR_NAME, BM25Encoder

    encoder = BM25Encoder()
    run: RunDict = {}
    for query_id, text in queries.items():
        points = store.client.query_points(
            store.collection_name, query=encoder.query_vector(text), using=SPARSE_VECTOR_NAME,
            limit=DEPTH, with_payload=True).points
        run[query_id] = {p.payload["passage_id"]: float(p.score) for p in points}
    return run
