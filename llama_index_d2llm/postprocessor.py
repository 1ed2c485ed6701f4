"""``D2LLMRerank``: rescore retrieved nodes from the vectors stored in Qdrant.

Each node's cosine, IEM logit and (on a hybrid collection) BM25 score are fused by the weights
the student recorded for that first stage (``student/fusion.py``).

Drops into any LlamaIndex pipeline as a node postprocessor. The passages are not encoded
again: their vectors, computed once at ingestion, are fetched from Qdrant by node id in one
round trip. Only the query goes through the LLM, and only when the retriever did not already
embed it (``query_bundle.embedding``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from llama_index_d2llm.collection import (
    CollectionInfo,
    afetch_candidates,
    fetch_candidates,
    first_stage_of,
    sparse_query,
)
from llama_index_d2llm.embedding import D2LLMEmbedding
from llama_index_d2llm.provenance import StudentGuard
from llama_index_d2llm.ranking import (  # re-exported: their import path before ranking.py
    RETRIEVAL_SCORE_KEY,
    FirstStage,
    Task,
    aquery_vector,
    query_vector,
    rank_by_iem,
    require_d2llm_embedding,
    rerank_events,
    weighs_lexical,
)

__all__ = [
    "RETRIEVAL_SCORE_KEY",
    "D2LLMRerank",
    "FirstStage",
    "Task",
    "aquery_vector",
    "query_vector",
    "rank_by_iem",
    "require_d2llm_embedding",
    "rerank_events",
]

dispatcher = get_dispatcher(__name__)


class D2LLMRerank(BaseNodePostprocessor):
    """Rescore nodes with the D2LLM student, using the passage vectors stored in Qdrant.

    ``vector_store`` must be the QdrantVectorStore the nodes were retrieved from, and
    ``embed_model`` the D2LLMEmbedding whose student built it: the collection's recorded
    student (or a re-encoded sample) is checked once, and another student is refused.
    Node scores become the fusion of cosine, IEM logit and, for hybrid, BM25 score that the
    student recorded for the first stage (``student/fusion.py``; higher is better).

    ``first_stage`` names the search the nodes come from, which selects the fusion:
    ``None`` infers it from the store ("hybrid" when the collection holds BM25 sparse vectors
    and the store can encode queries for them, as ``D2LLMRetriever`` would search it); pass
    "dense" for nodes of a dense-only retriever over a hybrid store.
    """

    top_n: int = Field(default=10, gt=0, description="Number of nodes to return.")
    task: Task = Field(default="asymmetric",
                       description="IEM branch: asymmetric (query -> passage) or symmetric.")
    keep_retrieval_score: bool = Field(
        default=False,
        description=f"Keep the first-stage score in metadata[{RETRIEVAL_SCORE_KEY!r}].")
    first_stage: FirstStage | None = Field(
        default=None, description="The search the nodes come from; None: from the store.")
    vector_store: Any = Field(exclude=True, description="The QdrantVectorStore of the nodes.")
    embed_model: D2LLMEmbedding = Field(description="The student that built the collection.")

    _guard: StudentGuard = PrivateAttr()

    def __init__(self, *, vector_store: Any, embed_model: Any, top_n: int = 10,
                 task: Task = "asymmetric", keep_retrieval_score: bool = False,
                 first_stage: FirstStage | None = None, **kwargs: Any) -> None:
        embed_model = require_d2llm_embedding(embed_model, "D2LLMRerank")
        guard = StudentGuard(vector_store, "D2LLMRerank")
        super().__init__(vector_store=vector_store, embed_model=embed_model, top_n=top_n,
                         task=task, keep_retrieval_score=keep_retrieval_score,
                         first_stage=first_stage, **kwargs)
        self._guard = guard

    @classmethod
    def class_name(cls) -> str:
        return "D2LLMRerank"

    def _first_stage(self, info: CollectionInfo) -> str:
        if self.first_stage is not None:
            return self.first_stage
        return first_stage_of(self.vector_store, info)

    def _request(self, query_bundle: QueryBundle, nodes: list[NodeWithScore],
                 info: CollectionInfo) -> tuple[list[str], str, Any]:
        """The node ids, the first stage, and the query's sparse vector when the fusion of
        that first stage weighs BM25 (else ``None``: no BM25 scores are fetched)."""
        stage = self._first_stage(info)
        sparse = (sparse_query(self.vector_store, query_bundle.query_str)
                  if weighs_lexical(self.embed_model, stage) else None)
        return [n.node.node_id for n in nodes], stage, sparse

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("D2LLMRerank needs the query: pass query_bundle= or query_str=")
        if not nodes:
            return []
        with rerank_events(self.callback_manager, query_bundle, nodes, self.top_n,
                           self.embed_model.model_name) as finish:
            info = self._guard.ensure(self.embed_model.student)
            query = query_vector(self.embed_model, query_bundle)
            node_ids, stage, sparse = self._request(query_bundle, nodes, info)
            vectors, lexical = fetch_candidates(self.vector_store, node_ids, info, sparse)
            ranked = rank_by_iem(self.embed_model, query, nodes, vectors, self.task, self.top_n,
                                 self.keep_retrieval_score, stage, lexical)
            finish(ranked)
        return ranked

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore],
                                  query_bundle: QueryBundle | None = None
                                  ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("D2LLMRerank needs the query: pass query_bundle= or query_str=")
        if not nodes:
            return []
        with rerank_events(self.callback_manager, query_bundle, nodes, self.top_n,
                           self.embed_model.model_name) as finish:
            info = await self._guard.aensure(self.embed_model.student)
            query = await aquery_vector(self.embed_model, query_bundle)
            node_ids, stage, sparse = self._request(query_bundle, nodes, info)
            vectors, lexical = await afetch_candidates(self.vector_store, node_ids, info, sparse)
            ranked = await asyncio.to_thread(rank_by_iem, self.embed_model, query, nodes,
                                             vectors, self.task, self.top_n,
                                             self.keep_retrieval_score, stage, lexical)
            finish(ranked)
        return ranked
