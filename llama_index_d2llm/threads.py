"""One BLAS thread for calls into Qdrant's embedded (local) mode.

Why: local mode searches with numpy in our process. On a small CPU, numpy's OpenBLAS threads
keep spinning for a while after each call and take cores from the next query's encoding: on
2 cores the MiniLM student's query encoding went from 10 to 25 ms and a dense ``retrieve``
from 23 to 46 ms (``benchmarks/retriever_latency.py``, with and without
``OPENBLAS_NUM_THREADS=1``). A local collection is small by design (every vector in memory,
searched in full), so one thread costs its search little.

The limit holds only for the duration of the call and is then restored (threadpoolctl), and it
touches BLAS libraries only: torch's own thread pool is left as the user set it. Calls to a
Qdrant server are not affected.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

_LOCAL_CLIENTS = frozenset({"QdrantLocal", "AsyncQdrantLocal"})
_controller: Any = None
_modules_when_built = -1
_controller_lock = threading.Lock()


def is_local_client(client: Any) -> bool:
    """True for a ``QdrantClient``/``AsyncQdrantClient`` in embedded mode (path or ':memory:')."""
    return type(getattr(client, "_client", None)).__name__ in _LOCAL_CLIENTS


def _blas_controller() -> Any:
    """A threadpoolctl controller of the libraries loaded now. Finding them takes a few ms, so
    it is rebuilt only after new modules were imported: a BLAS library arrives with one (scipy
    brings its own OpenBLAS beside numpy's), and a serving process soon imports nothing new."""
    global _controller, _modules_when_built
    with _controller_lock:
        if _controller is None or len(sys.modules) != _modules_when_built:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
            _modules_when_built = len(sys.modules)
        return _controller


@contextlib.contextmanager
def single_blas_thread(client: Any) -> Iterator[None]:
    """Run the block with one BLAS thread when ``client`` is embedded, unchanged otherwise."""
    if not is_local_client(client):
        yield
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield
