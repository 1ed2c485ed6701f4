"""``D2LLMRetriever``: Qdrant vector search, then IEM rescoring, in one retriever.

The query is embedded once; one Qdrant call returns the ``similarity_top_k`` nearest nodes
together with their stored vectors; the IEM rescores them and the best ``top_n`` come back.
This is D2LLM's cost model: one query encoding plus a small MLP over stored vectors.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters

from llama_index_d2llm.embedding import D2LLMEmbedding
from llama_index_d2llm.postprocessor import (
    Task,
    aquery_vector,
    query_vector,
    rank_by_iem,
    require_d2llm_embedding,
    rerank_events,
)
from llama_index_d2llm.qdrant import (
    StoredHit,
    StudentGuard,
    asearch_with_vectors,
    search_with_vectors,
)
from llama_index_d2llm.student.config import TASKS

dispatcher = get_dispatcher(__name__)


class D2LLMRetriever(BaseRetriever):
    """Retrieve with Qdrant's cosine search, rerank the candidates with the D2LLM IEM.

    Args:
        index: a ``VectorStoreIndex`` over a ``QdrantVectorStore``; its embed model is used
            when it is a ``D2LLMEmbedding``. Or pass ``vector_store`` and ``embed_model``.
        similarity_top_k: candidates fetched by the first-stage vector search.
        top_n: nodes returned after rescoring (score = IEM logit; the first-stage cosine is
            kept in ``node.metadata["retrieval_score"]``, hidden from the LLM).
        task: IEM branch, "asymmetric" (query -> passage) or "symmetric".
        filters, doc_ids, node_ids: restrict the search exactly as ``VectorIndexRetriever``
            does (the store's own filter builder is used).

    A hybrid QdrantVectorStore is searched on its dense vectors only.
    """

    def __init__(
        self,
        index: Any = None,
        similarity_top_k: int = 100,
        top_n: int = 10,
        task: Task = "asymmetric",
        filters: MetadataFilters | None = None,
        embed_model: D2LLMEmbedding | None = None,
        *,
        vector_store: Any = None,
        doc_ids: list[str] | None = None,
        node_ids: list[str] | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> None:
        if index is None and vector_store is None:
            raise ValueError("D2LLMRetriever needs index=VectorStoreIndex(...) or "
                             "vector_store=QdrantVectorStore(...) with embed_model=")
        if index is not None:
            vector_store = vector_store or index.vector_store
            if embed_model is None:
                embed_model = getattr(index, "_embed_model", None)
        self._embed_model = require_d2llm_embedding(embed_model, "D2LLMRetriever")
        self._guard = StudentGuard(vector_store, "D2LLMRetriever")
        if similarity_top_k < 1 or top_n < 1:
            raise ValueError(f"similarity_top_k ({similarity_top_k}) and top_n ({top_n}) "
                             "must be positive")
        if top_n > similarity_top_k:
            raise ValueError(f"top_n={top_n} exceeds similarity_top_k={similarity_top_k}: the "
                             "IEM can only rerank the candidates the vector search returns; "
                             "raise similarity_top_k or lower top_n")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self._vector_store = self._guard.store
        self.similarity_top_k = similarity_top_k
        self.top_n = top_n
        self.task: Task = task
        self.filters = filters
        self.doc_ids = doc_ids
        self.node_ids = node_ids
        super().__init__(callback_manager=callback_manager or CallbackManager(),
                         verbose=verbose, **kwargs)

    @property
    def embed_model(self) -> D2LLMEmbedding:
        return self._embed_model

    @property
    def vector_store(self) -> Any:
        return self._vector_store

    def _search_kwargs(self) -> dict[str, Any]:
        return dict(filters=self.filters, doc_ids=self.doc_ids, node_ids=self.node_ids)

    def _rank(self, query_bundle: QueryBundle, query: list[float], hits: list[StoredHit]
              ) -> list[NodeWithScore]:
        candidates = [NodeWithScore(node=h.node, score=h.similarity) for h in hits]
        if not candidates:
            return []
        with rerank_events(self.callback_manager, query_bundle, candidates, self.top_n,
                           self._embed_model.model_name) as finish:
            ranked = rank_by_iem(self._embed_model, query, candidates,
                                 [h.vector for h in hits], self.task, self.top_n,
                                 keep_retrieval_score=True)
            finish(ranked)
        return ranked

    @dispatcher.span
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        student = self._embed_model.student
        info = self._guard.ensure(student)
        query = query_vector(self._embed_model, query_bundle)
        # Later postprocessors reuse it, as after VectorIndexRetriever.
        query_bundle.embedding = query
        hits = search_with_vectors(self._vector_store, query, self.similarity_top_k, info,
                                   **self._search_kwargs())
        return self._rank(query_bundle, query, hits)

    @dispatcher.span
    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        student = self._embed_model.student
        info = await self._guard.aensure(student)
        query = await aquery_vector(self._embed_model, query_bundle)
        query_bundle.embedding = query
        hits = await asearch_with_vectors(self._vector_store, query, self.similarity_top_k,
                                          info, **self._search_kwargs())
        return await asyncio.to_thread(self._rank, query_bundle, query, hits)
