"""The embedded store on Qdrant Edge: one folder, one ``EdgeShard`` per collection.

Why Edge: qdrant-client's local mode is a pure-Python stand-in that scores every point on
every query (hybrid ``retrieve`` took 8.6 s at 100,000 passages, reopening 35 s). Qdrant Edge
is Qdrant's own engine in-process: HNSW, a sparse inverted index with the IDF modifier, the
Query API (prefetch + RRF), payload filters and a write-ahead log.

Why a client with qdrant-client's method names: ``QdrantVectorStore`` and this package's
flows call ``client.query_points(...)``, ``scroll``, ``upload_points`` and so on; answering the
same calls keeps one code path for the embedded store and for a server. Requests are
translated by ``edge_models.py``; answers are Edge's own records, which carry the same
``id``/``score``/``vector``/``payload`` attributes.

Layout of a folder: ``edge/<collection>/`` (the shard), ``edge/<collection>.json`` (the
collection metadata Edge has no place for: the student record), ``d2llm.lock`` (held by the
process that has the folder open; it names that process to a second one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llama_index_d2llm import edge_models as convert
from llama_index_d2llm.folder_lock import FolderLock
from llama_index_d2llm.student.errors import D2LLMError

logger = logging.getLogger(__name__)

EDGE_DIR = "edge"
#: Payload fields a new collection indexes: the document id and the source (``upsert.py``).
INDEXED_FIELDS = ("doc_id", "d2llm_source")
#: Points per Edge update when writing many (one WAL record each).
WRITE_BATCH = 256

_open: dict[Path, EdgeClient] = {}
_open_lock = threading.Lock()


class EdgeStoreError(D2LLMError):
    """The embedded store cannot do what was asked (a missing collection, a bad name)."""


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise EdgeStoreError(f"collection name {name!r} cannot be a folder name: use letters, "
                             "digits, '-' and '_'")
    return name


class EdgeClient:
    """QdrantClient's calls used by ``QdrantVectorStore`` and this package, on Qdrant Edge.

    Open it with :meth:`open` (one client per folder and process, shared, counted) and
    :meth:`close` it when done; a second process on the folder gets an error naming this one.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser().resolve()
        self._lock = FolderLock(self.path)
        self._shards: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._users = 1
        self._guard = threading.RLock()
        self._finalizer = weakref.finalize(self, _close_shards, self._shards, self._lock)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EdgeClient:
        """The folder's client in this process (opened now, or shared with its other users)."""
        key = Path(path).expanduser().resolve()
        with _open_lock:
            client = _open.get(key)
            if client is not None and not client.closed:
                client._users += 1
                return client
            client = cls(key)
            _open[key] = client
        from llama_index_d2llm.edge_migrate import migrate_local_mode

        try:
            migrate_local_mode(client)
        except BaseException:
            client.close()  # frees the folder; an unfinished copy is done again next time
            raise
        return client

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Release this user's hold; the last one flushes the shards and frees the folder."""
        with _open_lock:
            self._users -= 1
            if self._users > 0:
                return
            if _open.get(self.path) is self:
                del _open[self.path]
        self._finalizer()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ collections
    def _dir(self, name: str) -> Path:
        return self.path / EDGE_DIR / _check_name(name)

    def _meta_file(self, name: str) -> Path:
        return self.path / EDGE_DIR / f"{_check_name(name)}.json"

    def _require_open(self) -> None:
        if self.closed:
            raise EdgeStoreError(f"the embedded Qdrant store at {self.path} was closed: open "
                                 "it again (D2LLMVectorStore(..., path=...))")

    def shard(self, name: str) -> Any:
        """The collection's ``EdgeShard`` (loaded on first use)."""
        import qdrant_edge as edge

        self._require_open()
        with self._guard:
            shard = self._shards.get(name)
            if shard is None:
                if not self.collection_exists(name):
                    raise EdgeStoreError(
                        f"the embedded Qdrant store at {self.path} has no collection {name!r}:"
                        " ingest documents into it first")
                shard = self._shards[name] = edge.EdgeShard.load(str(self._dir(name)))
            return shard

    def collection_exists(self, collection_name: str) -> bool:
        return (self._meta_file(collection_name).is_file()
                and (self._dir(collection_name) / "edge_config.json").is_file())

    def get_collections(self) -> Any:
        folder = self.path / EDGE_DIR
        names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        return SimpleNamespace(collections=[SimpleNamespace(name=n) for n in names
                                            if self.collection_exists(n)])

    def _read_meta(self, name: str) -> dict[str, Any]:
        if name not in self._meta:
            self._meta[name] = json.loads(self._meta_file(name).read_text(encoding="utf-8"))
        return self._meta[name]

    def _write_meta(self, name: str, meta: dict[str, Any]) -> None:
        target = self._meta_file(name)
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(partial, target)
        self._meta[name] = meta

    def create_collection(self, collection_name: str, vectors_config: Any = None,
                          sparse_vectors_config: Any = None, metadata: Any = None,
                          **ignored: Any) -> bool:
        """A new shard: named dense vectors, sparse vectors (IDF when asked), HNSW defaults."""
        import qdrant_edge as edge

        self._require_open()
        if self.collection_exists(collection_name):
            raise EdgeStoreError(f"collection {collection_name!r} already exists in {self.path}")
        dense = vectors_config if isinstance(vectors_config, dict) else {"": vectors_config}
        dense_meta = {n: {"size": int(p.size), "distance": str(_enum_value(p.distance))}
                      for n, p in dense.items() if p is not None}
        sparse_meta = {n: {"modifier": str(_enum_value(p.modifier)) if p and p.modifier
                           else None} for n, p in (sparse_vectors_config or {}).items()}
        config = edge.EdgeConfig(
            vectors={n: edge.EdgeVectorParams(size=v["size"],
                                              distance=convert.DISTANCES[v["distance"].title()])
                     for n, v in dense_meta.items()} or None,
            sparse_vectors={n: edge.EdgeSparseVectorParams(
                modifier=edge.Modifier.Idf if (v["modifier"] or "").lower() == "idf" else None)
                for n, v in sparse_meta.items()} or None)
        directory = self._dir(collection_name)
        shutil.rmtree(directory, ignore_errors=True)  # a creation interrupted before its meta
        directory.parent.mkdir(parents=True, exist_ok=True)
        with self._guard:
            shard = self._shards[collection_name] = edge.EdgeShard.create(str(directory), config)
            for field in INDEXED_FIELDS:  # delete by document, upsert by file, filters
                shard.update(edge.UpdateOperation.create_field_index(
                    field, edge.PayloadSchemaType.Keyword))
            self._write_meta(collection_name, {"vectors": dense_meta, "sparse": sparse_meta,
                                               "metadata": dict(metadata or {})})
        return True

    def delete_collection(self, collection_name: str, **ignored: Any) -> bool:
        self._require_open()
        with self._guard:
            shard = self._shards.pop(collection_name, None)
            if shard is not None:
                shard.close()
            existed = self.collection_exists(collection_name)
            self._meta_file(collection_name).unlink(missing_ok=True)
            self._meta.pop(collection_name, None)
            shutil.rmtree(self._dir(collection_name), ignore_errors=True)
        return existed

    def get_collection(self, collection_name: str) -> Any:
        """A ``CollectionInfo`` look-alike: ``config.params.vectors``/``sparse_vectors``,
        ``config.metadata`` and ``points_count``."""
        from qdrant_client import models

        meta = self._read_meta(collection_name)
        vectors = {n: models.VectorParams(size=v["size"], distance=v["distance"].title())
                   for n, v in meta["vectors"].items()}
        sparse = {n: models.SparseVectorParams(
            modifier=models.Modifier.IDF if (v.get("modifier") or "").lower() == "idf"
            else None) for n, v in meta["sparse"].items()}
        params = SimpleNamespace(vectors=vectors, sparse_vectors=sparse or None)
        count = self.shard(collection_name).info().points_count
        return SimpleNamespace(config=SimpleNamespace(params=params,
                                                      metadata=dict(meta["metadata"])),
                               points_count=count, vectors_count=count, status="green")

    def update_collection(self, collection_name: str, metadata: dict[str, Any] | None = None,
                          **ignored: Any) -> bool:
        if metadata:
            meta = dict(self._read_meta(collection_name))
            meta["metadata"] = {**meta["metadata"], **metadata}
            self._write_meta(collection_name, meta)
        return True

    def note(self, collection_name: str, key: str, value: Any = None) -> Any:
        """Read (``value=None``) or write a note of this store's own about a collection, kept
        beside the metadata but never copied with it (e.g. a migration's progress)."""
        meta = self._read_meta(collection_name)
        if value is None:
            return meta.get("notes", {}).get(key)
        self._write_meta(collection_name, {**meta, "notes": {**meta.get("notes", {}),
                                                             key: value}})
        return value

    def create_payload_index(self, collection_name: str, field_name: str, field_schema: Any,
                             **ignored: Any) -> None:
        import qdrant_edge as edge

        kind = str(_enum_value(field_schema)).title()
        schema = getattr(edge.PayloadSchemaType, kind, None)
        if schema is not None:
            self.shard(collection_name).update(
                edge.UpdateOperation.create_field_index(field_name, schema))

    # ------------------------------------------------------------------ writes
    def upsert(self, collection_name: str, points: Any, wait: bool = True,
               **ignored: Any) -> Any:
        """Write points (``PointStruct``s or a ``Batch``-less list), WAL-logged per batch."""
        import qdrant_edge as edge

        shard = self.shard(collection_name)
        batch: list[Any] = []
        for point in points:
            batch.append(point)
            if len(batch) >= WRITE_BATCH:
                shard.update(edge.UpdateOperation.upsert_points(convert.points(batch)))
                batch = []
        if batch:
            shard.update(edge.UpdateOperation.upsert_points(convert.points(batch)))
        return SimpleNamespace(status="completed")

    def upload_points(self, collection_name: str, points: Any, **ignored: Any) -> None:
        self.upsert(collection_name, points)

    def delete(self, collection_name: str, points_selector: Any, **ignored: Any) -> Any:
        import qdrant_edge as edge
        from qdrant_client import models

        shard = self.shard(collection_name)
        selector = points_selector
        if isinstance(selector, models.FilterSelector):
            selector = selector.filter
        if isinstance(selector, models.PointIdsList):
            selector = selector.points
        if isinstance(selector, models.Filter):
            shard.update(edge.UpdateOperation.delete_points_by_filter(
                convert.query_filter(selector)))
        else:
            shard.update(edge.UpdateOperation.delete_points(
                [convert.point_id(i) for i in selector]))
        return SimpleNamespace(status="completed")

    def optimize(self, collection_name: str) -> bool:
        """Build the collection's indexes (HNSW) now; True when anything changed."""
        return bool(self.shard(collection_name).optimize())

    def flush(self, collection_name: str) -> None:
        self.shard(collection_name).flush()

    # ------------------------------------------------------------------ reads
    def retrieve(self, collection_name: str, ids: Any, with_payload: Any = True,
                 with_vectors: Any = False, **ignored: Any) -> list[Any]:
        return self.shard(collection_name).retrieve(
            [convert.point_id(i) for i in ids], with_payload=convert.with_payload(with_payload),
            with_vector=convert.with_vectors(with_vectors))

    def scroll(self, collection_name: str, scroll_filter: Any = None, limit: int = 10,
               offset: Any = None, with_payload: Any = True, with_vectors: Any = False,
               **ignored: Any) -> tuple[list[Any], Any]:
        import qdrant_edge as edge

        request = edge.ScrollRequest(
            offset=None if offset is None else convert.point_id(offset), limit=limit,
            filter=convert.query_filter(scroll_filter),
            with_payload=convert.with_payload(with_payload),
            with_vector=convert.with_vectors(with_vectors))
        return self.shard(collection_name).scroll(request)

    def count(self, collection_name: str, count_filter: Any = None, exact: bool = True,
              **ignored: Any) -> Any:
        import qdrant_edge as edge

        return SimpleNamespace(count=self.shard(collection_name).count(
            edge.CountRequest(exact=exact, filter=convert.query_filter(count_filter))))

    def query_points(self, collection_name: str, query: Any = None, using: str | None = None,
                     prefetch: Any = None, query_filter: Any = None, limit: int = 10,
                     offset: int | None = None, with_payload: Any = True,
                     with_vectors: Any = False, search_params: Any = None,
                     score_threshold: float | None = None, **ignored: Any) -> Any:
        """``query_points``: the answer's ``points`` are Edge ``ScoredPoint``s."""
        request = convert.query_request(
            query=query, using=using, prefetch_=prefetch, query_filter_=query_filter,
            limit=limit, offset=offset, with_payload_=with_payload, with_vectors_=with_vectors,
            search_params_=search_params, score_threshold=score_threshold)
        return SimpleNamespace(points=self.shard(collection_name).query(request))

    def query_batch_points(self, collection_name: str, requests: Any, **ignored: Any
                           ) -> list[Any]:
        return [self.query_points(
            collection_name, query=r.query, using=r.using, prefetch=r.prefetch,
            query_filter=r.filter, limit=r.limit or 10, offset=r.offset,
            with_payload=True if r.with_payload is None else r.with_payload,
            with_vectors=bool(r.with_vector) if not isinstance(r.with_vector, list)
            else r.with_vector, search_params=r.params, score_threshold=r.score_threshold)
            for r in requests]


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _close_shards(shards: dict[str, Any], lock: FolderLock) -> None:
    """Flush and close every shard, then free the folder (also at interpreter exit)."""
    try:
        for shard in shards.values():
            try:
                shard.flush()
                shard.close()
            except Exception as exc:  # noqa: BLE001 - closing the rest matters more
                logger.warning("closing a Qdrant Edge shard failed: %s", exc)
        shards.clear()
    finally:
        lock.release()


class AsyncEdgeClient:
    """``AsyncQdrantClient``'s calls on an :class:`EdgeClient`, each run in a worker thread
    (Edge calls release the GIL), so the async API of the store works without a server."""

    def __init__(self, client: EdgeClient):
        self.client = client

    def __getattr__(self, name: str) -> Any:
        import asyncio

        method = getattr(self.client, name)
        if not callable(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call
