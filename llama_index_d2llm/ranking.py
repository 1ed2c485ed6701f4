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
