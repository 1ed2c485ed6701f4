"""``D2LLMVectorStore``: a QdrantVectorStore for one D2LLM student, hybrid by default.

Why a subclass and not only a ``QdrantVectorStore(enable_hybrid=True, ...)``: it sets the three
things a user would otherwise get wrong (our offline BM25 functions, the sparse vector's IDF
modifier, which QdrantVectorStore only sets for fastembed models), and it knows its student.
``VectorStoreIndex`` ingestion only calls the embed model; the store is the one place that sees
every write, so it checks there that the nodes' vectors come from its student and that the
collection was not built by another one, and records the student on the first write.

Where it lives: given ``path=`` (a folder), the embedded store on Qdrant Edge (``edge.py``):
Qdrant's own engine in this process, one process per folder. Given ``client=`` (a
``QdrantClient(url=...)``: a server or a cluster), that client. The same calls either way.
Close a store you opened by path (``close()`` or ``with``): it flushes and frees the folder.

Re-running an ingestion overwrites its points instead of adding copies (``upsert.py``).

A collection it creates compares vectors by dot product, not cosine: the student's vectors are
L2-normalised already, so the ranking and the scores are the cosine's, while Qdrant's embedded
mode re-normalises every stored vector of a cosine collection on each query (half of a
search's time at 100,000 points; ``benchmarks/probes/distance_ab.py``). A student that does not
normalise needs dot product anyway: a cosine collection would change its vectors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.vector_stores.qdrant import QdrantVectorStore

from llama_index_d2llm.collection import CollectionInfo, describe_collection
from llama_index_d2llm.provenance import (
    StudentGuard,
    arecord_student,
    check_node_vectors,
    record_student,
)
from llama_index_d2llm.sparse import SPARSE_VECTOR_NAME, BM25Encoder, sparse_vector_params
from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.upsert import SOURCE_KEY, assign_stable_ids, source_of, stale_filter


def dense_vector_params(dimension: int) -> Any:
    """A new collection's dense vectors: the student's size, compared by dot product."""
    from qdrant_client import models

    return models.VectorParams(size=dimension, distance=models.Distance.DOT)


class D2LLMVectorStore(QdrantVectorStore):
    """Qdrant collection of one student's passage vectors, plus BM25 sparse vectors.

    Args:
        collection_name: the Qdrant collection.
        embed_model: the ``D2LLMEmbedding`` (or ``D2LLMStudent``) that embeds the nodes.
        path: a folder for the embedded store (Qdrant Edge; created when missing).
        client / aclient: ``QdrantClient`` / ``AsyncQdrantClient`` of a server or cluster
            (or qdrant-client's local mode), instead of ``path``.
        hybrid: store BM25 sparse vectors beside the dense ones. ``None`` (default): yes for
            a new collection, and as it is for an existing one (a dense-only collection stays
            dense-only). ``True`` refuses an existing dense-only collection.
        bm25: the sparse encoder (default: ``BM25Encoder()``).
        **kwargs: passed to ``QdrantVectorStore``. ``dense_config`` (default: the
            student's dimension, dot product) applies to a collection this store creates.
    """

    _d2llm_student: Any = PrivateAttr()
    _bm25: BM25Encoder | None = PrivateAttr(default=None)
    _hybrid_asked: bool | None = PrivateAttr(default=None)
    _guard: StudentGuard = PrivateAttr()
    _edge: Any = PrivateAttr(default=None)

    def __init__(self, collection_name: str, embed_model: Any, *, client: Any = None,
                 aclient: Any = None, path: str | os.PathLike[str] | None = None,
                 hybrid: bool | None = None, bm25: BM25Encoder | None = None,
                 **kwargs: Any) -> None:
        student = getattr(embed_model, "student", embed_model)
        if not hasattr(student, "fingerprint"):
            raise TypeError("D2LLMVectorStore needs embed_model=D2LLMEmbedding(...) (or its "
                            f"D2LLMStudent), got {type(embed_model).__name__}")
        from llama_index_d2llm.edge import AsyncEdgeClient, EdgeClient

        edge = None
        if path is not None:
            if client is not None or aclient is not None:
                raise ValueError("D2LLMVectorStore takes path= (the embedded store) or client= "
                                 "(a Qdrant server), not both")
            edge = client = EdgeClient.open(path)
        if isinstance(client, EdgeClient) and aclient is None:
            aclient = AsyncEdgeClient(client)
        if client is None and aclient is None:
            raise ValueError("D2LLMVectorStore needs path='folder' (the embedded store) or "
                             "client=QdrantClient(url=...) (a server)")
        encoder = (bm25 or BM25Encoder()) if hybrid is not False else None
        if encoder is not None:
            kwargs.update(enable_hybrid=True, sparse_doc_fn=encoder.encode_documents,
                          sparse_query_fn=encoder.encode_queries,
                          sparse_config=kwargs.get("sparse_config") or sparse_vector_params(),
                          sparse_vector_name=kwargs.get("sparse_vector_name")
                          or SPARSE_VECTOR_NAME)
        if kwargs.get("dense_config") is None:
            kwargs["dense_config"] = dense_vector_params(student.dimension)
        try:
            super().__init__(collection_name=collection_name, client=client, aclient=aclient,
                             **kwargs)
        except BaseException:
            if edge is not None:
                edge.close()
            raise
        self._edge = edge
        self._d2llm_student = student
        self._bm25 = encoder
        self._hybrid_asked = hybrid
        self._guard = StudentGuard(self, "D2LLMVectorStore")
        if client is not None and self._collection_initialized:
            self._match_collection(describe_collection(self))

    @classmethod
    def class_name(cls) -> str:
        return "D2LLMVectorStore"

    # ------------------------------------------------------------------ lifetime
    @property
    def is_embedded(self) -> bool:
        """Whether this store opened the embedded store (Qdrant Edge) itself (``path=``)."""
        return self._edge is not None

    def close(self) -> None:
        """Flush and free the embedded folder (``path=``); a given client is left open."""
        edge, self._edge = self._edge, None
        if edge is not None:
            edge.close()

    def __enter__(self) -> D2LLMVectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def optimize(self) -> bool:
        """Build the embedded collection's HNSW index now (else searches after a large
        ingestion scan it in full); a no-op on a server, which indexes by itself."""
        from llama_index_d2llm.edge import EdgeClient

        client = self.client
        if not isinstance(client, EdgeClient) or not client.collection_exists(
                self.collection_name):
            return False
        return client.optimize(self.collection_name)

    @property
    def bm25(self) -> BM25Encoder | None:
        """The sparse encoder when this store is hybrid."""
        return self._bm25 if self.enable_hybrid else None

    def _match_collection(self, info: CollectionInfo) -> None:
        """Follow an existing collection's layout: hybrid only when it has the sparse vector."""
        if not self.enable_hybrid or info.sparse_name is not None:
            return
        if self._hybrid_asked:
            raise D2LLMError(
                f"collection {info.name!r} holds dense vectors only, so hybrid=True cannot add "
                "BM25 vectors to it: pass hybrid=False (or None) to use it as it is, or delete "
                "it and ingest again to build it hybrid")
        self.enable_hybrid = False

    # ------------------------------------------------------------------ ingestion checks
    def _before_write(self, nodes: Sequence[BaseNode]) -> None:
        check_node_vectors(self._d2llm_student, nodes, self.collection_name)
        if self.client.collection_exists(self.collection_name):
            self._match_collection(self._guard.ensure(self._d2llm_student))

    def _after_write(self) -> None:
        if not self._guard.is_recorded(self._d2llm_student):
            self._guard.remember(self._d2llm_student, record_student(self, self._d2llm_student))

    def _build_points(self, nodes: list[BaseNode], sparse_vector_name: str
                      ) -> tuple[list[Any], list[str]]:
        points, ids = super()._build_points(nodes, sparse_vector_name)
        for point, node in zip(points, nodes, strict=True):
            point.payload[SOURCE_KEY] = source_of(node)
        return points, ids

    def _stale_delete(self, nodes: Sequence[BaseNode]) -> dict[str, Any] | None:
        """The ``delete`` arguments removing these files' points of an earlier ingestion."""
        from qdrant_client import models

        found = stale_filter(nodes)
        if found is None or not self._collection_initialized:
            return None
        return dict(collection_name=self.collection_name,
                    points_selector=models.FilterSelector(filter=found))

    def add(self, nodes: list[BaseNode], **kwargs: Any) -> list[str]:
        if not nodes:
            return []
        self._before_write(nodes)
        assign_stable_ids(nodes)
        stale = self._stale_delete(nodes)
        if stale is not None:
            self.client.delete(**stale)
        ids = super().add(nodes, **kwargs)
        self._after_write()
        return ids

    async def async_add(self, nodes: list[BaseNode], **kwargs: Any) -> list[str]:
        if not nodes:
            return []
        aclient = self._aclient
        if aclient is None:
            return await asyncio.to_thread(self.add, nodes, **kwargs)
        student = self._d2llm_student
        await asyncio.to_thread(check_node_vectors, student, nodes, self.collection_name)
        if await aclient.collection_exists(self.collection_name):
            self._collection_initialized = True
            self._match_collection(await self._guard.aensure(student))
        assign_stable_ids(nodes)
        stale = self._stale_delete(nodes)
        if stale is not None:
            await aclient.delete(**stale)
        ids = await super().async_add(nodes, **kwargs)
        if not self._guard.is_recorded(student):
            self._guard.remember(student, await arecord_student(self, student))
        return ids
