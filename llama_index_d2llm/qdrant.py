"""Qdrant helpers: read stored passage vectors back, and tie a collection to its student.

Why the vectors, and not the text: D2LLM's point is that passages are encoded once, at
ingestion. Rescoring reads the stored vectors back from Qdrant (``retrieve`` by id, or
``query_points(..., with_vectors=True)`` in the search call itself) instead of running the
LLM over the passages again.

Why the IEM can trust them: the student L2-normalises its vectors itself (``normalize=True``,
the default), and a cosine collection (what ``QdrantVectorStore`` creates) stores vectors
normalised, so the round trip returns what the student produced, up to float32 rounding. A
student with ``normalize=False`` is refused on a cosine collection, because Qdrant would change
its vectors.

Why a fingerprint: the IEM only means something on vectors made by the same student. The
collection metadata (``client.update_collection(name, metadata=...)``, read back from
``get_collection(name).config.metadata``; durable in local mode and on a server) records the
student's fingerprint. Ingestion through ``VectorStoreIndex.from_documents`` only calls the
embed model; a ``D2LLMVectorStore`` (``store.py``) knows its student, so it checks and records
it at ingestion. Into a plain ``QdrantVectorStore``, either record it explicitly with
:func:`record_student` after ingestion, or let the first rescoring do it: it re-encodes a few
stored nodes and records the student only when their vectors match the stored ones (cosine
> 0.99). A collection whose record or vectors belong to another student is refused.

Hybrid collections also hold a BM25 sparse vector per point (``sparse.py``); the search call
then fuses the dense and sparse searches in Qdrant (:func:`search_with_vectors` with
``sparse_query``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from llama_index_d2llm.student.errors import D2LLMError, StudentMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.schema import BaseNode
    from llama_index.core.vector_stores.types import MetadataFilters
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    from llama_index_d2llm.student import D2LLMStudent

logger = logging.getLogger(__name__)

#: Key of the student record in the collection metadata.
METADATA_KEY = "d2llm_student"
#: Stored vectors must match this student's re-encoding at least this closely (cosine).
MATCH_THRESHOLD = 0.99
#: How many stored nodes the automatic check re-encodes.
VERIFY_SAMPLE = 2


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


@dataclass(frozen=True)
class StoredHit:
    """One first-stage hit with the vector Qdrant stored for it."""

    node: BaseNode
    similarity: float
    vector: list[float]


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


def _sync_client(store: QdrantVectorStore) -> Any:
    client = store.client
    if client is None:
        raise UnsupportedVectorStoreError(
            f"the QdrantVectorStore of collection {store.collection_name!r} has only an async "
            "client: use the async API (aretrieve, aquery, apostprocess_nodes) or also pass "
            "client=QdrantClient(...) to QdrantVectorStore"
        )
    return client


def _async_client(store: QdrantVectorStore) -> Any | None:
    return getattr(store, "_aclient", None)


def point_key(point_id: Any) -> str:
    """Canonical text of a point id, so that ids from nodes and from Qdrant compare equal."""
    if isinstance(point_id, int):
        return str(point_id)
    text = str(point_id)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def _to_point_id(node_id: str, collection: str) -> int | str:
    """A node id as Qdrant takes it: an unsigned integer or a UUID."""
    if node_id.isdigit():
        return int(node_id)
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


def _with_vectors(vector_name: str) -> bool | list[str]:
    # Ask only for the dense vector: a hybrid collection also holds sparse ones.
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


def describe_collection(vector_store: Any) -> CollectionInfo:
    """Dense vector name, size, distance and student record of the store's collection."""
    store = require_qdrant(vector_store, "describe_collection")
    client = _sync_client(store)
    if not client.collection_exists(store.collection_name):
        raise _missing_collection(store)
    return _info_from_collection(store, client.get_collection(store.collection_name))


async def adescribe_collection(vector_store: Any) -> CollectionInfo:
    store = require_qdrant(vector_store, "describe_collection")
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(describe_collection, store)
    if not await aclient.collection_exists(store.collection_name):
        raise _missing_collection(store)
    return _info_from_collection(store, await aclient.get_collection(store.collection_name))


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


