"""A Qdrant collection as the rescoring reads it: its layout, stored vectors, searches.

Why the vectors, and not the text: D2LLM's point is that passages are encoded once, at
ingestion. Rescoring reads the stored vectors back from Qdrant (``retrieve`` by id, or
``query_points(..., with_vectors=True)`` in the search call itself) instead of running the
LLM over the passages again.

Why the IEM can trust them: the student L2-normalises its vectors itself (``normalize=True``,
the default), and a cosine collection (what ``QdrantVectorStore`` creates) stores vectors
normalised, so the round trip returns what the student produced, up to float32 rounding.
Which student made them is ``provenance.py``'s job.

Hybrid collections also hold a BM25 sparse vector per point (``sparse.py``); the search call
then fuses the dense and sparse searches in Qdrant (:func:`search_with_vectors` with
``sparse_query``).

Each operation is written once, as a flow (``flows.py``) that the sync and the async API
both run.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llama_index_d2llm.flows import ClientCall, Flow, arun, run
from llama_index_d2llm.student.errors import D2LLMError

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.schema import BaseNode
    from llama_index.core.vector_stores.types import MetadataFilters
    from llama_index.vector_stores.qdrant import QdrantVectorStore

#: Key of the student record in the collection metadata (written by ``provenance.py``).
METADATA_KEY = "d2llm_student"


class UnsupportedVectorStoreError(D2LLMError, TypeError):
    """A feature that reads stored vectors back was given a vector store other than Qdrant."""


class MissingVectorError(D2LLMError, LookupError):
    """A node (or the whole collection) has no vector stored in Qdrant."""


@dataclass(frozen=True)
class CollectionInfo:
    """What the rescoring needs to know about a collection, read once."""

    name: str
    vector_name: str  # "" for a collection with one unnamed vector
    dimension: int
    distance: str
    record: dict[str, Any] | None
    points: int | None
    sparse_name: str | None = None  # the store's BM25 sparse vector, when the collection has it


class StoredHit:
    """One first-stage hit with the vector Qdrant stored for it.

    Its LlamaIndex node is built from the payload on first access only: a retriever rescores
    100 candidates and returns 10, and building a node (JSON and pydantic) cost more than the
    engine's whole search (``benchmarks/index_scale.py``).
    """

    __slots__ = ("_node", "_point", "_store", "similarity", "vector")

    def __init__(self, store: QdrantVectorStore, point: Any, similarity: float,
                 vector: Sequence[float]):
        self._store, self._point, self._node = store, point, None
        self.similarity = similarity
        self.vector = vector

    @property
    def node_id(self) -> str:
        """The point's id as the node's id (a UUID's canonical text, or an integer's)."""
        return str(self._point.id)

    @property
    def node(self) -> BaseNode:
        if self._node is None:
            # The store's own parser, so that nodes come back as from its retriever.
            node = self._store.parse_to_query_result([self._point]).nodes[0]
            node.embedding = None  # returned like VectorIndexRetriever's nodes
            self._node = node
        return self._node


# ---------------------------------------------------------------------------- store access
def require_qdrant(vector_store: Any, feature: str) -> QdrantVectorStore:
    """The store as a ``QdrantVectorStore``, or an error saying why Qdrant is needed."""
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    if isinstance(vector_store, QdrantVectorStore):
        return vector_store
    kind = "None" if vector_store is None else type(vector_store).__name__
    raise UnsupportedVectorStoreError(
        f"{feature} reads the passage vectors stored at ingestion back from Qdrant, and got a "
        f"{kind} vector store, which cannot return them. Index the documents into a "
        "QdrantVectorStore (QdrantClient(path=...) for a local store, QdrantClient(url=...) for "
        "a server) and pass it (or its VectorStoreIndex) here."
    )


#: A UUID's canonical text (what ``str(uuid.UUID(...))`` gives): taken as it is, unparsed.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def point_key(point_id: Any) -> str:
    """Canonical text of a point id, so that ids from nodes and from Qdrant compare equal."""
    if isinstance(point_id, int):
        return str(point_id)
    text = str(point_id)
    if _CANONICAL_UUID.fullmatch(text):
        return text
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def _to_point_id(node_id: str, collection: str) -> int | str:
    """A node id as Qdrant takes it: an unsigned integer or a UUID."""
    if node_id.isdigit():
        return int(node_id)
    if _CANONICAL_UUID.fullmatch(node_id):
        return node_id
    try:
        return str(uuid.UUID(node_id))
    except ValueError:
        raise MissingVectorError(
            f"node id {node_id!r} is not a Qdrant point id (a UUID or an unsigned integer), so "
            f"it has no vector in collection {collection!r}: rerank only nodes retrieved from "
            "that collection, or ingest these nodes into it first"
        ) from None


def dense_vector(vector: Any, vector_name: str) -> list[float] | None:
    """The dense vector of a point, whether the collection names its vectors or not."""
    if vector is None:
        return None
    if isinstance(vector, dict):
        found = vector.get(vector_name)
        if found is None and vector_name:
            found = vector.get("")
        return None if found is None else list(found)
    return list(vector)


def with_vectors(vector_name: str) -> bool | list[str]:
    """``with_vectors=`` asking for the dense vector only: a hybrid collection has sparse ones."""
    return [vector_name] if vector_name else True


def _missing_collection(store: QdrantVectorStore) -> MissingVectorError:
    return MissingVectorError(
        f"Qdrant has no collection {store.collection_name!r}: ingest documents into it first "
        "(VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults("
        "vector_store=store), embed_model=D2LLMEmbedding(...)))"
    )


def _info_from_collection(store: QdrantVectorStore, collection: Any) -> CollectionInfo:
    vectors = collection.config.params.vectors
    if isinstance(vectors, dict):
        if store.dense_vector_name in vectors:
            name = store.dense_vector_name
        elif "" in vectors:
            name = ""
        elif len(vectors) == 1:
            name = next(iter(vectors))
        else:
            raise UnsupportedVectorStoreError(
                f"collection {store.collection_name!r} has dense vectors {sorted(vectors)} but "
                f"none named {store.dense_vector_name!r}: pass dense_vector_name= to "
                "QdrantVectorStore"
            )
        params = vectors[name]
    else:
        name, params = "", vectors
    metadata = getattr(collection.config, "metadata", None) or {}
    record = metadata.get(METADATA_KEY)
    distance = getattr(params.distance, "value", str(params.distance))
    sparse = collection.config.params.sparse_vectors or {}
    return CollectionInfo(name=store.collection_name, vector_name=name,
                          dimension=int(params.size), distance=str(distance),
                          record=record if isinstance(record, dict) else None,
                          points=getattr(collection, "points_count", None),
                          sparse_name=(store.sparse_vector_name
                                       if store.sparse_vector_name in sparse else None))


def describe_flow(store: QdrantVectorStore) -> Flow[CollectionInfo]:
    if not (yield ClientCall("collection_exists", (store.collection_name,))):
        raise _missing_collection(store)
    collection = yield ClientCall("get_collection", (store.collection_name,))
    return _info_from_collection(store, collection)


def describe_collection(vector_store: Any) -> CollectionInfo:
    """Dense vector name, size, distance and student record of the store's collection."""
    store = require_qdrant(vector_store, "describe_collection")
    return run(store, describe_flow(store))


