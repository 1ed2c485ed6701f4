"""One process at a time on an embedded store's folder, and a message naming the holder.

Why our own lock: Qdrant Edge refuses a second opener with "failed to open WAL ...
Kind(WouldBlock)", which names neither the folder's user nor a fix. An advisory ``flock`` on
``d2llm.lock`` goes with the process (also when it is killed), and the file says who holds it.
Every entry point (the store, ``d2llm-rag eval``, the chatbot, the quickstart) opens the
folder through ``EdgeClient``, so they all say the same thing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from llama_index_d2llm.student.errors import D2LLMError

LOCK_FILE = "d2llm.lock"


class StoreInUseError(D2LLMError, RuntimeError):
    """Another process holds the embedded store's folder."""


def describe_holder(record: str) -> str:
    """What a lock file says about its holder, in words."""
    try:
        holder = json.loads(record)
        return (f"process {holder['pid']} on {holder['host']} since {holder['since']}: "
                f"{holder['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that has not said which yet"


class FolderLock:
    """An exclusive lock on ``folder/d2llm.lock``, taken at creation, released once."""

    def __init__(self, folder: Path):
        import fcntl

        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle: IO[str] = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise D2LLMError(f"cannot open the Qdrant folder {folder}: {exc.strerror or exc}; "
                             "pass a writable folder") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = describe_holder(handle.read())
            handle.close()
            raise StoreInUseError(
                f"the Qdrant folder {folder} is in use by {holder}: the embedded store allows "
                "one process at a time. Stop that process or wait for it to end, use another "
                "folder, or copy the collection to a Qdrant server (d2llm-rag copy-collection "
                "--qdrant-path ... --url ...) and use it by URL") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)[:200]}) + "\n")
        handle.flush()
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
