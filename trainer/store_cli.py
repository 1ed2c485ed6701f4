"""``d2llm-rag copy-collection``: move an embedded collection to a Qdrant server or cluster.

Why a command: the embedded store (Qdrant Edge) serves one process on one machine. Past that,
the same collection (dense and BM25 vectors, payloads, the student record) goes to a server
by URL, and ``D2LLMVectorStore(name, embed, client=QdrantClient(url=...))`` uses it with the
same code. The copy never writes into an existing collection.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError


def add_parser(commands: Any, formatter: Any) -> None:
    parser = commands.add_parser(
        "copy-collection", formatter_class=formatter,
        help="copy a collection of the embedded store to a Qdrant server (--url)",
        description="Copy one collection of an embedded store folder (Qdrant Edge, or a "
                    "folder written by qdrant-client's local mode) to a Qdrant server or "
                    "cluster: vectors, payloads and the student record. Then use it with "
                    "D2LLMVectorStore(name, embed, client=QdrantClient(url=...)).")
    parser.add_argument("--qdrant-path", type=Path, required=True, metavar="DIR",
                        help="the embedded store's folder")
    parser.add_argument("--collection", required=True, help="the collection to copy")
    parser.add_argument("--url", required=True, help="the Qdrant server, e.g. http://host:6333")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    parser.add_argument("--target-collection", default=None,
                        help="the collection's name on the server (default: the same)")
    parser.set_defaults(handler=run_copy)


def target_client(url: str, api_key: str | None) -> Any:
    """The server's client (tests replace this with qdrant-client's local mode)."""
    from qdrant_client import QdrantClient

    return QdrantClient(url=url, api_key=api_key)


def run_copy(args: argparse.Namespace) -> int:
    from llama_index_d2llm.edge import EdgeClient
    from llama_index_d2llm.edge_migrate import copy_collection

    if not args.qdrant_path.is_dir():
        raise D2LLMError(f"--qdrant-path {str(args.qdrant_path)!r} is not a folder")
    with EdgeClient.open(args.qdrant_path) as source:
        if not source.collection_exists(args.collection):
            have = ", ".join(c.name for c in source.get_collections().collections) or "none"
            raise D2LLMError(f"{args.qdrant_path} has no collection {args.collection!r} "
                             f"(it has: {have})")
        target = target_client(args.url, args.api_key)
        try:
            count = copy_collection(source, args.collection, target, args.target_collection,
                                    progress=lambda n: print(f"copied {n} points",
                                                             file=sys.stderr, flush=True))
        finally:
            target.close()
    name = args.target_collection or args.collection
    print(f"copied {count} points of {args.collection!r} to collection {name!r} at {args.url}")
    return 0
