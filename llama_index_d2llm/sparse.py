"""BM25 sparse vectors for Qdrant hybrid search, made offline, and the one hybrid query.

Why ``qdrant-edge-py``'s ``Bm25``: it is Qdrant's own BM25 document/query encoder (the one a
Qdrant server runs for ``models.Document(text, model="qdrant/bm25")``: word tokenizer,
English stop words and Snowball stemmer compiled in), so it needs no download. The others do
not run offline: fastembed's ``Qdrant/bm25`` downloads its stop words from a model hub, and
qdrant-client's local mode hands ``models.Document`` to fastembed (only a server encodes it
itself).

Why Qdrant's IDF modifier: a sparse document vector holds only the saturated term frequency
``tf (k1 + 1) / (tf + k1 (1 - b + b len / avg_len))``; Qdrant multiplies it at query time by
``idf(t) = ln((N - df + 0.5) / (df + 0.5) + 1)`` from the collection's live statistics, so the
document frequencies stay right as nodes are added and deleted. ``avg_len`` is a fixed
setting (the server's default, 256 tokens), not measured: a stored vector cannot change when
the corpus does.

Why one ``query_points`` call with two prefetches and an RRF query: Qdrant fuses on its side
(embedded, on a server or on a cluster alike) and returns the fused candidates with their
dense vectors, which the IEM rescores. Qdrant's RRF scores a hit ``1 / (k + position)``,
position counted from 0, so ``k = 61`` is ranx's ``1 / (60 + rank)`` (the evaluation's RRF).
An RRF query with its own ``k`` needs a Qdrant server 1.16 or later (embedded mode has it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError

#: QdrantVectorStore's default name of the sparse vector.
SPARSE_VECTOR_NAME = "text-sparse-new"
#: Qdrant's RRF constant that equals ranx's k=60 (see the module docstring).
RRF_K = 61

SparseBatch = tuple[list[list[int]], list[list[float]]]


@dataclass(frozen=True)
class BM25Settings:
    """BM25 parameters of the document vectors (the query side has none: weight 1 a term)."""

    k1: float = 1.2
    b: float = 0.75
    avg_len: float = 256.0
    language: str = "english"


class BM25Encoder:
    """Texts -> BM25 sparse vectors (indices, values), in the shape QdrantVectorStore's
    ``sparse_doc_fn`` / ``sparse_query_fn`` take: ``encode_documents`` and ``encode_queries``.
    """

    def __init__(self, settings: BM25Settings | None = None):
        try:
            from qdrant_edge import Bm25, Bm25Config
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise D2LLMError("hybrid search needs the qdrant-edge-py package (Qdrant's offline "
                             "BM25): pip install qdrant-edge-py") from exc
        self.settings = settings or BM25Settings()
        s = self.settings
        self._model = Bm25(Bm25Config(k=s.k1, b=s.b, avg_len=s.avg_len, language=s.language))

    def describe(self) -> dict[str, Any]:
        """What the collection record keeps, so that a query is encoded as its documents were."""
        return {"encoder": "qdrant-edge Bm25", **asdict(self.settings)}

    def encode_documents(self, texts: Sequence[str]) -> SparseBatch:
        return _batch(self._model.embed_document(text) for text in texts)

    def encode_queries(self, texts: Sequence[str]) -> SparseBatch:
        return _batch(self._model.embed_query(text) for text in texts)

    def query_vector(self, text: str) -> Any:
        """One query as a ``models.SparseVector``."""
        from qdrant_client import models

        indices, values = self.encode_queries([text])
        return models.SparseVector(indices=indices[0], values=values[0])


def _batch(vectors: Any) -> SparseBatch:
    indices, values = [], []
    for vector in vectors:
        indices.append([int(i) for i in vector.indices])
        values.append([float(v) for v in vector.values])
    return indices, values


def sparse_vector_params() -> Any:
    """The sparse vector's collection config: Qdrant computes BM25's IDF (Modifier.IDF)."""
    from qdrant_client import models

    return models.SparseVectorParams(modifier=models.Modifier.IDF)


def hybrid_query(dense: Sequence[float], sparse: Any, *, dense_name: str, sparse_name: str,
                 limit: int, query_filter: Any = None, params: Any = None) -> dict[str, Any]:
    """``query_points`` / ``QueryRequest`` arguments of a hybrid search: the dense and the
    sparse top ``limit``, each under ``query_filter`` (and search ``params``, e.g. exact),
    fused by RRF, with the dense vectors."""
    from qdrant_client import models

    prefetch = [models.Prefetch(query=list(dense), using=dense_name or None, limit=limit,
                                filter=query_filter, params=params)]
    if sparse.indices:  # a query of stop words only has no sparse vector: dense order alone
        prefetch.append(models.Prefetch(query=sparse, using=sparse_name, limit=limit,
                                        filter=query_filter, params=params))
    return dict(prefetch=prefetch, query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)), limit=limit,
                with_vectors=[dense_name] if dense_name else True)