async def adescribe_collection(vector_store: Any) -> CollectionInfo:
    store = require_qdrant(vector_store, "describe_collection")
    return await arun(store, describe_flow(store))


# ---------------------------------------------------------------------------- vectors
def _vectors_by_key(records: Sequence[Any], vector_name: str) -> dict[str, list[float]]:
    found = {}
    for record in records:
        vector = dense_vector(record.vector, vector_name)
        if vector is not None:
            found[point_key(record.id)] = vector
    return found


def _missing_vectors(store: QdrantVectorStore, node_ids: Sequence[str],
                     found: dict[str, list[float]]) -> list[list[float]]:
    missing = [i for i in node_ids if point_key(i) not in found]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingVectorError(
            f"no vector stored in collection {store.collection_name!r} for node(s) {shown}{more}: "
            "they were not ingested into this collection (or were deleted). Rerank only nodes "
            "retrieved from it, or ingest them with the same D2LLMEmbedding first"
        )
    return [found[point_key(i)] for i in node_ids]


def _fetch_flow(store: QdrantVectorStore, node_ids: Sequence[str],
                info: CollectionInfo | None) -> Flow[list[list[float]]]:
    if not node_ids:
        return []
    info = info or (yield from describe_flow(store))
    ids = list({point_key(i): _to_point_id(i, store.collection_name) for i in node_ids}.values())
    records = yield ClientCall("retrieve", (store.collection_name, ids), dict(
        with_payload=False, with_vectors=with_vectors(info.vector_name)))
    return _missing_vectors(store, node_ids, _vectors_by_key(records, info.vector_name))


