"""First-stage search for evaluation: exact cosine, or an embedded Qdrant collection built as
``D2LLMVectorStore`` builds one (dense, BM25 sparse, and hybrid fused in the query).

The embedded store is Qdrant Edge, as the product's: in a temporary folder for ``:memory:``,
else in the given folder (refused, naming the holder, while another process has it open).
Its searches are exact (``SearchParams(exact=True)``), so the evaluation measures the student
and not HNSW's approximation.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from llama_index_d2llm.trainer.runs import EvaluationError, RunDict


def exact_search(query_vectors: torch.Tensor, passage_vectors: torch.Tensor,
                 passage_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                 chunk: int = 256) -> RunDict:
    """Top ``top_k`` passages per query by cosine similarity (exact, chunked over queries)."""
    passages = torch.nn.functional.normalize(passage_vectors.float(), dim=-1)
    k = min(top_k, len(passage_ids))
    run: RunDict = {}
    for start in range(0, len(query_ids), chunk):
        queries = torch.nn.functional.normalize(query_vectors[start:start + chunk].float(), dim=-1)
        scores, index = (queries @ passages.T).topk(k, dim=1)
        for row, query_id in enumerate(query_ids[start:start + chunk]):
            run[query_id] = {passage_ids[i]: float(s)
                             for s, i in zip(scores[row].tolist(), index[row].tolist(),
                                             strict=True)}
    return run


def qdrant_search(query_vectors: torch.Tensor, passage_vectors: torch.Tensor,
                  passage_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                  location: str = ":memory:") -> RunDict:
    """The same through a local Qdrant collection (cosine), as a deployment would search."""
    return qdrant_runs(query_vectors, passage_vectors, passage_ids, query_ids, top_k,
                       location)["dense"]


@contextmanager
def _open_embedded(location: str) -> Iterator[Any]:
    """The embedded store (Qdrant Edge) at ``location``, a temporary folder for ":memory:"."""
    from llama_index_d2llm.edge import EdgeClient

    with contextlib.ExitStack() as stack:
        folder = (stack.enter_context(tempfile.TemporaryDirectory(prefix="d2llm-eval-"))
                  if location == ":memory:" else location)
        client = EdgeClient.open(folder)
        stack.callback(client.close)
        yield client


def qdrant_runs(query_vectors: torch.Tensor | None, passage_vectors: torch.Tensor | None,
                passage_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                location: str = ":memory:", *, passage_texts: Sequence[str] | None = None,
                query_texts: Sequence[str] | None = None, bm25: Any = None) -> dict[str, RunDict]:
    """Runs of a local Qdrant collection built as ``D2LLMVectorStore`` builds one.

    With vectors: ``"dense"`` (cosine). With texts too: ``"sparse"`` (BM25 sparse vectors,
    IDF by Qdrant) and ``"hybrid"`` (both fused by RRF in one ``query_points`` call, the
    request ``D2LLMRetriever`` sends: ``llama_index_d2llm.sparse.hybrid_query``). Texts
    without vectors: ``"sparse"`` only.
    """
    from qdrant_client import models

    from llama_index_d2llm.sparse import (
        SPARSE_VECTOR_NAME,
        BM25Encoder,
        hybrid_query,
        sparse_vector_params,
    )

    dense_name, sparse_name = "text-dense", SPARSE_VECTOR_NAME
    lexical = passage_texts is not None and query_texts is not None
    if passage_vectors is None and not lexical:
        raise EvaluationError("qdrant_runs needs passage vectors, texts, or both")
    encoder = (bm25 or BM25Encoder()) if lexical else None
    name = "d2llm-evaluation"
    exact = models.SearchParams(exact=True)
    with _open_embedded(location) as client:
        if client.collection_exists(name):
            client.delete_collection(name)
        client.create_collection(
            name, vectors_config={} if passage_vectors is None else {
                dense_name: models.VectorParams(size=passage_vectors.shape[1],
                                                distance=models.Distance.COSINE)},
            sparse_vectors_config={sparse_name: sparse_vector_params()} if lexical else None)
        for start in range(0, len(passage_ids), 512):
            stop = min(start + 512, len(passage_ids))
            vectors: list[dict[str, Any]] = [{} for _ in range(start, stop)]
            if passage_vectors is not None:
                for i, vector in enumerate(passage_vectors[start:stop]):
                    vectors[i][dense_name] = vector.tolist()
            if encoder is not None:
                indices, values = encoder.encode_documents(passage_texts[start:stop])
                for i, (idx, val) in enumerate(zip(indices, values, strict=True)):
                    vectors[i][sparse_name] = models.SparseVector(indices=idx, values=val)
            client.upsert(name, points=[
                models.PointStruct(id=start + i, vector=vector,
                                   payload={"passage_id": passage_ids[start + i]})
                for i, vector in enumerate(vectors)])
        requests: dict[str, list[Any]] = {}
        if passage_vectors is not None:
            requests["dense"] = [dict(query=v.tolist(), using=dense_name, limit=top_k,
                                      params=exact) for v in query_vectors]
        if encoder is not None:
            sparse = [models.SparseVector(indices=i, values=v)
                      for i, v in zip(*encoder.encode_queries(query_texts), strict=True)]
            requests["sparse"] = [dict(query=q, using=sparse_name, limit=top_k) for q in sparse]
            if passage_vectors is not None:
                requests["hybrid"] = [
                    hybrid_query(v.tolist(), q, dense_name=dense_name, sparse_name=sparse_name,
                                 limit=top_k, params=exact)
                    for v, q in zip(query_vectors, sparse, strict=True)]
        runs: dict[str, RunDict] = {}
        for kind, kind_requests in requests.items():
            run: RunDict = {}
            for start in range(0, len(query_ids), 64):
                # the product's request, without the vectors only the IEM needs
                batch = [models.QueryRequest(with_payload=True, **{
                    k: v for k, v in r.items() if k != "with_vectors"})
                    for r in kind_requests[start:start + 64]]
                for query_id, response in zip(query_ids[start:start + 64],
                                              client.query_batch_points(name, batch),
                                              strict=True):
                    run[query_id] = {point.payload["passage_id"]: float(point.score)
                                     for point in response.points}
            runs[kind] = run
        return runs
