"""Indexing and querying at corpus scale: encoding throughput, then the embedded store at
10k-100k passages, Qdrant Edge against qdrant-client's local mode.

    python benchmarks/index_scale.py --output benchmarks/results/index-scale-cpu.json
    python benchmarks/index_scale.py --skip-encoding --engines edge local --torch-threads 1 \
        --output benchmarks/results/index-scale-edge-cpu.json

Two parts, because on this CPU the student cannot encode 100,000 passages within a session
(a few passages/s: hours), while Qdrant's cost does not depend on what the vectors mean:

1. **Encoding**: passages/s of ``D2LLMEmbedding`` (the student's backbone + PMA, as ingestion
   runs it) on ``--encode-sample`` synthetic passages of ``--words`` words, with ``--dtype``.
   The hours to embed each corpus size follow from it (printed as computed, not timed).
2. **Storage and search**, for each ``--sizes``, in its own process (so the peak memory is that
   size's and engine's): synthetic passages with random unit vectors of the student's
   dimension go into an embedded folder through ``D2LLMVectorStore`` (dense + BM25 sparse
   vectors, as a user's ingestion writes them): ``path=`` (Qdrant Edge, the default; then its
   HNSW index is built, timed apart) or ``client=QdrantClient(path=...)`` (local mode, the
   old default). Then ``D2LLMRetriever.retrieve`` is timed over ``--queries`` queries, dense
   and hybrid, median and p90, with the student encoding each query for real; the query's
   encoding alone and the engine's hybrid request alone are timed too, so that
   ``beyond_encoding_ms`` (retrieve minus encoding) and the engine's share show. Written: the
   write and index-build wall times, the reopen time, peak RSS, disk size, the latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_inference import load_student  # beside this script
from kfold_eval import retrieve_times

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_corpus"


def lexicon() -> list[str]:
    """The sample corpus's words, most frequent first (real words tokenise as real text)."""
    import re
    from collections import Counter

    counts = Counter(word for path in sorted(SAMPLE.rglob("*.md"))
                     for word in re.findall(r"[A-Za-z]{2,}", path.read_text()))
    return [word for word, _ in counts.most_common()]


def synthetic_passages(count: int, words: int, seed: int) -> list[str]:
    """Words drawn Zipf-distributed by their rank in the sample corpus (as natural text's
    term frequencies are), so that the sparse vectors and the IDF have a natural shape."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocabulary = lexicon()
    ranks = (rng.zipf(1.1, size=(count, words)) - 1) % len(vocabulary)  # the tail wraps
    return [" ".join(vocabulary[r] for r in row) for row in ranks]


def bench_encoding(args: argparse.Namespace) -> dict:
    from llama_index_d2llm import D2LLMEmbedding

    student = load_student(args.student, args.dtype)
    embed = D2LLMEmbedding.from_student(student, embed_batch_size=args.batch_size)
    passages = synthetic_passages(args.encode_sample, args.words, seed=1)
    embed.get_text_embedding_batch(passages[: args.batch_size])  # warm-up
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        embed.get_text_embedding_batch(passages)
        runs.append(time.perf_counter() - start)
    per_s = args.encode_sample / statistics.median(runs)
    return {"student": student.name, "dtype": str(student.backbone_dtype),
            "dimension": student.dimension,
            "max_passage_length": student.config.max_passage_length,
            "passages": args.encode_sample, "words": args.words, "runs_s": runs,
            "passages_per_s": per_s,
            "hours_to_embed (computed)": {str(n): n / per_s / 3600 for n in args.sizes}}


def open_store(engine: str, folder: str, embed):
    """The store of ``engine`` in ``folder``: Edge (``path=``) or local mode (``client=``)."""
    from qdrant_client import QdrantClient

    from llama_index_d2llm import D2LLMVectorStore

    if engine == "edge":
        return D2LLMVectorStore("scale", embed, path=folder)
    return D2LLMVectorStore("scale", embed, client=QdrantClient(path=folder))


def median_p90(times: list[float]) -> dict:
    return {"median": statistics.median(times), "p90": statistics.quantiles(times, n=10)[-1]}


def part_times(embed, store, queries: list[str], top_k: int) -> dict:
    """ms of the query's encoding alone, of a hybrid ``retrieve`` given the query's vector
    (everything beyond the encoding) and of the engine's hybrid request alone."""
    from llama_index.core.schema import QueryBundle

    from llama_index_d2llm import D2LLMRetriever
    from llama_index_d2llm.collection import describe_collection, sparse_query
    from llama_index_d2llm.sparse import hybrid_query

    info = describe_collection(store)
    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=top_k,
                               top_n=10, hybrid=True)
    encode, beyond, engine = [], [], []
    for text in queries:
        start = time.perf_counter()
        vector = embed.get_query_embedding(text)
        encode.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        retriever.retrieve(QueryBundle(text, embedding=vector))
        beyond.append(1000 * (time.perf_counter() - start))
        request = hybrid_query(vector, sparse_query(store, text), dense_name=info.vector_name,
                               sparse_name=info.sparse_name, limit=top_k)
        start = time.perf_counter()
        store.client.query_points(store.collection_name, with_payload=True, **request)
        engine.append(1000 * (time.perf_counter() - start))
    return {"encode_ms": median_p90(encode), "hybrid_given_vector_ms": median_p90(beyond),
            "engine_hybrid_ms": median_p90(engine)}