def fetch_vectors(vector_store: Any, node_ids: Sequence[str],
                  info: CollectionInfo | None = None) -> list[list[float]]:
    """Stored vectors of ``node_ids``, in that order, in one round trip, matched by id."""
    store = require_qdrant(vector_store, "fetch_vectors")
    if not node_ids:
        return []
    info = info or describe_collection(store)
    ids = list({point_key(i): _to_point_id(i, store.collection_name) for i in node_ids}.values())
    records = _sync_client(store).retrieve(store.collection_name, ids, with_payload=False,
                                           with_vectors=_with_vectors(info.vector_name))
    return _missing_vectors(store, node_ids, _vectors_by_key(records, info.vector_name))


async def afetch_vectors(vector_store: Any, node_ids: Sequence[str],
                         info: CollectionInfo | None = None) -> list[list[float]]:
    store = require_qdrant(vector_store, "fetch_vectors")
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(fetch_vectors, store, node_ids, info)
    if not node_ids:
        return []
    info = info or await adescribe_collection(store)
    ids = list({point_key(i): _to_point_id(i, store.collection_name) for i in node_ids}.values())
    records = await aclient.retrieve(store.collection_name, ids, with_payload=False,
                                     with_vectors=_with_vectors(info.vector_name))
    return _missing_vectors(store, node_ids, _vectors_by_key(records, info.vector_name))


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
                    with_payload=True, with_vectors=_with_vectors(info.vector_name))
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


def _hits(store: QdrantVectorStore, points: Sequence[Any], info: CollectionInfo
          ) -> list[StoredHit]:
    result = store.parse_to_query_result(list(points))
    vectors = _vectors_by_key(points, info.vector_name)
    similarities = result.similarities or [None] * len(result.ids or [])
    hits = []
    for node, node_id, similarity in zip(result.nodes or [], result.ids or [], similarities,
                                         strict=True):
        vector = vectors.get(point_key(node_id))
        if vector is None:
            raise MissingVectorError(
                f"Qdrant returned point {node_id!r} of collection {store.collection_name!r} "
                f"without a dense vector named {info.vector_name!r}"
            )
        node.embedding = None  # returned like VectorIndexRetriever's nodes; the hit keeps it
        hits.append(StoredHit(node=node, similarity=float(similarity or 0.0), vector=vector))
    return hits


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
    info = info or describe_collection(store)
    request = _search_request(store, query_vector, top_k, info, filters, doc_ids, node_ids,
                              sparse_query)
    response = _sync_client(store).query_points(**request)
    return _hits(store, response.points, info)


async def asearch_with_vectors(vector_store: Any, query_vector: Sequence[float], top_k: int,
                               info: CollectionInfo | None = None, *,
                               filters: MetadataFilters | None = None,
                               doc_ids: list[str] | None = None,
                               node_ids: list[str] | None = None,
                               sparse_query: Any = None) -> list[StoredHit]:
    store = require_qdrant(vector_store, "search_with_vectors")
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(search_with_vectors, store, query_vector, top_k, info,
                                       filters=filters, doc_ids=doc_ids, node_ids=node_ids,
                                       sparse_query=sparse_query)
    info = info or await adescribe_collection(store)
    request = _search_request(store, query_vector, top_k, info, filters, doc_ids, node_ids,
                              sparse_query)
    response = await aclient.query_points(**request)
    return _hits(store, response.points, info)


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


def _lexical_request(store: QdrantVectorStore, sparse_query: Any, node_ids: Sequence[str],
                     info: CollectionInfo) -> dict[str, Any]:
    from qdrant_client import models

    if info.sparse_name is None:
        raise UnsupportedVectorStoreError(
            f"collection {info.name!r} has no sparse vector named {store.sparse_vector_name!r}, "
            "so its nodes have no BM25 score: rescore them as a dense first stage "
            "(first_stage='dense'), or rebuild the collection with D2LLMVectorStore")
    ids = list({point_key(i): _to_point_id(i, store.collection_name) for i in node_ids}.values())
    return dict(collection_name=store.collection_name, query=sparse_query,
                using=info.sparse_name, limit=len(ids), with_payload=False, with_vectors=False,
                query_filter=models.Filter(must=[models.HasIdCondition(has_id=ids)]))


