"""Which student built a collection: its record in the collection metadata, and the checks.

Why: the IEM only means something on vectors made by the same student. The collection
metadata (``client.update_collection(name, metadata=...)``, read back from
``get_collection(name).config.metadata``; durable in local mode and on a server) records the
student's fingerprint. Ingestion through ``VectorStoreIndex.from_documents`` only calls the
embed model; a ``D2LLMVectorStore`` (``store.py``) knows its student, so it checks and records
it at ingestion. Into a plain ``QdrantVectorStore``, either record it explicitly with
:func:`record_student` after ingestion, or let the first rescoring do it: it re-encodes a few
stored nodes and records the student only when their vectors match the stored ones (cosine
> 0.99). A collection whose record or vectors belong to another student is refused, and so is
a student with ``normalize=False`` on a cosine collection, because Qdrant would change its
vectors.

Each check is one flow (``flows.py``), run by the sync and the async API alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llama_index_d2llm.collection import (
    METADATA_KEY,
    CollectionInfo,
    dense_vector,
    describe_flow,
    require_qdrant,
    with_vectors,
)
from llama_index_d2llm.flows import ClientCall, Flow, LocalWork, arun, run
from llama_index_d2llm.student.errors import StudentMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.schema import BaseNode
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    from llama_index_d2llm.student import D2LLMStudent

logger = logging.getLogger(__name__)

#: Stored vectors must match this student's re-encoding at least this closely (cosine).
MATCH_THRESHOLD = 0.99
#: How many stored nodes the automatic check re-encodes.
VERIFY_SAMPLE = 2


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


def _write_record_flow(store: QdrantVectorStore, record: dict[str, Any], *, required: bool
                       ) -> Flow[dict[str, Any] | None]:
    """Write ``record`` into the collection metadata; the record, or None when not required
    and the server cannot (an old server without collection metadata: checked again later)."""
    try:
        yield ClientCall("update_collection", (store.collection_name,),
                         dict(metadata={METADATA_KEY: record}))
    except Exception as exc:
        if required:
            raise
        logger.warning("could not record the D2LLM student on collection %r (%s); it will be "
                       "verified again next time", store.collection_name, exc)
        return None
    return record


def _record_flow(store: QdrantVectorStore, student: D2LLMStudent, overwrite: bool
                 ) -> Flow[CollectionInfo]:
    info = yield from describe_flow(store)
    _check_static(info, student, compare_record=not overwrite)
    record = yield from _write_record_flow(store, student_record(student, "record_student"),
                                           required=True)
    return replace(info, record=record)


def record_student(vector_store: Any, student: Any, *, overwrite: bool = False
                   ) -> CollectionInfo:
    """Record ``student`` (a D2LLMStudent or D2LLMEmbedding) as the builder of the collection.

    ``D2LLMVectorStore`` does it on its first write; call it yourself after ingesting through
    a plain ``QdrantVectorStore``. A collection already recorded for another student is
    refused unless ``overwrite=True``.
    """
    store = require_qdrant(vector_store, "record_student")
    return run(store, _record_flow(store, _student_of(student), overwrite))


async def arecord_student(vector_store: Any, student: Any, *, overwrite: bool = False
                          ) -> CollectionInfo:
    store = require_qdrant(vector_store, "record_student")
    return await arun(store, _record_flow(store, _student_of(student), overwrite))


def _check_flow(store: QdrantVectorStore, student: D2LLMStudent, record: bool
                ) -> Flow[CollectionInfo]:
    info = yield from describe_flow(store)
    if _check_static(info, student):
        return info
    records, _ = yield ClientCall("scroll", (store.collection_name,),
                                  dict(limit=VERIFY_SAMPLE, with_payload=True,
                                       with_vectors=with_vectors(info.vector_name)))
    if not records:
        return replace(info, points=0)
    yield LocalWork(_compare_sample, (store, info, student, records))
    written = None
    if record:
        written = yield from _write_record_flow(
            store, student_record(student, "verified sample"), required=False)
    return replace(info, points=max(info.points or 0, len(records)), record=written)


def check_student(vector_store: Any, student: Any, *, record: bool = True) -> CollectionInfo:
    """Refuse a collection not built by ``student``; record the student once verified.

    A recorded fingerprint is compared directly. Without a record, a few stored nodes are
    re-encoded and must match their stored vectors (cosine > 0.99); then, with
    ``record=True``, the student is recorded so that later checks are a metadata read.
    An empty collection passes (there is nothing to score).
    """
    store = require_qdrant(vector_store, "check_student")
    return run(store, _check_flow(store, _student_of(student), record))


async def acheck_student(vector_store: Any, student: Any, *, record: bool = True
                         ) -> CollectionInfo:
    store = require_qdrant(vector_store, "check_student")
    return await arun(store, _check_flow(store, _student_of(student), record))


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
