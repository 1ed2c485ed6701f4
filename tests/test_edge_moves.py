"""Collections that move or are written again: local-mode folders migrated into Qdrant Edge,
a collection copied to a server (qdrant-client's local mode standing in for the server API),
and an ingestion run three times (issue 22 items 2 and 7)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMVectorStore
from llama_index_d2llm.edge import EdgeClient
from tests.plugin_helpers import QUERY, TEXTS, build_index


@pytest.fixture(scope="module")
def embed(tiny_student_dir):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32")


def _ranked(store, embed):
    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=8,
                               top_n=5)
    return [(n.node.get_content(), round(n.score, 4)) for n in retriever.retrieve(QUERY)]


def _local_mode_folder(embed, folder: Path) -> list:
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(folder))
    store = D2LLMVectorStore("docs", embed, client=client)
    build_index(embed, store)
    ranked = _ranked(store, embed)
    client.close()
    return ranked


def test_a_local_mode_folder_is_migrated_once_and_left_as_it_was(embed, tmp_path, caplog):
    folder = tmp_path / "q"
    expected = _local_mode_folder(embed, folder)
    old = {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    with caplog.at_level(logging.WARNING), D2LLMVectorStore("docs", embed, path=folder) as store:
        assert _ranked(store, embed) == expected
    assert "written by qdrant-client's local mode" in caplog.text
    assert f"copied {len(TEXTS)} points of collection 'docs'" in caplog.text
    assert all(p.stat().st_size == size for p, size in old.items() if p.name != ".lock")
    caplog.clear()
    with caplog.at_level(logging.WARNING), D2LLMVectorStore("docs", embed, path=folder):
        pass
    assert "local mode" not in caplog.text  # copied once


def test_an_interrupted_migration_is_done_again(embed, tmp_path, monkeypatch):
    from qdrant_client import models

    from llama_index_d2llm import edge_migrate

    folder = tmp_path / "q"
    expected = _local_mode_folder(embed, folder)
    real_copy = edge_migrate.copy_collection

    def interrupted(source, name, target, *args, started=None, **kwargs):
        target.create_collection(name, vectors_config=models.VectorParams(
            size=4, distance=models.Distance.DOT))
        started(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(edge_migrate, "copy_collection", interrupted)
    with pytest.raises(KeyboardInterrupt):
        EdgeClient.open(folder)
    monkeypatch.setattr(edge_migrate, "copy_collection", real_copy)
    with D2LLMVectorStore("docs", embed, path=folder) as store:
        assert _ranked(store, embed) == expected


def test_copy_collection_to_a_server_keeps_vectors_sparse_and_student(embed, tmp_path,
                                                                      monkeypatch, capsys):
    """Run against qdrant-client's local mode as the server: the same client calls."""
    from qdrant_client import QdrantClient

    from llama_index_d2llm.trainer import cli, store_cli

    with D2LLMVectorStore("docs", embed, path=tmp_path / "q") as store:
        build_index(embed, store)
        expected = _ranked(store, embed)
    server = QdrantClient(path=str(tmp_path / "server"))
    monkeypatch.setattr(store_cli, "target_client", lambda url, key: _Unclosed(server))
    args = ["copy-collection", "--qdrant-path", str(tmp_path / "q"), "--collection", "docs",
            "--url", "http://server:6333"]
    assert cli.main(args) == 0
    assert f"copied {len(TEXTS)} points" in capsys.readouterr().out
    on_server = D2LLMVectorStore("docs", embed, client=server)
    assert on_server.enable_hybrid  # the BM25 vectors came along
    assert _ranked(on_server, embed) == expected
    assert server.get_collection("docs").config.metadata["d2llm_student"]["fingerprint"] == (
        embed.student.fingerprint)
    assert cli.main(args) == 2  # never into an existing collection
    assert "already has a collection 'docs'" in capsys.readouterr().err
    server.close()


class _Unclosed:
    """The test's server client, which the command's close() must not close."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def close(self):
        pass


SNIPPET = textwrap.dedent("""
    import sys
    from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
    from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMVectorStore

    docs = SimpleDirectoryReader(sys.argv[1]).load_data()
    embed = D2LLMEmbedding(model_name=sys.argv[2], dtype="float32")
    store = D2LLMVectorStore("docs", embed, path=sys.argv[3])
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embed)
    hits = D2LLMRetriever(index=index, similarity_top_k=10, top_n=3).retrieve("the cat")
    print(store.client.count("docs").count, len({h.node.get_content() for h in hits}))
""")


def test_the_readme_snippet_run_three_times_keeps_one_copy_and_exits_quietly(
        tiny_student_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(TEXTS[:7]):
        (docs / f"doc{i}.txt").write_text(text)
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPET)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run in range(3):
        if run == 2:  # an edited file: its old passage goes, the new one comes
            (docs / "doc0.txt").write_text("the cat sat on the red mat")
        done = subprocess.run([sys.executable, str(script), str(docs), tiny_student_dir,
                               str(tmp_path / "q")], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["7", "3"]  # 7 points, 3 different passages
        assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    with EdgeClient.open(tmp_path / "q") as client:
        texts = [r.payload["_node_content"] for r in client.scroll("docs", limit=20)[0]]
    assert sum("red mat" in t for t in texts) == 1
    assert not any("sat on the mat" in t for t in texts)
