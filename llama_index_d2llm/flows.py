"""Each Qdrant operation written once for the sync and the async API.

An operation is a *flow*: a generator that yields the client calls it needs
(:class:`ClientCall`, or :class:`LocalWork` for CPU work such as re-encoding) and gets their
answers back. :func:`run` answers them with the store's ``QdrantClient``; :func:`arun` with
its ``AsyncQdrantClient``, or, when the store has none, runs the whole flow on the sync client
in a worker thread. A call into an embedded Qdrant runs with one BLAS thread (``threads.py``).
A call that fails raises inside the flow, where ``try`` can catch it. So
the check "which student built this collection" and every read exist once, and the sync and
async APIs cannot drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from llama_index_d2llm.threads import single_blas_thread

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.vector_stores.qdrant import QdrantVectorStore

T = TypeVar("T")


@dataclass(frozen=True)
class ClientCall:
    """One call a flow asks for: ``client.<method>(*args, **kwargs)``, awaited when async."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, client: Any) -> Any:
        with single_blas_thread(client):
            return getattr(client, self.method)(*self.args, **self.kwargs)

    async def acall(self, aclient: Any) -> Any:
        with single_blas_thread(aclient):
            return await getattr(aclient, self.method)(*self.args, **self.kwargs)


@dataclass(frozen=True)
class LocalWork:
    """CPU work inside a flow (re-encoding with the student): off the event loop when async."""

    function: Callable[..., Any]
    args: tuple[Any, ...] = ()

    def call(self, client: Any) -> Any:
        return self.function(*self.args)

    async def acall(self, aclient: Any) -> Any:
        return await asyncio.to_thread(self.function, *self.args)


Step = ClientCall | LocalWork
Flow = Generator[Step, Any, T]


def _advance(flow: Flow[T], reply: Any, error: BaseException | None
             ) -> tuple[bool, Any]:
    """Hand the last call's answer (or its error) to ``flow``: ``(True, result)`` when the flow
    has finished, else ``(False, next_step)``."""
    try:
        return False, (flow.throw(error) if error is not None else flow.send(reply))
    except StopIteration as done:
        return True, done.value


def run(store: QdrantVectorStore, flow: Flow[T]) -> T:
    """Run ``flow`` against the store's sync client; a failing call raises inside the flow."""
    client = None
    answer: tuple[Any, BaseException | None] = (None, None)
    while True:
        done, step = _advance(flow, *answer)
        if done:
            return step
        if isinstance(step, ClientCall) and client is None:
            client = _sync_client(store)
        try:
            answer = (step.call(client), None)
        except Exception as exc:
            answer = (None, exc)


async def arun(store: QdrantVectorStore, flow: Flow[T]) -> T:
    """Run ``flow`` against the store's async client (the sync one in a thread without it)."""
    aclient = _async_client(store)
    if aclient is None:
        return await asyncio.to_thread(run, store, flow)
    answer: tuple[Any, BaseException | None] = (None, None)
    while True:
        done, step = _advance(flow, *answer)
        if done:
            return step
        try:
            answer = (await step.acall(aclient), None)
        except Exception as exc:
            answer = (None, exc)


def _sync_client(store: QdrantVectorStore) -> Any:
    from llama_index_d2llm.collection import UnsupportedVectorStoreError  # collection uses us

    client = store.client
    if client is None:
        raise UnsupportedVectorStoreError(
            f"the QdrantVectorStore of collection {store.collection_name!r} has only an async "
            "client: use the async API (aretrieve, aquery, apostprocess_nodes) or also pass "
            "client=QdrantClient(...) to QdrantVectorStore"
        )
    return client


def _async_client(store: QdrantVectorStore) -> Any | None:
    return getattr(store, "_aclient", None)
