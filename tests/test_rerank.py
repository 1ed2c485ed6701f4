"""D2LLMRerank: IEM rescoring of retrieved nodes from the vectors stored in Qdrant."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from llama_index_d2llm import D2LLMEmbedding, D2LLMRerank, StudentMismatchError
from llama_index_d2llm.qdrant import (
    MissingVectorError,
    UnsupportedVectorStoreError,
    describe_collection,
    record_student,
)
from tests.plugin_helpers import (
    QUERY,
    TEXTS,
    VECTOR_LAYOUTS,
    build_index,
    count_encodes,
    direct_scores,
    other_student,
    store_with_layout,
)


@pytest.fixture(scope="module")
def embed(tiny_student_dir):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32")


@pytest.fixture(scope="module")
def indexed(embed):
    """(index, store) over the corpus, with the student recorded on the collection."""
    index, store = build_index(embed)
    record_student(store, embed)
    return index, store


def first_stage(index, query=QUERY):
    return index.as_retriever(similarity_top_k=len(TEXTS)).retrieve(query)


def test_scores_equal_the_students_direct_scores_matched_by_id(embed, indexed):
    index, store = indexed
    hits = first_stage(index)
    random.Random(0).shuffle(hits)  # order must not matter: vectors are matched by id
    rerank = D2LLMRerank(top_n=5, vector_store=store, embed_model=embed)
    ranked = rerank.postprocess_nodes(hits, query_str=QUERY)
    expected = direct_scores(embed.student, QUERY)
    assert len(ranked) == 5
    for hit in ranked:
        assert hit.score == pytest.approx(expected[hit.node.get_content()], abs=1e-4)
    best = sorted(expected, key=expected.get, reverse=True)[:5]
    assert [h.node.get_content() for h in ranked] == best


def test_vectors_are_matched_by_id_whatever_order_qdrant_returns(embed, indexed, monkeypatch):
    index, store = indexed
    hits = first_stage(index)
    rerank = D2LLMRerank(top_n=len(TEXTS), vector_store=store, embed_model=embed)
    expected = {h.node.node_id: h.score for h in rerank.postprocess_nodes(hits, query_str=QUERY)}
    original = store.client.retrieve
    monkeypatch.setattr(store.client, "retrieve",  # a server does not promise request order
                        lambda *args, **kwargs: original(*args, **kwargs)[::-1])
    shuffled = rerank.postprocess_nodes(hits, query_str=QUERY)
    assert {h.node.node_id: h.score for h in shuffled} == expected


@pytest.mark.parametrize("layout", VECTOR_LAYOUTS)
def test_named_unnamed_and_custom_vector_names(embed, layout):
    index, store = build_index(embed, store_with_layout(layout, embed.dimension))
    assert describe_collection(store).vector_name == ("" if layout == "unnamed" else
                                                      store.dense_vector_name)
    ranked = D2LLMRerank(top_n=3, vector_store=store, embed_model=embed).postprocess_nodes(
        first_stage(index), query_str=QUERY)
    expected = direct_scores(embed.student, QUERY)
    assert [h.score for h in ranked] == pytest.approx(
        sorted(expected.values(), reverse=True)[:3], abs=1e-4)


def test_stored_passages_are_not_encoded_again(embed, indexed, monkeypatch):
    index, store = indexed
    rerank = D2LLMRerank(top_n=3, vector_store=store, embed_model=embed)
    bundle_hits = first_stage(index)
    counts = count_encodes(monkeypatch, embed.student)
    from llama_index.core.schema import QueryBundle

    rerank.postprocess_nodes(bundle_hits, query_str=QUERY)
    assert counts == {"query": 1}  # only the query went through the LLM
    with_vector = QueryBundle(QUERY, embedding=embed.get_query_embedding(QUERY))
    counts.clear()
    rerank.postprocess_nodes(bundle_hits, query_bundle=with_vector)
    assert counts == {}  # the retriever's query vector is reused
    wrong_size = QueryBundle(QUERY, embedding=[0.1] * (embed.dimension + 3))
    rerank.postprocess_nodes(bundle_hits, query_bundle=wrong_size)
    assert counts == {"query": 1}


def test_unrecorded_collection_is_verified_once_then_recorded(embed, monkeypatch):
    index, store = build_index(embed)
    assert describe_collection(store).record is None
    rerank = D2LLMRerank(top_n=3, vector_store=store, embed_model=embed)
    hits = first_stage(index)
    counts = count_encodes(monkeypatch, embed.student)
    rerank.postprocess_nodes(hits, query_str=QUERY)
    assert 0 < counts["passage"] <= 2  # a sample re-encoded to check the vectors, not all 8
    assert describe_collection(store).record["fingerprint"] == embed.fingerprint
    counts.clear()
    rerank.postprocess_nodes(hits, query_str=QUERY)
    assert counts["passage"] == 0


def test_keep_retrieval_score_hides_it_from_the_llm(embed, indexed):
    from llama_index.core.schema import MetadataMode

    index, store = indexed
    hits = first_stage(index)
    cosines = {h.node.node_id: h.score for h in hits}
    ranked = D2LLMRerank(top_n=4, vector_store=store, embed_model=embed,
                         keep_retrieval_score=True).postprocess_nodes(hits, query_str=QUERY)
    for hit in ranked:
        assert hit.node.metadata["retrieval_score"] == cosines[hit.node.node_id]
        assert "retrieval_score" not in hit.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "topic" in hit.node.get_content(metadata_mode=MetadataMode.LLM)


def test_empty_in_empty_out(embed, indexed):
    rerank = D2LLMRerank(top_n=3, vector_store=indexed[1], embed_model=embed)
    assert rerank.postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(ValueError, match="needs the query"):
        rerank.postprocess_nodes(first_stage(indexed[0]))


def test_rerank_events_are_emitted(embed, indexed):
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    seen = []

    class Collect(BaseEventHandler):
        def handle(self, event, **kwargs):
            seen.append(event.class_name())

    root = get_dispatcher()
    handler = Collect()
    root.add_event_handler(handler)
    debug = LlamaDebugHandler()
    try:
        rerank = D2LLMRerank(top_n=2, vector_store=indexed[1], embed_model=embed,
                             callback_manager=CallbackManager([debug]))
        ranked = rerank.postprocess_nodes(first_stage(indexed[0]), query_str=QUERY)
    finally:
        root.event_handlers.remove(handler)
    assert "ReRankStartEvent" in seen and "ReRankEndEvent" in seen
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    assert pairs[0][1].payload["nodes"] == ranked


def test_node_missing_from_the_store_is_named(embed, indexed):
    from llama_index.core.schema import NodeWithScore, TextNode

    stray_id = str(uuid.uuid4())
    nodes = first_stage(indexed[0])[:2] + [NodeWithScore(node=TextNode(text="x", id_=stray_id),
                                                         score=0.5)]
    rerank = D2LLMRerank(top_n=2, vector_store=indexed[1], embed_model=embed)
    with pytest.raises(MissingVectorError, match=stray_id):
        rerank.postprocess_nodes(nodes, query_str=QUERY)
    odd = [NodeWithScore(node=TextNode(text="x", id_="my-own-id"), score=0.5)]
    with pytest.raises(MissingVectorError, match="my-own-id.*not a Qdrant point id"):
        rerank.postprocess_nodes(odd, query_str=QUERY)


def test_a_store_that_is_not_qdrant_is_refused_with_the_reason(embed):
    from llama_index.core.vector_stores import SimpleVectorStore

    with pytest.raises(UnsupportedVectorStoreError, match="SimpleVectorStore.*QdrantVectorStore"):
        D2LLMRerank(vector_store=SimpleVectorStore(), embed_model=embed)


def test_embed_model_must_be_the_student(indexed):
    from llama_index.core.embeddings import MockEmbedding

    with pytest.raises(TypeError, match="MockEmbedding.*D2LLMEmbedding"):
        D2LLMRerank(vector_store=indexed[1], embed_model=MockEmbedding(embed_dim=32))


def test_another_student_is_refused(embed, indexed, tiny_backbone):
    other = D2LLMEmbedding.from_student(other_student(tiny_backbone))
    assert other.fingerprint != embed.fingerprint
    index, store = indexed  # recorded: refused on the fingerprint
    rerank = D2LLMRerank(vector_store=store, embed_model=other)
    with pytest.raises(StudentMismatchError) as error:
        rerank.postprocess_nodes(first_stage(index), query_str=QUERY)
    assert embed.fingerprint in str(error.value) and other.fingerprint in str(error.value)
    fresh_index, fresh_store = build_index(embed)  # unrecorded: refused on the vectors
    rerank = D2LLMRerank(vector_store=fresh_store, embed_model=other)
    with pytest.raises(StudentMismatchError, match="cosine"):
        rerank.postprocess_nodes(first_stage(fresh_index), query_str=QUERY)
    assert describe_collection(fresh_store).record is None
    with pytest.raises(StudentMismatchError, match="overwrite=True"):
        record_student(store, other)  # an existing record is protected
    record_student(fresh_store, other)  # an explicit record is trusted as given...
    with pytest.raises(StudentMismatchError, match=other.fingerprint):
        D2LLMRerank(vector_store=fresh_store, embed_model=embed).postprocess_nodes(
            first_stage(fresh_index), query_str=QUERY)  # ...and then guards the collection
    record_student(fresh_store, embed, overwrite=True)
    assert describe_collection(fresh_store).record["fingerprint"] == embed.fingerprint


def test_async_equals_sync(embed, indexed):
    index, store = indexed
    rerank = D2LLMRerank(top_n=4, vector_store=store, embed_model=embed)
    hits = first_stage(index)
    sync = rerank.postprocess_nodes(hits, query_str=QUERY)
    asynchronous = asyncio.run(rerank.apostprocess_nodes(hits, query_str=QUERY))
    assert [(h.node.node_id, pytest.approx(h.score, abs=1e-6)) for h in sync] == [
        (h.node.node_id, h.score) for h in asynchronous]