def bench_size(args: argparse.Namespace, size: int, engine: str) -> dict:
    """One corpus size on one engine, in this process: write, index, query, reopen."""
    import torch
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    from llama_index_d2llm import D2LLMEmbedding
    from llama_index_d2llm.provenance import record_student

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    student = load_student(args.student, args.dtype)
    embed = D2LLMEmbedding.from_student(student)
    texts = synthetic_passages(size, args.words, seed=2)
    queries = [" ".join(t.split()[:12]) for t in random.Random(3).sample(texts, args.queries)]
    generator = torch.Generator().manual_seed(4)
    result: dict = {"size": size, "engine": engine}
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        store = open_store(engine, folder, embed)
        start = time.perf_counter()
        for first in range(0, size, args.write_batch):
            batch = texts[first: first + args.write_batch]
            vectors = torch.nn.functional.normalize(
                torch.randn(len(batch), student.dimension, generator=generator), dim=-1)
            nodes = [TextNode(text=t, embedding=v.tolist())
                     for t, v in zip(batch, vectors, strict=True)]
            # The store's own add re-encodes one node to check its student made the vectors;
            # these are random, so the parent's add writes them (dense + BM25 alike).
            QdrantVectorStore.add(store, nodes)
        result["write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        store.optimize()  # Edge: the HNSW index (local mode has none)
        result["index_build_s"] = time.perf_counter() - start
        record_student(store, student)
        store.client.close()
        # A reopen: what a chatbot's restart pays to load the embedded folder.
        start = time.perf_counter()
        store = open_store(engine, folder, embed)
        store.client.get_collection("scale")  # Edge loads the shard on first use
        result["reopen_s"] = time.perf_counter() - start
        result["disk_mb"] = sum(p.stat().st_size for p in Path(folder).rglob("*")
                                if p.is_file()) / 2**20
        for mode in ("dense", "hybrid"):
            times = retrieve_times(embed, store, queries, mode, args.top_k)
            result[f"{mode}_retrieve_ms"] = median_p90(times)
        result.update(part_times(embed, store, queries, args.top_k))
        result["hybrid_beyond_encoding_ms"] = (result["hybrid_retrieve_ms"]["median"]
                                               - result["encode_ms"]["median"])
        store.client.close()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None,
                        help="saved student; default: an untrained Gemma 3 270M student of the "
                             "real shape (speed does not depend on the weights)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--words", type=int, default=120, help="words a passage")
    parser.add_argument("--encode-sample", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--write-batch", type=int, default=1000)
    parser.add_argument("--tmp", default=None, help="folder for the embedded Qdrant folders")
    parser.add_argument("--skip-encoding", action="store_true")
    parser.add_argument("--engines", nargs="+", choices=["edge", "local"], default=["edge"],
                        help="edge: Qdrant Edge (path=, the default store); local: "
                             "qdrant-client's local mode (the old default)")
    parser.add_argument("--local-max-size", type=int, default=None,
                        help="run local mode only up to this size (it takes minutes a query "
                             "at 100,000)")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-engine", default="edge", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.one_size is not None:  # the child process of one size
        print(json.dumps(bench_size(args, args.one_size, args.one_engine)))
        return {}
    report: dict = {"command": " ".join(sys.argv), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                    "words": args.words, "top_k": args.top_k, "queries": args.queries}
    if not args.skip_encoding:
        report["encoding"] = bench_encoding(args)
        print(json.dumps(report["encoding"], indent=1), flush=True)
    report["sizes"] = []
    child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    for size in args.sizes:
        for engine in args.engines:
            if engine == "local" and args.local_max_size and size > args.local_max_size:
                continue
            out = subprocess.run([*child, "--one-size", str(size), "--one-engine", engine],
                                 check=True, capture_output=True, text=True)
            report["sizes"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(report["sizes"][-1]), flush=True)
            if args.output:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
