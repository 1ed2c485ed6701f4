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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from llama_index_d2llm.embedding import D2LLMEmbedding
from llama_index_d2llm.qdrant import (
    CollectionInfo,
    StudentGuard,
    afetch_vectors,
    alexical_scores,
    fetch_vectors,
    first_stage_of,
    lexical_scores,
    sparse_query,
)

dispatcher = get_dispatcher(__name__)

Task = Literal["asymmetric", "symmetric"]
FirstStage = Literal["dense", "hybrid"]

#: Metadata key of the first-stage (cosine) score kept on rescored nodes.
RETRIEVAL_SCORE_KEY = "retrieval_score"


def require_d2llm_embedding(embed_model: Any, feature: str) -> D2LLMEmbedding:
    """The embed model as a D2LLMEmbedding, or an error saying which one is needed."""
    if isinstance(embed_model, D2LLMEmbedding):
        return embed_model
    kind = "None" if embed_model is None else type(embed_model).__name__
    raise TypeError(
        f"{feature} needs embed_model=D2LLMEmbedding(...) with the student that embedded the "
        f"collection (its IEM scores that student's vectors), got {kind}: pass "
        "embed_model=D2LLMEmbedding(model_name='path/to/student')"
    )


def query_vector(embed_model: D2LLMEmbedding, query_bundle: QueryBundle) -> list[float]:
    """The query vector the retriever already computed, else the student's encoding."""
    given = query_bundle.embedding
    if given is not None and len(given) == embed_model.dimension:
        return list(given)
    return embed_model.get_agg_embedding_from_queries(_embedding_strs(query_bundle))


async def aquery_vector(embed_model: D2LLMEmbedding, query_bundle: QueryBundle) -> list[float]:
    given = query_bundle.embedding
    if given is not None and len(given) == embed_model.dimension:
        return list(given)
    return await embed_model.aget_agg_embedding_from_queries(_embedding_strs(query_bundle))


def _embedding_strs(query_bundle: QueryBundle) -> list[str]:
    return list(query_bundle.embedding_strs) or [query_bundle.query_str]


def rank_by_iem(embed_model: D2LLMEmbedding, query: Sequence[float],
                nodes: Sequence[NodeWithScore], vectors: Sequence[Sequence[float]], task: Task,
                top_n: int, keep_retrieval_score: bool, first_stage: str = "dense",
                lexical: Sequence[float] | None = None) -> list[NodeWithScore]:
    """Nodes rescored, best first, cut to ``top_n``.

    The score fuses each node's cosine, IEM logit and BM25 score (``lexical``, aligned with
    ``nodes``; hybrid search) by the weights the student recorded for that first stage
    (``student/fusion.py``). The first-stage score goes into metadata (hidden from the LLM and
    embed text) when asked.
    """
    # first-stage order from the first-stage scores (a postprocessor may get them shuffled)
    order = sorted(range(len(nodes)), key=lambda i: -(nodes[i].score or 0.0))
    nodes = [nodes[i] for i in order]
    vectors = [vectors[i] for i in order]
    lexical = None if lexical is None else [lexical[i] for i in order]
    logits = embed_model.student.rescore(query, vectors, first_stage=first_stage, task=task,
                                         lexical_scores=lexical).tolist()
    rescored = []
    for hit, logit in zip(nodes, logits, strict=True):
        if keep_retrieval_score:
            node = hit.node
            node.metadata[RETRIEVAL_SCORE_KEY] = hit.score
            for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                if RETRIEVAL_SCORE_KEY not in excluded:
                    excluded.append(RETRIEVAL_SCORE_KEY)
        rescored.append(NodeWithScore(node=hit.node, score=float(logit)))
    rescored.sort(key=lambda n: -(n.score or 0.0))
    return rescored[:top_n]


def _weighs_lexical(embed_model: D2LLMEmbedding, first_stage: str) -> bool:
    """Whether this first stage's fusion needs the candidates' BM25 scores."""
    fusion = embed_model.student.fusion(first_stage)
    return fusion is not None and fusion.lexical > 0


@contextmanager
def rerank_events(callback_manager: CallbackManager, query_bundle: QueryBundle | None,
                  nodes: list[NodeWithScore], top_n: int, model_name: str
                  ) -> Iterator[Callable[[list[NodeWithScore]], None]]:
    """ReRankStart/End instrumentation events and a RERANKING callback event, as the
    llama-index rerankers emit them; the caller reports its result through the yielded call."""
    dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=top_n,
                                      model_name=model_name))
    payload = {EventPayload.NODES: nodes, EventPayload.MODEL_NAME: model_name,
               EventPayload.QUERY_STR: query_bundle.query_str if query_bundle else None,
               EventPayload.TOP_K: top_n}
    with callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
        def finish(new_nodes: list[NodeWithScore]) -> None:
            event.on_end(payload={EventPayload.NODES: new_nodes})
            dispatcher.event(ReRankEndEvent(nodes=new_nodes))

        yield finish


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
            node_ids = [n.node.node_id for n in nodes]
            vectors = fetch_vectors(self.vector_store, node_ids, info)
            stage = self._first_stage(info)
            lexical = None
            if _weighs_lexical(self.embed_model, stage):
                lexical = lexical_scores(self.vector_store,
                                         sparse_query(self.vector_store, query_bundle.query_str),
                                         node_ids, info)
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
            node_ids = [n.node.node_id for n in nodes]
            vectors = await afetch_vectors(self.vector_store, node_ids, info)
            stage = self._first_stage(info)
            lexical = None
            if _weighs_lexical(self.embed_model, stage):
                lexical = await alexical_scores(
                    self.vector_store, sparse_query(self.vector_store, query_bundle.query_str),
                    node_ids, info)
            ranked = await asyncio.to_thread(rank_by_iem, self.embed_model, query, nodes,
                                             vectors, self.task, self.top_n,
                                             self.keep_retrieval_score, stage, lexical)
            finish(ranked)
        return ranked
