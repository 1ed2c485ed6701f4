"""The embedded store on Qdrant Edge (``D2LLMVectorStore(..., path=folder)``): the same
answers as qdrant-client, the LlamaIndex vector-store contract, and its safety."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMVectorStore
from llama_index_d2llm.folder_lock import StoreInUseError
from tests.plugin_helpers import QUERY, TEXTS, build_index, hybrid_store


@pytest.fixture(scope="module")
def embed(tiny_student_dir):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32")


def _ranked(retriever, query=QUERY):
    return [(n.node.get_content(), round(n.score, 4)) for n in retriever.retrieve(query)]


def test_edge_and_qdrant_client_rank_alike_dense_and_hybrid(embed, tmp_path):
    with D2LLMVectorStore("docs", embed, path=tmp_path / "q") as edge_store:
        edge_index, _ = build_index(embed, edge_store)
        local_index, _ = build_index(embed, hybrid_store(embed))
        for hybrid in (False, True):
            edge = _ranked(D2LLMRetriever(index=edge_index, similarity_top_k=8, top_n=8,
                                          hybrid=hybrid))
            local = _ranked(D2LLMRetriever(index=local_index, similarity_top_k=8, top_n=8,
                                           hybrid=hybrid))
            assert [t for t, _ in edge] == [t for t, _ in local]
            assert [s for _, s in edge] == pytest.approx([s for _, s in local], abs=1e-3)


def test_filters_delete_get_and_clear(embed, tmp_path):
    with D2LLMVectorStore("docs", embed, path=tmp_path / "q") as store:
        index, _ = build_index(embed, store)
        science = MetadataFilters(filters=[MetadataFilter(key="topic", value="science")])
        hits = D2LLMRetriever(index=index, similarity_top_k=8, top_n=3,
                              filters=science).retrieve(QUERY)
        assert hits and all(h.node.metadata["topic"] == "science" for h in hits)
        not_science = MetadataFilters(filters=[MetadataFilter(
            key="topic", value="science", operator=FilterOperator.NE)])
        assert {n.metadata["topic"] for n in store.get_nodes(filters=not_science)} == {
            "animals", "culture"}
        nodes = store.get_nodes()
        assert len(nodes) == len(TEXTS)
        store.delete(nodes[0].ref_doc_id)
        store.delete_nodes([nodes[1].node_id])
        assert {n.node_id for n in store.get_nodes()} == {n.node_id for n in nodes[2:]}
        store.clear()
        assert not store.client.collection_exists("docs")


def test_async_ingestion_and_retrieval_equal_sync(embed, tmp_path):
    async def run():
        store = D2LLMVectorStore("docs", embed, path=tmp_path / "a")
        docs = [Document(text=t) for t in TEXTS]
        index = await asyncio.to_thread(
            VectorStoreIndex, [], storage_context=StorageContext.from_defaults(
                vector_store=store), embed_model=embed, use_async=True)
        for _ in range(2):  # inserted again: overwritten, not duplicated
            for doc in docs:
                await index.ainsert(doc)
        assert store.client.count("docs").count == len(TEXTS)
        retriever = D2LLMRetriever(index=index, similarity_top_k=8, top_n=8)
        found = await retriever.aretrieve(QUERY)
        store.close()
        return [n.node.get_content() for n in found], retriever

    texts, _ = asyncio.run(run())
    assert sorted(texts) == sorted(TEXTS)


def test_a_closed_store_reopens_with_its_points_and_student(embed, tmp_path):
    with D2LLMVectorStore("docs", embed, path=tmp_path / "q") as store:
        index, _ = build_index(embed, store)
        before = _ranked(D2LLMRetriever(index=index, similarity_top_k=8, top_n=5))
    with D2LLMVectorStore("docs", embed, path=tmp_path / "q") as again:
        assert again.optimize() in (True, False)
        after = _ranked(D2LLMRetriever(vector_store=again, embed_model=embed,
                                       similarity_top_k=8, top_n=5))
        info = again.client.get_collection("docs")
    assert after == before
    assert info.config.metadata["d2llm_student"]["fingerprint"] == embed.student.fingerprint


def test_two_stores_in_one_process_share_the_folder(embed, tmp_path):
    first = D2LLMVectorStore("a", embed, path=tmp_path / "q")
    second = D2LLMVectorStore("b", embed, path=tmp_path / "q")
    assert first.client is second.client
    first.close()
    assert not second.client.closed  # still held by the second store
    second.close()
    assert second.client.closed


HOLD = textwrap.dedent("""
    import sys, time
    from llama_index_d2llm.edge import EdgeClient
    client = EdgeClient.open(sys.argv[1])
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_process_is_told_which_process_holds_the_folder(embed, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "q")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreInUseError, match=f"in use by process {holder.pid} ") as error:
            D2LLMVectorStore("docs", embed, path=tmp_path / "q")
        assert "one process at a time" in str(error.value)
    finally:
        holder.kill()
        holder.wait()
    with D2LLMVectorStore("docs", embed, path=tmp_path / "q"):  # the lock went with it
        pass


def test_path_and_client_together_are_refused(embed, tmp_path):
    from qdrant_client import QdrantClient

    with pytest.raises(ValueError, match="not both"):
        D2LLMVectorStore("docs", embed, path=tmp_path, client=QdrantClient(":memory:"))
    with pytest.raises(ValueError, match="path='folder'"):
        D2LLMVectorStore("docs", embed)


def test_eval_on_a_held_folder_says_which_process_holds_it(tiny_student_dir, tmp_path, capsys):
    """Issue 22 item 5: one line naming the holder, no chained tracebacks."""
    from llama_index_d2llm.trainer import cli
    from tests.distill_fixtures import write_beir

    beir = write_beir(tmp_path / "beir")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "q")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli.main(["eval", tiny_student_dir, "--data", str(beir), "--split", "train",
                         "--first-stage", "qdrant", "--qdrant-path", str(tmp_path / "q"),
                         "--dtype", "float32", "--no-progress"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2
    assert f"is in use by process {holder.pid} " in err and "Traceback" not in err


WRITE_AND_DIE = textwrap.dedent("""
    import os, sys
    from qdrant_client import models
    from llama_index_d2llm.edge import EdgeClient
    client = EdgeClient.open(sys.argv[1])
    client.create_collection("c", vectors_config={"d": models.VectorParams(
        size=2, distance=models.Distance.DOT)})
    client.upsert("c", [models.PointStruct(id=i, vector={"d": [1.0, float(i)]},
                                           payload={"doc_id": str(i)}) for i in range(300)])
    print("acknowledged", flush=True)
    os._exit(1)  # killed: no flush, no close
""")


def test_acknowledged_writes_survive_a_killed_process(tmp_path):
    from llama_index_d2llm.edge import EdgeClient

    done = subprocess.run([sys.executable, "-c", WRITE_AND_DIE, str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "acknowledged"
    with EdgeClient.open(tmp_path / "q") as client:  # replayed from the write-ahead log
        assert client.count("c").count == 300
        assert client.retrieve("c", [299], with_vectors=True)[0].vector["d"] == [1.0, 299.0]
