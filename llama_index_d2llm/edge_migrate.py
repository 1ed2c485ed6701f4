"""Moving collections: out of qdrant-client's local mode, and onto a Qdrant server.

Why both are one copy: a collection is its layout (dense and sparse vectors, the student
record) and its points; the copy reads them with qdrant-client's calls (``get_collection``,
``scroll``) and writes them with them (``create_collection``, ``upsert``,
``update_collection``), which a local-mode client, an ``EdgeClient`` and a server all answer.

Local-mode folders (``meta.json`` + ``collection/<name>/storage.sqlite``, written by
``QdrantClient(path=...)`` before the embedded store moved to Qdrant Edge) are copied into the
Edge layout of the same folder the first time it is opened, with a message; the old files are
left as they were, never overwritten or deleted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm.edge import EdgeClient

logger = logging.getLogger(__name__)

PAGE = 256
#: The Edge note saying how far copying a local-mode collection got ("started", "done").
MIGRATION_NOTE = "from_local_mode"


def local_mode_collections(folder: str | os.PathLike[str]) -> list[str]:
    """Collections that qdrant-client's local mode wrote in ``folder`` ([] when none)."""
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        return []
    try:
        names = json.loads(meta.read_text(encoding="utf-8")).get("collections", {})
    except (OSError, ValueError):
        return []
    return sorted(n for n in names if (Path(folder) / "collection" / n).is_dir())


def _sparse(value: Any) -> Any:
    from qdrant_client import models

    if hasattr(value, "indices") and hasattr(value, "values"):
        return models.SparseVector(indices=list(value.indices), values=list(value.values))
    return list(value)


def _point(record: Any) -> Any:
    from qdrant_client import models

    vector = record.vector
    vector = ({n: _sparse(v) for n, v in vector.items()} if isinstance(vector, dict)
              else list(vector or []))
    return models.PointStruct(id=record.id, vector=vector, payload=record.payload or {})


def copy_collection(source: Any, name: str, target: Any, target_name: str | None = None,
                    progress: Callable[[int], None] | None = None,
                    started: Callable[[str], Any] | None = None) -> int:
    """Copy collection ``name`` of ``source`` into ``target`` (a new collection there, named
    ``target_name`` or the same); the number of points copied. An existing target collection
    is refused: nothing is ever merged into or written over."""
    from qdrant_client import models

    from llama_index_d2llm.student.errors import D2LLMError

    target_name = target_name or name
    if not source.collection_exists(name):
        raise D2LLMError(f"there is no collection {name!r} to copy")
    if target.collection_exists(target_name):
        raise D2LLMError(
            f"the target already has a collection {target_name!r}: copy into a new name "
            "(--target-collection) or delete that collection first; nothing was written")
    info = source.get_collection(name)
    params = info.config.params
    vectors = params.vectors
    sparse = params.sparse_vectors or None
    if isinstance(vectors, dict):
        vectors = {n: models.VectorParams(size=v.size, distance=v.distance)
                   for n, v in vectors.items()}
    if sparse:
        sparse = {n: models.SparseVectorParams(modifier=v.modifier) for n, v in sparse.items()}
    target.create_collection(target_name, vectors_config=vectors, sparse_vectors_config=sparse)
    if started is not None:
        started(target_name)
    copied, offset = 0, None
    while True:
        records, offset = source.scroll(name, limit=PAGE, offset=offset, with_payload=True,
                                        with_vectors=True)
        if records:
            target.upsert(target_name, points=[_point(r) for r in records], wait=True)
            copied += len(records)
            if progress is not None:
                progress(copied)
        if offset is None or not records:
            break
    metadata = getattr(info.config, "metadata", None)
    if metadata:
        target.update_collection(target_name, metadata=dict(metadata))
    return copied


def migrate_local_mode(client: EdgeClient) -> list[str]:
    """Copy the folder's local-mode collections that Edge does not have yet; their names."""
    names = [n for n in local_mode_collections(client.path) if not client.collection_exists(n)
             or client.note(n, MIGRATION_NOTE) == "started"]
    if not names:
        return []
    from qdrant_client import QdrantClient

    logger.warning("the Qdrant folder %s holds collection(s) %s written by qdrant-client's "
                   "local mode; copying them into the embedded store (Qdrant Edge) once. The "
                   "old files (meta.json, collection/) are left as they were: delete them when "
                   "you no longer need them.", client.path, ", ".join(names))
    local = QdrantClient(path=str(client.path))
    try:
        for name in names:
            client.delete_collection(name)  # a copy an earlier run did not finish
            count = copy_collection(local, name, client,
                                    started=lambda n: client.note(n, MIGRATION_NOTE, "started"))
            client.note(name, MIGRATION_NOTE, "done")
            client.optimize(name)
            logger.warning("copied %d points of collection %r", count, name)
    finally:
        local.close()
    return names
