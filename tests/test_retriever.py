"""D2LLMRetriever: Qdrant search with stored vectors, then IEM rescoring."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMStudent, StudentMismatchError
from llama_index_d2llm.qdrant import (
    MissingVectorError,
    UnsupportedVectorStoreError,
    check_student,
    describe_collection,
    record_student,
)
from tests.plugin_helpers import (
    CORPUS,
    QUERY,
    TEXTS,
    VECTOR_LAYOUTS,
    blas_threads,
    build_index,
    count_encodes,
    direct_scores,
    documents,
    embedded_texts,
    other_student,
    qdrant_store,
    store_with_layout,
)


@pytest.fixture(scope="module")
def embed(tiny_student_dir):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32")


@pytest.fixture(scope="module")
def indexed(embed):
    index, store = build_index(embed)
    record_student(store, embed)
    return index, store


def test_iem_score_after_the_qdrant_round_trip_equals_the_students(embed, indexed):
    student = embed.student
    query = student.encode([QUERY], kind="query")[0]
    passages = student.encode(embedded_texts())
    expected = student.rescore(query, passages)  # no Qdrant involved
    cosines = passages @ query
    hits = D2LLMRetriever(index=indexed[0], similarity_top_k=len(TEXTS),
                          top_n=len(TEXTS)).retrieve(QUERY)
    assert len(hits) == len(TEXTS)
    for hit in hits:
        position = TEXTS.index(hit.node.get_content())
        assert hit.score == pytest.approx(float(expected[position]), abs=1e-4)
        assert hit.node.metadata["retrieval_score"] == pytest.approx(float(cosines[position]),
                                                                     abs=1e-4)
        assert hit.node.embedding is None  # like VectorIndexRetriever's nodes
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("layout", VECTOR_LAYOUTS)
def test_every_vector_layout_round_trips(embed, layout):
    index, _ = build_index(embed, store_with_layout(layout, embed.dimension))
    hits = D2LLMRetriever(index=index, similarity_top_k=len(TEXTS), top_n=3).retrieve(QUERY)
    expected = direct_scores(embed.student, QUERY)
    assert [h.score for h in hits] == pytest.approx(sorted(expected.values(), reverse=True)[:3],
                                                    abs=1e-4)


def test_iem_reranks_the_cosine_candidates(embed, indexed):
    student = embed.student
    query = student.encode([QUERY], kind="query")[0]
    passages = student.encode(embedded_texts())
    candidates = (passages @ query).argsort(descending=True)[:4].tolist()
    logits = student.rescore(query, passages[candidates]).tolist()
    best_two = [TEXTS[candidates[i]] for i in sorted(range(4), key=lambda i: -logits[i])[:2]]
    hits = D2LLMRetriever(index=indexed[0], similarity_top_k=4, top_n=2).retrieve(QUERY)
    assert [h.node.get_content() for h in hits] == best_two


def test_symmetric_task_uses_the_symmetric_branch(embed, indexed):
    hits = D2LLMRetriever(index=indexed[0], similarity_top_k=8, top_n=8,
                          task="symmetric").retrieve(QUERY)
    expected = direct_scores(embed.student, QUERY, task="symmetric")
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.node.get_content()], abs=1e-4)


def test_metadata_filters_pass_through_as_with_a_normal_retriever(embed, indexed):
    from llama_index.core.vector_stores import (
        FilterCondition,
        FilterOperator,
        MetadataFilter,
        MetadataFilters,
    )

    index = indexed[0]
    science = MetadataFilters(filters=[MetadataFilter(key="topic", value="science")])
    either = MetadataFilters(filters=[MetadataFilter(key="topic", value="culture"),
                                      MetadataFilter(key="topic", value="animals")],
                             condition=FilterCondition.OR)
    not_in = MetadataFilters(filters=[MetadataFilter(key="topic", value=["science"],
                                                     operator=FilterOperator.NIN)])
    for filters in (science, either, not_in):
        ours = D2LLMRetriever(index=index, similarity_top_k=8, top_n=8,
                              filters=filters).retrieve(QUERY)
        theirs = index.as_retriever(similarity_top_k=8, filters=filters).retrieve(QUERY)
        assert {h.node.node_id for h in ours} == {h.node.node_id for h in theirs}
        assert 0 < len(ours) < len(TEXTS)
    topics = dict(CORPUS)
    hits = D2LLMRetriever(index=index, similarity_top_k=8, top_n=8, filters=science).retrieve(QUERY)
    assert {topics[h.node.get_content()] for h in hits} == {"science"}


def test_one_query_encoding_and_no_passage_encoding(embed, indexed, monkeypatch):
    retriever = D2LLMRetriever(index=indexed[0], similarity_top_k=8, top_n=3)
    counts = count_encodes(monkeypatch, embed.student)
    retriever.retrieve(QUERY)
    assert counts == {"query": 1}


def test_async_retrieve_equals_sync(embed, indexed):
    retriever = D2LLMRetriever(index=indexed[0], similarity_top_k=8, top_n=4)
    sync = retriever.retrieve(QUERY)
    asynchronous = asyncio.run(retriever.aretrieve(QUERY))
    assert [h.node.node_id for h in asynchronous] == [h.node.node_id for h in sync]
    assert [h.score for h in asynchronous] == pytest.approx([h.score for h in sync], abs=1e-6)


def test_async_only_store_uses_the_async_client(embed):
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import AsyncQdrantClient

    aclient = AsyncQdrantClient(":memory:")
    store = QdrantVectorStore(aclient=aclient, collection_name="docs")
    nodes = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=512), embed]).run(
        documents=documents())
    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=8, top_n=3)

    async def run():
        await store.async_add(nodes)
        hits = await retriever.aretrieve(QUERY)
        info = await aclient.get_collection("docs")
        return hits, info.config.metadata

    hits, metadata = asyncio.run(run())
    expected = direct_scores(embed.student, QUERY)
    assert [h.score for h in hits] == pytest.approx(sorted(expected.values(), reverse=True)[:3],
                                                    abs=1e-4)
    assert metadata["d2llm_student"]["fingerprint"] == embed.fingerprint
    with pytest.raises(UnsupportedVectorStoreError, match="only an async client"):
        retriever.retrieve(QUERY)


def test_constructor_checks(embed, indexed):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    index, store = indexed
    by_store = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=8, top_n=2)
    assert by_store.retrieve(QUERY)[0].node.node_id == D2LLMRetriever(
        index=index, similarity_top_k=8, top_n=2).retrieve(QUERY)[0].node.node_id
    with pytest.raises(ValueError, match="top_n=20 exceeds similarity_top_k=10"):
        D2LLMRetriever(index=index, similarity_top_k=10, top_n=20)
    with pytest.raises(ValueError, match="task must be"):
        D2LLMRetriever(index=index, task="nli")
    with pytest.raises(ValueError, match="needs index="):
        D2LLMRetriever(embed_model=embed)
    mock_index = VectorStoreIndex.from_documents(documents(), embed_model=MockEmbedding(
        embed_dim=embed.dimension))
    with pytest.raises(TypeError, match="MockEmbedding"):
        D2LLMRetriever(vector_store=store, embed_model=mock_index._embed_model)
    with pytest.raises(UnsupportedVectorStoreError, match="SimpleVectorStore"):
        D2LLMRetriever(index=mock_index, embed_model=embed)


def test_another_student_is_refused_naming_both(embed, indexed, tiny_backbone):
    other = D2LLMEmbedding.from_student(other_student(tiny_backbone, seed=2))
    with pytest.raises(StudentMismatchError) as error:
        D2LLMRetriever(index=indexed[0], embed_model=other).retrieve(QUERY)
    message = str(error.value)
    assert embed.fingerprint in message and other.fingerprint in message


def test_another_dimension_is_refused_at_once(embed):
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection("docs", vectors_config=models.VectorParams(
        size=8, distance=models.Distance.COSINE))
    client.upsert("docs", [models.PointStruct(id=1, vector=[1.0] * 8, payload={"text": "x"})])
    retriever = D2LLMRetriever(vector_store=qdrant_store(client), embed_model=embed)
    with pytest.raises(StudentMismatchError, match=f"8-d vectors.*{embed.dimension}-d vectors"):
        retriever.retrieve(QUERY)


def test_a_non_normalising_student_is_refused_on_a_cosine_collection(tiny_backbone, indexed):
    raw = D2LLMStudent.from_backbone(tiny_backbone, pma_heads=4, iem_hidden_size=16,
                                     dtype="float32", seed=0, normalize=False)
    with pytest.raises(StudentMismatchError, match="normalize=False"):
        check_student(indexed[1], raw)


def test_missing_and_empty_collections(embed):
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    retriever = D2LLMRetriever(vector_store=qdrant_store(client), embed_model=embed)
    with pytest.raises(MissingVectorError, match="no collection 'docs'.*ingest"):
        retriever.retrieve(QUERY)
    client.create_collection("docs", vectors_config=models.VectorParams(
        size=embed.dimension, distance=models.Distance.COSINE))
    store = qdrant_store(client)
    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, top_n=3)
    assert retriever.retrieve(QUERY) == []
    build_index(embed, store)  # documents arrive later: the same retriever checks them then
    assert len(retriever.retrieve(QUERY)) == 3
    assert describe_collection(store).record["fingerprint"] == embed.fingerprint


def test_record_is_durable_in_an_on_disk_collection(embed, tmp_path, monkeypatch):
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    index, store = build_index(embed, qdrant_store(client))
    first = D2LLMRetriever(index=index, similarity_top_k=8, top_n=3).retrieve(QUERY)  # records
    client.close()
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        reopened = qdrant_store(client)
        assert describe_collection(reopened).record["fingerprint"] == embed.fingerprint
        counts = count_encodes(monkeypatch, embed.student)
        again = D2LLMRetriever(vector_store=reopened, embed_model=embed, similarity_top_k=8,
                               top_n=3).retrieve(QUERY)
        assert counts == {"query": 1}  # the record is trusted: no sample re-encoded
        assert [h.node.node_id for h in again] == [h.node.node_id for h in first]
        torch.testing.assert_close(torch.tensor([h.score for h in again]),
                                   torch.tensor([h.score for h in first]))
    finally:
        client.close()


def test_the_embedded_search_runs_with_one_blas_thread(embed, indexed, monkeypatch):
    """numpy's spinning BLAS threads would take a core from the next query's encoding."""
    from threadpoolctl import threadpool_limits

    store = indexed[1]
    seen: list[set[int]] = []
    query_points = store.client.query_points

    def recording(*args, **kwargs):
        seen.append(blas_threads())
        return query_points(*args, **kwargs)

    monkeypatch.setattr(store.client, "query_points", recording)
    with threadpool_limits(limits=2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("no BLAS library that threadpoolctl can set")
        hits = D2LLMRetriever(index=indexed[0], similarity_top_k=3, top_n=3).retrieve(QUERY)
        assert blas_threads() == {2}
    assert hits and seen and all(threads == {1} for threads in seen)