def fetch_vectors(vector_store: Any, node_ids: Sequence[str],
                  info: CollectionInfo | None = None) -> list[list[float]]:
    """Stored vectors of ``node_ids``, in that order, in one round trip, matched by id."""
    store = require_qdrant(vector_store, "fetch_vectors")
    return run(store, _fetch_flow(store, node_ids, info))


async def afetch_vectors(vector_store: Any, node_ids: Sequence[str],
                         info: CollectionInfo | None = None) -> list[list[float]]:
    store = require_qdrant(vector_store, "fetch_vectors")
    return await arun(store, _fetch_flow(store, node_ids, info))


def _search_request(store: QdrantVectorStore, query_vector: Sequence[float], top_k: int,
                    info: CollectionInfo, filters: MetadataFilters | None,
                    doc_ids: list[str] | None, node_ids: list[str] | None,
                    sparse_query: Any = None) -> dict[str, Any]:
    from llama_index.core.vector_stores.types import VectorStoreQuery

    from llama_index_d2llm.sparse import hybrid_query

    query = VectorStoreQuery(query_embedding=list(query_vector), similarity_top_k=top_k,
                             filters=filters, doc_ids=doc_ids, node_ids=node_ids)
    # The store's own filter builder, so that MetadataFilters behave as with its retriever.
    query_filter = store._build_query_filter(query)
    if sparse_query is None:
        return dict(collection_name=store.collection_name, query=list(query_vector),
                    using=info.vector_name or None, limit=top_k, query_filter=query_filter,
                    with_payload=True, with_vectors=with_vectors(info.vector_name))
    if info.sparse_name is None:
        raise UnsupportedVectorStoreError(
            f"collection {info.name!r} has no sparse vector named {store.sparse_vector_name!r}, "
            "so it cannot be searched hybrid: search it dense only (hybrid=False), or rebuild "
            "it with D2LLMVectorStore(..., hybrid=True) to store BM25 vectors too"
        )
    return dict(collection_name=store.collection_name, with_payload=True,
                **hybrid_query(query_vector, sparse_query, dense_name=info.vector_name,
                               sparse_name=info.sparse_name, limit=top_k,
                               query_filter=query_filter))


def _point_vector(point: Any, name: str) -> Sequence[float] | None:
    """The point's dense vector as the engine returned it (no copy)."""
    vector = point.vector
    if isinstance(vector, dict):
        found = vector.get(name)
        return vector.get("") if found is None and name else found
    return vector


