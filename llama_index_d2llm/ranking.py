"""What the retriever and the postprocessor share: the query vector and the IEM ranking.

``D2LLMRetriever`` and ``D2LLMRerank`` differ only in where the candidates and their stored
vectors come from (one search call, or a fetch by id); from there on they rank alike, with the
same instrumentation events as the llama-index rerankers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.schema import NodeWithScore, QueryBundle

from llama_index_d2llm.embedding import D2LLMEmbedding
from llama_index_d2llm.student.tasks import Task

dispatcher = get_dispatcher(__name__)

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
    best = rescored_order(embed_model, query, [n.score or 0.0 for n in nodes], vectors, task,
                          top_n, first_stage, lexical)
    return [scored_node(nodes[i].node, logit, nodes[i].score if keep_retrieval_score else None)
            for i, logit in best]


def rescored_order(embed_model: D2LLMEmbedding, query: Sequence[float],
                   first_stage_scores: Sequence[float], vectors: Sequence[Sequence[float]],
                   task: Task, top_n: int, first_stage: str = "dense",
                   lexical: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """``(candidate index, fused score)`` of the best ``top_n``, best first, from the vectors
    and scores alone: the caller builds nodes for these only."""
    import numpy as np

    # first-stage order from the first-stage scores (a postprocessor may get them shuffled)
    order = sorted(range(len(first_stage_scores)), key=lambda i: -first_stage_scores[i])
    passages = np.asarray([vectors[i] for i in order], dtype=np.float32)
    lexical = None if lexical is None else [lexical[i] for i in order]
    logits = embed_model.student.rescore(query, passages, first_stage=first_stage, task=task,
                                         lexical_scores=lexical).tolist()
    ranked = sorted(range(len(order)), key=lambda k: -logits[k])[:top_n]
    return [(order[k], float(logits[k])) for k in ranked]


def scored_node(node: Any, score: float, retrieval_score: float | None) -> NodeWithScore:
    """The node with its fused score; the first-stage score kept in metadata when given
    (hidden from the LLM and the embed text)."""
    if retrieval_score is not None:
        node.metadata[RETRIEVAL_SCORE_KEY] = retrieval_score
        for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
            if RETRIEVAL_SCORE_KEY not in excluded:
                excluded.append(RETRIEVAL_SCORE_KEY)
    return NodeWithScore(node=node, score=score)


def listening(callback_manager: CallbackManager) -> bool:
    """Whether any instrumentation handler or callback would see the rerank events' nodes
    (else a retriever builds nodes for the results only)."""
    if callback_manager.handlers:
        return True
    from llama_index_instrumentation.event_handlers import NullEventHandler

    current: Any = dispatcher
    while True:
        if any(not isinstance(h, NullEventHandler) for h in current.event_handlers):
            return True
        if not current.propagate or current.manager is None:
            return False
        current = current.parent


def weighs_lexical(embed_model: D2LLMEmbedding, first_stage: str) -> bool:
    """Whether this first stage's fusion needs the candidates' BM25 scores (a Qdrant call)."""
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