def _scores_by_node(node_ids: Sequence[str], points: Sequence[Any]) -> list[float]:
    found = {point_key(point.id): float(point.score) for point in points}
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
    if not node_ids:
        return []
    info = info or describe_collection(store)
    request = _lexical_request(store, sparse_query, node_ids, info)
    return _scores_by_node(node_ids, _sync_client(store).query_points(**request).points)


async def alexical_scores(vector_store: Any, sparse_query: Any, node_ids: Sequence[str],
                          info: CollectionInfo | None = None) -> list[float]:
    store = require_qdrant(vector_store, "lexical_scores")
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(lexical_scores, store, sparse_query, node_ids, info)
    if not node_ids:
        return []
    info = info or await adescribe_collection(store)
    request = _lexical_request(store, sparse_query, node_ids, info)
    return _scores_by_node(node_ids, (await aclient.query_points(**request)).points)


# ---------------------------------------------------------------------------- student record
def _student_of(student_or_embedding: Any) -> D2LLMStudent:
    return getattr(student_or_embedding, "student", student_or_embedding)


def student_record(student: D2LLMStudent, how: str) -> dict[str, Any]:
    """What is written into the collection metadata: enough to name the student in errors."""
    return {"fingerprint": student.fingerprint, "name": student.name,
            "dimension": student.dimension, "recorded_by": how}


def _check_static(info: CollectionInfo, student: D2LLMStudent, compare_record: bool = True
                  ) -> bool:
    """Refuse on dimension, distance or recorded fingerprint; True when the record matches."""
    if info.dimension != student.dimension:
        raise StudentMismatchError(
            f"collection {info.name!r} stores {info.dimension}-d vectors, but {student.name} "
            f"makes {student.dimension}-d vectors: it was built with another model. Re-ingest "
            "the documents with this student's D2LLMEmbedding, or use the student that built it"
        )
    if info.distance.lower() == "cosine" and not student.config.normalize:
        raise StudentMismatchError(
            f"collection {info.name!r} uses cosine distance, so Qdrant normalises the vectors "
            f"it stores, but {student.name} does not normalise its vectors (normalize=False): "
            "the IEM would score other vectors than the student makes. Create the collection "
            "with distance DOT (QdrantVectorStore(..., dense_config=VectorParams(size=..., "
            "distance=Distance.DOT))) or use a normalising student"
        )
    if info.record is None or not compare_record:
        return False
    recorded = info.record.get("fingerprint")
    if recorded != student.fingerprint:
        raise StudentMismatchError(
            f"collection {info.name!r} was built by {info.record.get('name', recorded)!r} "
            f"(fingerprint {recorded}), but this is {student.name!r} (fingerprint "
            f"{student.fingerprint}): its IEM would score vectors it never saw, and its vectors "
            "would mix with the other student's. Use the student that built the collection, or "
            "ingest the documents with this one into another collection (or delete this one "
            "first); only if you know both make the same vectors, record_student(store, "
            "student, overwrite=True)"
        )
    return True


def _sample_text(store: QdrantVectorStore, payload: dict[str, Any] | None) -> str | None:
    """The text the embed model saw at ingestion: the node's EMBED-mode content."""
    from llama_index.core.schema import MetadataMode
    from llama_index.core.vector_stores.utils import metadata_dict_to_node

    if not payload:
        return None
    try:
        return metadata_dict_to_node(payload).get_content(metadata_mode=MetadataMode.EMBED)
    except Exception:  # legacy payloads without _node_content: the store's text field
        text = payload.get(store.text_key or "text")
        return text if isinstance(text, str) else None


