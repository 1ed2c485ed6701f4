"""D2LLMEmbedding: the student's encoder as a LlamaIndex embedding model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from llama_index_d2llm import CheckpointError, D2LLMEmbedding, D2LLMStudent
from tests.plugin_helpers import TEXTS, count_encodes, documents


@pytest.fixture(scope="module")
def embed(tiny_student_dir, device):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32", embed_batch_size=3,
                          device=str(device))


def test_query_and_text_embeddings_are_the_students(embed):
    student = embed.student
    query = embed.get_query_embedding("the cat")
    text = embed.get_text_embedding("the cat")
    assert len(query) == len(text) == student.dimension == embed.dimension
    assert all(type(x) is float for x in query + text)
    torch.testing.assert_close(torch.tensor(query), student.encode(["the cat"], kind="query")[0])
    torch.testing.assert_close(torch.tensor(text), student.encode(["the cat"], kind="passage")[0])
    assert not torch.allclose(torch.tensor(query), torch.tensor(text))


def test_batched_equals_single_and_really_batches(embed, monkeypatch):
    singles = [embed.get_text_embedding(t) for t in TEXTS]
    calls = []
    original = embed.student.encode
    monkeypatch.setattr(embed.student, "encode",
                        lambda texts, *a, **k: calls.append(len(texts)) or original(texts, *a, **k))
    batched = embed.get_text_embedding_batch(TEXTS)
    assert calls == [3, 3, 2]  # embed_batch_size=3: one forward pass per batch, not per text
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(singles), atol=1e-5, rtol=1e-5)


def test_async_paths_equal_sync(embed):
    async def run():
        return (await embed.aget_query_embedding("the cat"),
                await embed.aget_text_embedding("the cat"),
                await embed.aget_text_embedding_batch(TEXTS))

    query, text, batch = asyncio.run(run())
    sync_query = embed.get_query_embedding("the cat")
    torch.testing.assert_close(torch.tensor(query), torch.tensor(sync_query))
    torch.testing.assert_close(torch.tensor(text),
                               torch.tensor(embed.get_text_embedding("the cat")))
    torch.testing.assert_close(torch.tensor(batch),
                               torch.tensor(embed.get_text_embedding_batch(TEXTS)),
                               atol=1e-5, rtol=1e-5)


def test_async_encoding_does_not_block_the_event_loop(embed, monkeypatch):
    original = embed.student.encode

    def slow(*args, **kwargs):
        time.sleep(0.3)  # a long forward pass
        return original(*args, **kwargs)

    monkeypatch.setattr(embed.student, "encode", slow)

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await embed.aget_query_embedding("the cat")
        task.cancel()
        return ticks

    assert asyncio.run(run()) >= 5  # the loop kept running while the model worked


def test_without_model_name_it_refuses_with_how_to_get_a_student():
    with pytest.raises(CheckpointError, match=r"d2llm-rag distill --corpus DOCS --output DIR"):
        D2LLMEmbedding()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no student directory"):
        D2LLMEmbedding(model_name=str(tmp_path / "nothing-here"))


def test_from_student_reuses_the_loaded_model(tiny_student_dir):
    student = D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32")
    embed = D2LLMEmbedding.from_student(student, embed_batch_size=4)
    assert embed.student is student
    assert embed.fingerprint == student.fingerprint
    assert embed.model_name == student.name and student.fingerprint in embed.model_name
    assert embed.device == str(student.device) and embed.embed_batch_size == 4


def test_serialises_and_reloads_the_same_student(embed):
    data = embed.to_dict()
    assert data["class_name"] == "D2LLMEmbedding" and data["trust_remote_code"] is False
    again = D2LLMEmbedding.from_dict(data)
    assert again.fingerprint == embed.fingerprint and again.device == embed.device


def test_ingestion_pipeline_embeds_nodes_with_the_passage_side(embed):
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode

    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=512), embed])
    nodes = pipeline.run(documents=documents())
    assert len(nodes) == len(TEXTS)
    expected = embed.student.encode([n.get_content(metadata_mode=MetadataMode.EMBED)
                                     for n in nodes])
    torch.testing.assert_close(torch.tensor([n.embedding for n in nodes]), expected,
                               atol=1e-5, rtol=1e-5)


def test_works_as_settings_embed_model(embed, monkeypatch):
    from llama_index.core import Settings, VectorStoreIndex

    previous = Settings._embed_model
    try:
        Settings.embed_model = embed
        assert Settings.embed_model is embed
        counts = count_encodes(monkeypatch, embed.student)
        index = VectorStoreIndex.from_documents(documents())  # no embed_model given
        assert counts["passage"] == len(TEXTS)
        hits = index.as_retriever(similarity_top_k=2).retrieve("the cat")
        assert counts["query"] == 1 and len(hits) == 2
    finally:
        Settings._embed_model = previous
