"""Query latency of ``D2LLMRetriever``, dense and hybrid, on SciFact in the embedded store
(Qdrant Edge, ``D2LLMVectorStore(..., path=...)``).

    nice -n 15 python benchmarks/hybrid_latency.py --student STUDENT_DIR \\
        --data ../shared/data/scifact --qdrant-path runs/latency/qdrant

Ingests the 5,183 SciFact passages through ``D2LLMEmbedding`` into a ``D2LLMVectorStore``
(dense + BM25 sparse vectors; kept at --qdrant-path, so a rerun with the same student skips
this, the slow part), then retrieves the same claims alternately with ``hybrid=False`` and
``hybrid=True`` (similarity_top_k=100, top_n=10) in one process and reports the median and
90th percentile wall time of each, with the Qdrant call alone timed apart. Writes JSON to
--output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def ingest(store, embed, data, batch: int = 256) -> float:
    """Embed and write the corpus unless the collection already holds it; seconds spent."""
    from llama_index.core.schema import TextNode

    from llama_index_d2llm.qdrant import point_key

    done = (store.client.count(store.collection_name).count
            if store.client.collection_exists(store.collection_name) else 0)
    start = time.perf_counter()
    for first in range(done // batch * batch, len(data.corpus), batch):  # resumes
        passages = data.corpus[first:first + batch]
        nodes = [TextNode(text=p.text, id_=point_key(_uuid(p.id)), metadata={"doc": p.id})
                 for p in passages]
        vectors = embed.get_text_embedding_batch([n.get_content(metadata_mode="embed")
                                                  for n in nodes])
        for node, vector in zip(nodes, vectors, strict=True):
            node.embedding = vector
        store.add(nodes)
        print(f"ingested {first + len(passages)}/{len(data.corpus)}", flush=True)
    return time.perf_counter() - start


def _uuid(text: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True, help="student directory")
    parser.add_argument("--data", type=Path, default=SCIFACT, help="BEIR SciFact folder")
    parser.add_argument("--qdrant-path", type=Path, default=Path("runs/latency/qdrant"))
    parser.add_argument("--queries", type=int, default=50, help="claims timed (each mode)")
    parser.add_argument("--max-passages", type=int, help="index only the first N passages")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "results" / "hybrid-latency-cpu.json")
    args = parser.parse_args(argv)

    import torch

    from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMVectorStore
    from llama_index_d2llm.trainer.evaluation import load_beir, write_json

    data = load_beir(args.data, "train")
    data.corpus = data.corpus[:args.max_passages] if args.max_passages else data.corpus
    embed = D2LLMEmbedding(model_name=str(args.student), device="cpu")
    args.qdrant_path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    store = D2LLMVectorStore("scifact", embed, path=args.qdrant_path)
    client = store.client
    try:
        ingest_s = ingest(store, embed, data)
        store.optimize()
        queries = [data.queries[q] for q in sorted(data.queries)][:args.queries]
        retrievers = {mode: D2LLMRetriever(vector_store=store, embed_model=embed,
                                           similarity_top_k=100, top_n=10,
                                           hybrid=mode == "hybrid")
                      for mode in ("dense", "hybrid")}
        qdrant_seconds: list[float] = []
        original = client.query_points

        def timed_query_points(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                qdrant_seconds.append(time.perf_counter() - start)

        client.query_points = timed_query_points
        for retriever in retrievers.values():
            retriever.retrieve(queries[0])  # the student check and the first-call warm-up
        times: dict[str, list[float]] = {"dense": [], "hybrid": []}
        qdrant_times: dict[str, list[float]] = {"dense": [], "hybrid": []}
        for query in queries:
            for mode, retriever in retrievers.items():
                qdrant_seconds.clear()
                start = time.perf_counter()
                retriever.retrieve(query)
                times[mode].append(time.perf_counter() - start)
                qdrant_times[mode].append(sum(qdrant_seconds))

        def summary(values: list[float]) -> dict[str, float]:
            ordered = sorted(values)
            return {"median_ms": round(1000 * statistics.median(ordered), 1),
                    "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 1)}

        result = {"student": embed.student.name, "corpus": len(data.corpus),
                  "queries_timed": len(queries), "torch_threads": torch.get_num_threads(),
                  "ingest_s": round(ingest_s, 1), "qdrant": "embedded (Qdrant Edge, path=...)",
                  "similarity_top_k": 100, "top_n": 10,
                  "retrieve": {m: summary(v) for m, v in times.items()},
                  "qdrant_call": {m: summary(v) for m, v in qdrant_times.items()}}
    finally:
        store.close()
    write_json(args.output, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