def _compare_sample(store: QdrantVectorStore, info: CollectionInfo, student: D2LLMStudent,
                    records: Sequence[Any]) -> None:
    """Re-encode the sampled nodes and refuse unless their stored vectors match."""
    import torch

    pairs = [(_sample_text(store, r.payload), dense_vector(r.vector, info.vector_name))
             for r in records]
    pairs = [(t, v) for t, v in pairs if t and t.strip() and v is not None]
    if not pairs:
        raise StudentMismatchError(
            f"cannot tell which student built collection {info.name!r}: it has no student "
            "record and its points carry no node text to re-encode. If you know it was built "
            f"by {student.name}, record it: llama_index_d2llm.qdrant.record_student(store, "
            "student)"
        )
    encoded = student.encode([t for t, _ in pairs], kind="passage")
    stored = torch.tensor([v for _, v in pairs], dtype=torch.float32)
    cosine = torch.nn.functional.cosine_similarity(encoded, stored, dim=1)
    worst = float(cosine.min())
    if worst < MATCH_THRESHOLD:
        raise StudentMismatchError(
            f"the vectors in collection {info.name!r} were not made by {student.name}: "
            f"re-encoding stored nodes with it gives cosine {worst:.3f} < {MATCH_THRESHOLD} "
            "with their stored vectors. Use the student that built the collection, or re-ingest "
            "the documents with this student's D2LLMEmbedding"
        )


def record_student(vector_store: Any, student: Any, *, overwrite: bool = False
                   ) -> CollectionInfo:
    """Record ``student`` (a D2LLMStudent or D2LLMEmbedding) as the builder of the collection.

    ``D2LLMVectorStore`` does it on its first write; call it yourself after ingesting through
    a plain ``QdrantVectorStore``. A collection already recorded for another student is
    refused unless ``overwrite=True``.
    """
    student = _student_of(student)
    store = require_qdrant(vector_store, "record_student")
    info = describe_collection(store)
    _check_static(info, student, compare_record=not overwrite)
    record = student_record(student, "record_student")
    _sync_client(store).update_collection(store.collection_name, metadata={METADATA_KEY: record})
    return replace(info, record=record)


async def arecord_student(vector_store: Any, student: Any, *, overwrite: bool = False
                          ) -> CollectionInfo:
    student = _student_of(student)
    store = require_qdrant(vector_store, "record_student")
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(record_student, store, student, overwrite=overwrite)
    info = await adescribe_collection(store)
    _check_static(info, student, compare_record=not overwrite)
    record = student_record(student, "record_student")
    await aclient.update_collection(store.collection_name, metadata={METADATA_KEY: record})
    return replace(info, record=record)


def check_node_vectors(student: Any, nodes: Sequence[BaseNode], collection: str) -> None:
    """Refuse nodes about to be written whose vectors another model made.

    One node is re-encoded with ``student`` (the store's) and must match its vector: the
    index's embed model, not the store, embeds the nodes, and nothing else would notice.
    """
    import torch
    from llama_index.core.schema import MetadataMode

    student = _student_of(student)
    node = next((n for n in nodes if n.embedding is not None), None)
    if node is None:
        return
    fix = (f"embed them with the store's student ({student.name}, fingerprint "
           f"{student.fingerprint}): VectorStoreIndex(..., embed_model=D2LLMEmbedding(...)) with "
           "that student, or give the store the student you embed with")
    if len(node.embedding) != student.dimension:
        raise StudentMismatchError(
            f"the nodes written to collection {collection!r} carry {len(node.embedding)}-d "
            f"vectors, but the store's student makes {student.dimension}-d vectors: {fix}")
    encoded = student.encode([node.get_content(metadata_mode=MetadataMode.EMBED)],
                             kind="passage")[0]
    cosine = float(torch.nn.functional.cosine_similarity(
        encoded, torch.tensor(node.embedding, dtype=torch.float32), dim=0))
    if cosine < MATCH_THRESHOLD:
        raise StudentMismatchError(
            f"the nodes written to collection {collection!r} were not embedded by the store's "
            f"student (re-encoding one gives cosine {cosine:.3f} < {MATCH_THRESHOLD} with its "
            f"vector): {fix}")


