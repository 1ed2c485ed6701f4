"""Opening the Qdrant store: embedded on disk by default, or a server by URL.

The two usual failures (a folder locked by another process, a server that does not answer)
become one-line messages that say what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from examples.chatbot.errors import ChatbotError

if TYPE_CHECKING:  # pragma: no cover
    from qdrant_client import QdrantClient

    from llama_index_d2llm.edge import EdgeClient

DEFAULT_COLLECTION = "documents"


@dataclass(frozen=True)
class StoreLocation:
    """Where the collection lives: an embedded folder (default) or a server URL."""

    path: Path | None = None
    url: str | None = None
    collection: str = DEFAULT_COLLECTION
    api_key: str | None = None

    def describe(self) -> str:
        where = self.url if self.url else str(self.path)
        return f"collection {self.collection!r} in Qdrant at {where}"

    def manifest_path(self, state_dir: Path) -> Path:
        """Manifests live beside the embedded store, or under the state dir for a server."""
        if self.url:
            server = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.url).strip("_")
            return Path(state_dir) / "manifests" / f"{server}__{self.collection}.json"
        return Path(self.path).parent / "manifests" / f"{self.collection}.json"


def open_store(location: StoreLocation, timeout: float = 10.0) -> QdrantClient | EdgeClient:
    """A connected client (a server's, or the embedded store's: Qdrant Edge in the folder),
    or a ``ChatbotError`` that says what to do."""
    from qdrant_client import QdrantClient

    if location.url:
        client = QdrantClient(url=location.url, api_key=location.api_key, timeout=int(timeout))
        try:
            client.get_collections()
        except Exception as exc:  # connection refused, DNS, TLS, auth: all say "not reachable"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ChatbotError(
                f"no Qdrant server answers at {location.url} ({reason}): start it (for example "
                "`docker run -p 6333:6333 qdrant/qdrant`), check the URL and --qdrant-api-key, "
                "or leave out --qdrant-url to use the embedded store on disk"
            ) from None
        return client
    from llama_index_d2llm.edge import EdgeClient
    from llama_index_d2llm.folder_lock import StoreInUseError

    path = Path(location.path).expanduser()
    try:
        return EdgeClient.open(path)
    except StoreInUseError as exc:
        raise ChatbotError(f"{exc}; or run a Qdrant server and pass --qdrant-url") from None
    except OSError as exc:
        raise ChatbotError(f"cannot open the Qdrant folder {path}: {exc.strerror or exc}; pass a "
                           "writable --qdrant-path") from None
