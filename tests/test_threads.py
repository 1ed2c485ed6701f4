"""Calls into an embedded Qdrant run with one BLAS thread; server calls and the caller's own
thread settings are left alone."""

from __future__ import annotations

import asyncio

import numpy  # noqa: F401  (loads the BLAS that the limit acts on)
import pytest
from qdrant_client import AsyncQdrantClient, QdrantClient
from threadpoolctl import threadpool_limits

from llama_index_d2llm.flows import ClientCall
from llama_index_d2llm.threads import is_local_client
from tests.plugin_helpers import blas_threads


@pytest.fixture
def two_blas_threads():
    if not blas_threads():
        pytest.skip("no BLAS library that threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        yield


def test_only_embedded_clients_count_as_local():
    assert is_local_client(QdrantClient(location=":memory:"))
    assert is_local_client(AsyncQdrantClient(location=":memory:"))
    assert not is_local_client(QdrantClient(url="http://localhost:6333", check_compatibility=False))
    assert not is_local_client(object())


def test_a_local_call_sees_one_blas_thread_and_the_setting_comes_back(two_blas_threads):
    client = QdrantClient(location=":memory:")
    client.count_blas_threads = blas_threads  # an attribute the call will look up
    assert ClientCall("count_blas_threads").call(client) == {1}
    assert blas_threads() == {2}


def test_an_async_local_call_sees_one_blas_thread(two_blas_threads):
    aclient = AsyncQdrantClient(location=":memory:")

    async def count() -> set[int]:
        return blas_threads()

    aclient.count_blas_threads = count
    assert asyncio.run(ClientCall("count_blas_threads").acall(aclient)) == {1}
    assert blas_threads() == {2}


def test_a_server_call_keeps_the_callers_threads(two_blas_threads):
    # no request is made: the client connects lazily
    client = QdrantClient(url="http://localhost:6333", check_compatibility=False)
    client.count_blas_threads = blas_threads
    assert ClientCall("count_blas_threads").call(client) == {2}


def test_a_failing_local_call_restores_the_threads(two_blas_threads):
    client = QdrantClient(location=":memory:")

    def fail() -> None:
        raise RuntimeError("boom")

    client.fail = fail
    with pytest.raises(RuntimeError, match="boom"):
        ClientCall("fail").call(client)
    assert blas_threads() == {2}