def _hits(store: QdrantVectorStore, points: Sequence[Any], info: CollectionInfo
          ) -> list[StoredHit]:
    hits = []
    for point in points:
        vector = _point_vector(point, info.vector_name)
        if vector is None:
            raise MissingVectorError(
                f"Qdrant returned point {point.id!r} of collection {store.collection_name!r} "
                f"without a dense vector named {info.vector_name!r}"
            )
        hits.append(StoredHit(store, point, float(point.score or 0.0), vector))
    return hits


def _search_flow(store: QdrantVectorStore, query_vector: Sequence[float], top_k: int,
                 info: CollectionInfo | None, filters: MetadataFilters | None,
                 doc_ids: list[str] | None, node_ids: list[str] | None,
                 sparse_query: Any) -> Flow[list[StoredHit]]:
    info = info or (yield from describe_flow(store))
    request = _search_request(store, query_vector, top_k, info, filters, doc_ids, node_ids,
                              sparse_query)
    response = yield ClientCall("query_points", kwargs=request)
    return _hits(store, response.points, info)


def search_with_vectors(vector_store: Any, query_vector: Sequence[float], top_k: int,
                        info: CollectionInfo | None = None, *,
                        filters: MetadataFilters | None = None, doc_ids: list[str] | None = None,
                        node_ids: list[str] | None = None, sparse_query: Any = None
                        ) -> list[StoredHit]:
    """Nearest ``top_k`` nodes, each with its stored vector, in one Qdrant call.

    By cosine; or, given the query's BM25 ``sparse_query`` (a ``models.SparseVector``), the
    dense and the sparse top ``top_k`` fused by reciprocal rank (``sparse.hybrid_query``),
    in fused order with the RRF score as similarity.
    """
    store = require_qdrant(vector_store, "search_with_vectors")
    return run(store, _search_flow(store, query_vector, top_k, info, filters, doc_ids,
                                   node_ids, sparse_query))


async def asearch_with_vectors(vector_store: Any, query_vector: Sequence[float], top_k: int,
                               info: CollectionInfo | None = None, *,
                               filters: MetadataFilters | None = None,
                               doc_ids: list[str] | None = None,
                               node_ids: list[str] | None = None,
                               sparse_query: Any = None) -> list[StoredHit]:
    store = require_qdrant(vector_store, "search_with_vectors")
    return await arun(store, _search_flow(store, query_vector, top_k, info, filters, doc_ids,
                                          node_ids, sparse_query))


# ---------------------------------------------------------------------------- first stage
def first_stage_of(vector_store: Any, info: CollectionInfo, hybrid: bool | None = None
                   ) -> Literal["dense", "hybrid"]:
    """Which first stage searching this store means: "hybrid" when the collection holds the
    store's sparse vector and the store can encode a query for it (``hybrid=None``), or as
    asked, with an error saying what is missing for ``hybrid=True``."""
    store = require_qdrant(vector_store, "first_stage_of")
    if hybrid is False:
        return "dense"
    missing = None
    if info.sparse_name is None:
        missing = (f"collection {info.name!r} has no sparse vector named "
                   f"{store.sparse_vector_name!r}")
    elif _sparse_query_fn(store) is None:
        missing = ("the QdrantVectorStore has no sparse query function (enable_hybrid=True and "
                   "sparse_query_fn=BM25Encoder().encode_queries, or use D2LLMVectorStore)")
    if missing is None:
        return "hybrid"
    if hybrid:
        raise UnsupportedVectorStoreError(
            f"hybrid search was asked for, but {missing}: build the collection with "
            "D2LLMVectorStore(collection_name, embed_model, client=...) (BM25 sparse vectors "
            "beside the dense ones), or search dense only (hybrid=False)")
    return "dense"


def _sparse_query_fn(store: QdrantVectorStore) -> Any:
    return getattr(store, "_sparse_query_fn", None) if store.enable_hybrid else None


