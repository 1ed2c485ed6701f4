"""``D2LLMRetriever``: Qdrant search (dense or hybrid), then rescoring, in one retriever.

The query is embedded once; one Qdrant call returns the ``similarity_top_k`` candidates
together with their stored vectors: the nearest by cosine, or on a hybrid collection the
dense and BM25 top ``similarity_top_k`` fused by reciprocal rank on Qdrant's side (a second,
filtered sparse query then returns the candidates' BM25 scores). Each candidate's cosine, IEM
logit and BM25 score are fused by the weights the student recorded for that first stage
(``student/fusion.py``) and the best ``top_n`` come back. This is D2LLM's cost model: one
query encoding plus a small MLP over stored vectors.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters

from llama_index_d2llm.collection import (
    CollectionInfo,
    StoredHit,
    alexical_scores,
    asearch_with_vectors,
    first_stage_of,
    lexical_scores,
    search_with_vectors,
    sparse_query,
)
from llama_index_d2llm.embedding import D2LLMEmbedding
from llama_index_d2llm.provenance import StudentGuard
from llama_index_d2llm.ranking import (
    Task,
    aquery_vector,
    listening,
    query_vector,
    rank_by_iem,
    require_d2llm_embedding,
    rerank_events,
    rescored_order,
    scored_node,
    weighs_lexical,
)
from llama_index_d2llm.student.config import TASKS

dispatcher = get_dispatcher(__name__)


class D2LLMRetriever(BaseRetriever):
    """Retrieve with Qdrant (cosine, or hybrid), rerank the candidates with the D2LLM IEM.

    Args:
        index: a ``VectorStoreIndex`` over a ``QdrantVectorStore``; its embed model is used
            when it is a ``D2LLMEmbedding``. Or pass ``vector_store`` and ``embed_model``.
        similarity_top_k: candidates fetched by the first stage (when hybrid: the dense and
            the sparse top similarity_top_k each, fused, cut to similarity_top_k).
        top_n: nodes returned after rescoring (score = the fusion; the first-stage score is
            kept in ``node.metadata["retrieval_score"]``, hidden from the LLM).
        task: IEM branch, "asymmetric" (query -> passage) or "symmetric".
        filters, doc_ids, node_ids: restrict the search exactly as ``VectorIndexRetriever``
            does (the store's own filter builder is used; in both searches when hybrid).
        hybrid: ``None`` (default): hybrid when the collection holds BM25 sparse vectors and
            the store encodes queries for them (a ``D2LLMVectorStore``), else dense; ``True``
            requires it; ``False`` searches the dense vectors only. The first-stage score kept
            in metadata is then the fused RRF score.
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
        hybrid: bool | None = None,
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
        self.hybrid = hybrid
        super().__init__(callback_manager=callback_manager or CallbackManager(),
                         verbose=verbose, **kwargs)

    @property
    def embed_model(self) -> D2LLMEmbedding:
        return self._embed_model

    @property
    def vector_store(self) -> Any:
        return self._vector_store

    def _search_kwargs(self, query_bundle: QueryBundle, info: CollectionInfo
                       ) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(filters=self.filters, doc_ids=self.doc_ids,
                                      node_ids=self.node_ids)
        if self.first_stage(info) == "hybrid":
            kwargs["sparse_query"] = sparse_query(self._vector_store, query_bundle.query_str)
        return kwargs

    def first_stage(self, info: CollectionInfo) -> str:
        """"dense" or "hybrid": what this retriever searches the collection with."""
        return first_stage_of(self._vector_store, info, self.hybrid)

    def _rank(self, query_bundle: QueryBundle, query: list[float], hits: list[StoredHit],
              first_stage: str, lexical: list[float] | None = None) -> list[NodeWithScore]:
        if not hits:
            return []
        if not listening(self.callback_manager):  # nobody sees the candidates: nodes of the
            best = rescored_order(self._embed_model, query,  # results only
                                  [h.similarity for h in hits], [h.vector for h in hits],
                                  self.task, self.top_n, first_stage, lexical)
            return [scored_node(hits[i].node, logit, hits[i].similarity) for i, logit in best]
        candidates = [NodeWithScore(node=h.node, score=h.similarity) for h in hits]
        with rerank_events(self.callback_manager, query_bundle, candidates, self.top_n,
                           self._embed_model.model_name) as finish:
            ranked = rank_by_iem(self._embed_model, query, candidates,
                                 [h.vector for h in hits], self.task, self.top_n,
                                 keep_retrieval_score=True, first_stage=first_stage,
                                 lexical=lexical)
            finish(ranked)
        return ranked

    def _needs_bm25(self, search: dict[str, Any], hits: list[StoredHit]) -> bool:
        """Whether the hybrid fusion needs the candidates' BM25 scores from Qdrant."""
        return (search.get("sparse_query") is not None and bool(hits)
                and weighs_lexical(self._embed_model, "hybrid"))

    @dispatcher.span
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        student = self._embed_model.student
        info = self._guard.ensure(student)
        query = query_vector(self._embed_model, query_bundle)
        # Later postprocessors reuse it, as after VectorIndexRetriever.
        query_bundle.embedding = query
        search = self._search_kwargs(query_bundle, info)
        hits = search_with_vectors(self._vector_store, query, self.similarity_top_k, info,
                                   **search)
        lexical = None
        if self._needs_bm25(search, hits):
            lexical = lexical_scores(self._vector_store, search["sparse_query"],
                                     [h.node_id for h in hits], info)
        return self._rank(query_bundle, query, hits, self.first_stage(info), lexical)

    @dispatcher.span
    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        student = self._embed_model.student
        info = await self._guard.aensure(student)
        query = await aquery_vector(self._embed_model, query_bundle)
        query_bundle.embedding = query
        search = self._search_kwargs(query_bundle, info)
        hits = await asearch_with_vectors(self._vector_store, query, self.similarity_top_k,
                                          info, **search)
        lexical = None
        if self._needs_bm25(search, hits):
            lexical = await alexical_scores(self._vector_store, search["sparse_query"],
                                            [h.node_id for h in hits], info)
        return await asyncio.to_thread(self._rank, query_bundle, query, hits,
                                       self.first_stage(info), lexical)
