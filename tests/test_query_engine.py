"""End to end: the D2LLM classes inside LlamaIndex query engines, with MockLLM."""

from __future__ import annotations

import asyncio

import pytest

from llama_index_d2llm import D2LLMEmbedding, D2LLMRerank, D2LLMRetriever
from llama_index_d2llm.qdrant import describe_collection, record_student
from tests.plugin_helpers import QUERY, build_index, count_encodes, direct_scores, qdrant_store


@pytest.fixture(scope="module")
def embed(tiny_student_dir):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32")


@pytest.fixture()
def on_disk(embed, tmp_path):
    """The README's set-up: a local on-disk Qdrant, indexed with the student, recorded."""
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    index, store = build_index(embed, qdrant_store(client))
    record_student(store, embed)
    yield index, store
    client.close()


def best(embed, n):
    expected = direct_scores(embed.student, QUERY)
    return sorted(expected, key=expected.get, reverse=True)[:n], expected


def test_retriever_query_engine(embed, on_disk):
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    retriever = D2LLMRetriever(index=on_disk[0], similarity_top_k=8, top_n=3)
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())
    response = engine.query(QUERY)
    assert isinstance(response.response, str) and response.response
    texts, expected = best(embed, 3)
    assert [n.node.get_content() for n in response.source_nodes] == texts
    for node in response.source_nodes:
        assert node.score == pytest.approx(expected[node.node.get_content()], abs=1e-4)
    again = asyncio.run(engine.aquery(QUERY))
    assert [n.node.node_id for n in again.source_nodes] == [
        n.node.node_id for n in response.source_nodes]


def test_rerank_in_an_existing_query_engine(embed, on_disk, monkeypatch):
    from llama_index.core.llms import MockLLM

    index, store = on_disk
    engine = index.as_query_engine(
        similarity_top_k=8, llm=MockLLM(),
        node_postprocessors=[D2LLMRerank(top_n=2, vector_store=store, embed_model=embed)])
    counts = count_encodes(monkeypatch, embed.student)
    response = engine.query(QUERY)
    assert counts == {"query": 1}  # the retriever's query vector is reused, passages are not
    texts, expected = best(embed, 2)
    assert [n.node.get_content() for n in response.source_nodes] == texts
    assert [n.score for n in response.source_nodes] == pytest.approx(
        [expected[t] for t in texts], abs=1e-4)


def test_the_readme_flow_with_settings_and_an_unrecorded_collection(embed):
    from llama_index.core import Settings
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    previous_embed, previous_llm = Settings._embed_model, Settings._llm
    try:
        Settings.embed_model, Settings.llm = embed, MockLLM()
        index, store = build_index(embed)
        engine = RetrieverQueryEngine.from_args(D2LLMRetriever(index=index, top_n=4))
        response = engine.query(QUERY)
        assert len(response.source_nodes) == 4
        assert describe_collection(store).record["fingerprint"] == embed.fingerprint
    finally:
        Settings._embed_model, Settings._llm = previous_embed, previous_llm