def _write_record(store: QdrantVectorStore, record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        _sync_client(store).update_collection(store.collection_name,
                                              metadata={METADATA_KEY: record})
    except Exception as exc:  # an old server without collection metadata: keep going
        logger.warning("could not record the D2LLM student on collection %r (%s); it will be "
                       "verified again next time", store.collection_name, exc)
        return None
    return record


def check_student(vector_store: Any, student: Any, *, record: bool = True) -> CollectionInfo:
    """Refuse a collection not built by ``student``; record the student once verified.

    A recorded fingerprint is compared directly. Without a record, a few stored nodes are
    re-encoded and must match their stored vectors (cosine > 0.99); then, with
    ``record=True``, the student is recorded so that later checks are a metadata read.
    An empty collection passes (there is nothing to score).
    """
    student = _student_of(student)
    store = require_qdrant(vector_store, "check_student")
    info = describe_collection(store)
    if _check_static(info, student):
        return info
    records, _ = _sync_client(store).scroll(store.collection_name, limit=VERIFY_SAMPLE,
                                            with_payload=True,
                                            with_vectors=_with_vectors(info.vector_name))
    if not records:
        return replace(info, points=0)
    _compare_sample(store, info, student, records)
    written = None
    if record:
        written = _write_record(store, student_record(student, "verified sample"))
    return replace(info, points=max(info.points or 0, len(records)), record=written)


async def acheck_student(vector_store: Any, student: Any, *, record: bool = True
                         ) -> CollectionInfo:
    student = _student_of(student)
    store = require_qdrant(vector_store, "check_student")
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(check_student, store, student, record=record)
    info = await adescribe_collection(store)
    if _check_static(info, student):
        return info
    records, _ = await aclient.scroll(store.collection_name, limit=VERIFY_SAMPLE,
                                      with_payload=True,
                                      with_vectors=_with_vectors(info.vector_name))
    if not records:
        return replace(info, points=0)
    await asyncio.to_thread(_compare_sample, store, info, student, records)
    written = None
    if record:
        written = student_record(student, "verified sample")
        try:
            await aclient.update_collection(store.collection_name,
                                            metadata={METADATA_KEY: written})
        except Exception as exc:
            logger.warning("could not record the D2LLM student on collection %r (%s)",
                           store.collection_name, exc)
            written = None
    return replace(info, points=max(info.points or 0, len(records)), record=written)


class StudentGuard:
    """Runs :func:`check_student` once per (collection, student) and remembers the answer.

    Rescoring classes and ``D2LLMVectorStore`` hold one, so that only their first query (or
    write) pays for the check. An empty
    collection is checked again next time (documents may arrive later). A collection
    re-ingested by another student while a retriever lives is not noticed; build a new
    retriever (or call ``reset()``) after re-ingesting.
    """

    def __init__(self, vector_store: Any, feature: str):
        self.store = require_qdrant(vector_store, feature)
        self._verified: dict[tuple[str, str], CollectionInfo] = {}

    def _key(self, student: D2LLMStudent) -> tuple[str, str]:
        return (self.store.collection_name, student.fingerprint)

    def reset(self) -> None:
        self._verified.clear()

    def ensure(self, student: D2LLMStudent) -> CollectionInfo:
        key = self._key(student)
        if key in self._verified:
            return self._verified[key]
        return self._remember(key, check_student(self.store, student))

    async def aensure(self, student: D2LLMStudent) -> CollectionInfo:
        key = self._key(student)
        if key in self._verified:
            return self._verified[key]
        return self._remember(key, await acheck_student(self.store, student))

    def _remember(self, key: tuple[str, str], info: CollectionInfo) -> CollectionInfo:
        if info.points != 0:  # nothing was checked in an empty collection
            self._verified[key] = info
        return info

    def remember(self, student: D2LLMStudent, info: CollectionInfo) -> CollectionInfo:
        """Trust ``info`` for ``student`` from now on (the caller has just recorded it)."""
        self._verified[self._key(student)] = info
        return info

    def is_recorded(self, student: D2LLMStudent) -> bool:
        """Whether ``student`` is known to be the collection's recorded builder."""
        info = self._verified.get(self._key(student))
        return info is not None and info.record is not None