def sparse_query(vector_store: Any, text: str) -> Any:
    """The query's sparse vector (``models.SparseVector``) by the store's sparse query function."""
    from qdrant_client import models

    store = require_qdrant(vector_store, "sparse_query")
    encode = _sparse_query_fn(store)
    if encode is None:
        raise UnsupportedVectorStoreError(
            f"the store of collection {store.collection_name!r} is not hybrid: it has no sparse "
            "query function")
    indices, values = encode([text])
    return models.SparseVector(indices=list(indices[0]), values=list(values[0]))


# ---------------------------------------------------------------------------- BM25 scores
def _lexical_flow(store: QdrantVectorStore, sparse_query: Any, node_ids: Sequence[str],
                  info: CollectionInfo | None) -> Flow[list[float]]:
    from qdrant_client import models

    if not node_ids:
        return []
    info = info or (yield from describe_flow(store))
    if info.sparse_name is None:
        raise UnsupportedVectorStoreError(
            f"collection {info.name!r} has no sparse vector named {store.sparse_vector_name!r}, "
            "so its nodes have no BM25 score: rescore them as a dense first stage "
            "(first_stage='dense'), or rebuild the collection with D2LLMVectorStore")
    ids = list({point_key(i): _to_point_id(i, store.collection_name) for i in node_ids}.values())
    response = yield ClientCall("query_points", kwargs=dict(
        collection_name=store.collection_name, query=sparse_query, using=info.sparse_name,
        limit=len(ids), with_payload=False, with_vectors=False,
        query_filter=models.Filter(must=[models.HasIdCondition(has_id=ids)])))
    found = {point_key(point.id): float(point.score) for point in response.points}
    return [found.get(point_key(i), 0.0) for i in node_ids]


def lexical_scores(vector_store: Any, sparse_query: Any, node_ids: Sequence[str],
                   info: CollectionInfo | None = None) -> list[float]:
    """BM25 scores of ``node_ids`` (in that order; 0 where no query term matches), computed
    by Qdrant from the stored sparse vectors and its own document frequencies.

    The fusion that rescores hybrid candidates weighs these scores (``student/fusion.py``);
    Qdrant's hybrid query returns only the fused RRF score, so this is a second, filtered
    sparse query over the candidates alone.
    """
    store = require_qdrant(vector_store, "lexical_scores")
    return run(store, _lexical_flow(store, sparse_query, node_ids, info))


async def alexical_scores(vector_store: Any, sparse_query: Any, node_ids: Sequence[str],
                          info: CollectionInfo | None = None) -> list[float]:
    store = require_qdrant(vector_store, "lexical_scores")
    return await arun(store, _lexical_flow(store, sparse_query, node_ids, info))


def _candidates_flow(store: QdrantVectorStore, node_ids: Sequence[str],
                     info: CollectionInfo | None, sparse_query: Any
                     ) -> Flow[tuple[list[list[float]], list[float] | None]]:
    info = info or (yield from describe_flow(store))
    vectors = yield from _fetch_flow(store, node_ids, info)
    if sparse_query is None:
        return vectors, None
    return vectors, (yield from _lexical_flow(store, sparse_query, node_ids, info))


def fetch_candidates(vector_store: Any, node_ids: Sequence[str],
                     info: CollectionInfo | None = None, sparse_query: Any = None
                     ) -> tuple[list[list[float]], list[float] | None]:
    """What rescoring needs of given nodes: their stored vectors and, given the query's
    ``sparse_query``, their BM25 scores (``lexical_scores``); ``None`` without one."""
    store = require_qdrant(vector_store, "fetch_candidates")
    return run(store, _candidates_flow(store, node_ids, info, sparse_query))


async def afetch_candidates(vector_store: Any, node_ids: Sequence[str],
                            info: CollectionInfo | None = None, sparse_query: Any = None
                            ) -> tuple[list[list[float]], list[float] | None]:
    store = require_qdrant(vector_store, "fetch_candidates")
    return await arun(store, _candidates_flow(store, node_ids, info, sparse_query))
