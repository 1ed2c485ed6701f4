"""A small disk cache for the expensive, deterministic stages (teacher scores, generated
queries, mined negatives).

Entries are keyed by a sha256 of everything that determines them (teacher fingerprint, mode,
prompt, texts, settings), so a changed input is a cache miss, never a stale hit. Every file is
written atomically (``student/files.py``), so an interrupted run leaves either a whole entry or
none. JSON for what a user may want to read; safetensors for tensors (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student.files import (  # re-exported: the trainer's stages use them
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

__all__ = ["ROWS_FORMAT", "RowChunks", "TensorRowCache", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text", "cached_rows", "content_key", "read_json"]

logger = logging.getLogger(__name__)

ROWS_FORMAT = "d2llm-rows-v1"


def content_key(*parts: Any) -> str:
    """A sha256 hex digest of JSON-serialisable parts (order matters, dict order does not)."""
    payload = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                         default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_json(path: str | os.PathLike) -> Any | None:
    """The stored object, or None when the entry is missing or unreadable (then recompute)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable cache entry %s (%s); it will be recomputed", path, exc)
        return None


class TensorRowCache:
    """Per-item tensor rows (e.g. one teacher score and feature per pair) in safetensors chunks.

    Why chunks: scoring writes results every few hundred pairs, so an interrupted run resumes
    where it stopped, without one tiny file per pair. Each chunk records the item keys of its
    rows in its metadata; the index of all chunks is read lazily from that metadata only.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._index: dict[str, tuple[str, int]] | None = None

    def _chunk_files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("rows-*.safetensors"))

    def _read_index(self) -> dict[str, tuple[str, int]]:
        from safetensors import safe_open

        index: dict[str, tuple[str, int]] = {}
        for chunk in self._chunk_files():
            try:
                with safe_open(str(chunk), framework="pt") as handle:
                    metadata = handle.metadata() or {}
                if metadata.get("format") != ROWS_FORMAT:
                    raise ValueError(f"unknown format {metadata.get('format')!r}")
                keys = json.loads(metadata["keys"])
            except Exception as exc:  # a damaged chunk costs a recomputation, not the run
                logger.warning("ignoring unreadable cache chunk %s (%s)", chunk, exc)
                continue
            for row, key in enumerate(keys):
                index[key] = (chunk.name, row)
        return index

    @property
    def index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            self._index = self._read_index()
        return self._index

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Positions of the keys that have no stored row."""
        index = self.index
        return [position for position, key in enumerate(keys) if key not in index]

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Stacked rows for ``keys`` (all must be stored), one tensor per stored name."""
        from safetensors.torch import load_file

        index = self.index
        absent = [key for key in keys if key not in index]
        if absent:
            raise KeyError(f"{len(absent)} keys are not cached, e.g. {absent[0]}")
        by_chunk: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            chunk, row = index[key]
            by_chunk.setdefault(chunk, []).append((position, row))
        output: dict[str, torch.Tensor] = {}
        for chunk, pairs in by_chunk.items():
            tensors = load_file(str(self.directory / chunk))
            positions = torch.tensor([p for p, _ in pairs], dtype=torch.long)
            rows = torch.tensor([r for _, r in pairs], dtype=torch.long)
            for name, tensor in tensors.items():
                if name not in output:
                    output[name] = torch.empty((len(keys), *tensor.shape[1:]), dtype=tensor.dtype)
                output[name][positions] = tensor[rows]
        return output

    def write(self, keys: Sequence[str], tensors: dict[str, torch.Tensor]) -> Path:
        """Store one chunk: row ``i`` of every tensor belongs to ``keys[i]``."""
        from safetensors.torch import save

        keys = list(keys)
        for name, tensor in tensors.items():
            if tensor.shape[0] != len(keys):
                raise ValueError(f"tensor {name!r} has {tensor.shape[0]} rows for {len(keys)} keys")
        data = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
                    metadata={"format": ROWS_FORMAT, "keys": json.dumps(keys)})
        path = atomic_write_bytes(self.directory / f"rows-{uuid.uuid4().hex}.safetensors", data)
        index = self.index
        for row, key in enumerate(keys):
            index[key] = (path.name, row)
        return path


#: What a computation hands ``cached_rows`` as it goes: (keys, {name: rows of those keys}).
RowChunks = Iterable[tuple[list[str], dict[str, torch.Tensor]]]


def cached_rows(cache: TensorRowCache | None, keys: Sequence[str],
                compute: Callable[[list[int]], RowChunks]) -> dict[str, torch.Tensor]:
    """Rows for ``keys`` in order, {name: tensor}: stored ones read, the others computed.

    ``compute(positions)`` gets the first position of each distinct key the cache lacks and
    yields chunks as it goes; each chunk is written at once, so an interrupted computation
    keeps what it finished. Without a cache every distinct key is computed.
    """
    unique: dict[str, int] = {}
    for position, key in enumerate(keys):
        unique.setdefault(key, position)
    stored = set() if cache is None else {k for k in unique if k in cache}
    todo = [position for key, position in unique.items() if key not in stored]
    computed: dict[str, dict[str, torch.Tensor]] = {}
    if todo:
        for chunk_keys, rows in compute(todo):
            if cache is not None:
                cache.write(chunk_keys, rows)
            for row, key in enumerate(chunk_keys):
                computed[key] = {name: tensor[row] for name, tensor in rows.items()}
    output: dict[str, torch.Tensor] = {}

    def put(name: str, positions: list[int], values: torch.Tensor) -> None:
        if name not in output:
            output[name] = torch.empty((len(keys), *values.shape[1:]), dtype=values.dtype)
        output[name][positions] = values

    from_cache = [i for i, key in enumerate(keys) if key not in computed]
    if from_cache:
        for name, values in cache.load([keys[i] for i in from_cache]).items():  # type: ignore[union-attr]
            put(name, from_cache, values)
    fresh = [i for i, key in enumerate(keys) if key in computed]
    for name in computed[keys[fresh[0]]] if fresh else ():
        put(name, fresh, torch.stack([computed[keys[i]][name] for i in fresh]))
    return output
