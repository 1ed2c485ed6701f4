"""flows.py: one Qdrant operation, run alike by the sync and the async client (no models)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from llama_index.vector_stores.qdrant import QdrantVectorStore
from qdrant_client import AsyncQdrantClient, QdrantClient

from llama_index_d2llm.collection import UnsupportedVectorStoreError
from llama_index_d2llm.flows import ClientCall, LocalWork, arun, run


def _flow(seen: list[str]):
    """Asks whether the collection exists, fails a call and recovers, does local work."""
    exists = yield ClientCall("collection_exists", ("docs",))
    try:
        yield ClientCall("get_collection", ("docs",))  # missing: the client raises
    except Exception as exc:
        seen.append(type(exc).__name__)
    thread = yield LocalWork(lambda: threading.current_thread().name)
    return exists, thread


def test_sync_and_async_clients_run_the_same_flow():
    sync_seen: list[str] = []
    store = QdrantVectorStore(collection_name="docs", client=QdrantClient(":memory:"))
    exists, thread = run(store, _flow(sync_seen))
    assert exists is False and thread == threading.current_thread().name

    async_seen: list[str] = []
    async_store = QdrantVectorStore(collection_name="docs", aclient=AsyncQdrantClient(":memory:"))
    exists, thread = asyncio.run(arun(async_store, _flow(async_seen)))
    assert exists is False and thread != threading.current_thread().name  # off the loop
    assert sync_seen == async_seen and len(sync_seen) == 1


def test_async_api_without_async_client_runs_the_flow_on_the_sync_one():
    store = QdrantVectorStore(collection_name="docs", client=QdrantClient(":memory:"))
    exists, _ = asyncio.run(arun(store, _flow([])))
    assert exists is False


def test_sync_api_on_an_async_only_store_says_what_to_do():
    store = QdrantVectorStore(collection_name="docs", aclient=AsyncQdrantClient(":memory:"))
    with pytest.raises(UnsupportedVectorStoreError, match="only an async client"):
        run(store, _flow([]))
