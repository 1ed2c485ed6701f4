"""Cosine against dot product in the embedded Qdrant, back to back in one process.

    python benchmarks/probes/distance_ab.py --student runs/kfold-minilm/students/minilm-fold0 \\
        --qdrant-path runs/kfold-minilm/qdrant/minilm-fold0 --queries 50 --sizes 100000

``D2LLMVectorStore`` creates dot-product collections: the student's vectors are unit length,
so dot product ranks and scores as cosine does, but the embedded Qdrant re-normalises every
stored vector of a cosine collection on each query. Two parts:

1. **The retriever**: the points of an existing cosine collection (built by ``scifact_kfold.py``
   with ``--student``) are copied, vectors, payloads and student record as they are, into a
   dot-product collection of an in-memory embedded Qdrant. Then ``D2LLMRetriever.retrieve``
   (dense, top ``--top-k``) runs on each ``--queries`` claim against both, alternating which
   goes first; medians in ms, and whether the top 10 and its scores agree.
2. **Raw search at corpus scale**: for each ``--sizes``, random unit vectors of the student's
   dimension in a cosine and a dot collection; ``query_points`` with vectors and payloads, as
   the retriever calls it, timed over 30 random queries each.

Written to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from retriever_latency import student_collection_arguments  # noqa: E402


def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def copy_as_dot(source, collection: str, target) -> None:
    """The collection's points, payloads and metadata into ``target`` with dot product."""
    from qdrant_client import models

    config = source.get_collection(collection).config
    vectors = config.params.vectors
    dot = ({name: params.model_copy(update={"distance": models.Distance.DOT})
            for name, params in vectors.items()} if isinstance(vectors, dict)
           else vectors.model_copy(update={"distance": models.Distance.DOT}))
    target.create_collection(collection, vectors_config=dot,
                             sparse_vectors_config=config.params.sparse_vectors,
                             metadata=config.metadata)
    offset = None
    while True:
        points, offset = source.scroll(collection, limit=1000, offset=offset,
                                       with_payload=True, with_vectors=True)
        target.upsert(collection, points=[
            models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points])
        if offset is None:
            return


def retriever_ab(args, claims: list[str]) -> dict:
    from qdrant_client import QdrantClient

    from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMStudent
    from llama_index_d2llm.collection import describe_collection
    from llama_index_d2llm.store import D2LLMVectorStore

    student = D2LLMStudent.from_pretrained(args.student, dtype=args.dtype)
    embed = D2LLMEmbedding.from_student(student)
    cosine_client = QdrantClient(path=str(args.qdrant_path))
    dot_client = QdrantClient(":memory:")
    try:
        copy_as_dot(cosine_client, args.collection, dot_client)
        retrievers = {}
        for name, client in (("cosine", cosine_client), ("dot", dot_client)):
            store = D2LLMVectorStore(args.collection, embed, client=client)
            retrievers[name] = D2LLMRetriever(vector_store=store, embed_model=embed,
                                              similarity_top_k=args.top_k, top_n=10,
                                              hybrid=False)
            retrievers[name].retrieve(claims[0])  # the student check, once
        distances = {name: describe_collection(r.vector_store).distance
                     for name, r in retrievers.items()}
        for claim in claims:  # warm-up: every query length's kernels
            embed.get_query_embedding(claim)
        times: dict[str, list[float]] = {"cosine": [], "dot": []}
        same_top10, worst_score_gap = 0, 0.0
        for i, claim in enumerate(claims):
            order = ("cosine", "dot") if i % 2 == 0 else ("dot", "cosine")
            results = {}
            for name in order:
                start = time.perf_counter()
                results[name] = retrievers[name].retrieve(claim)
                times[name].append(time.perf_counter() - start)
            ids = {name: [h.node.node_id for h in hits] for name, hits in results.items()}
            same_top10 += ids["cosine"] == ids["dot"]
            worst_score_gap = max(worst_score_gap, *(
                abs(a.score - b.score) for a, b in zip(results["cosine"], results["dot"],
                                                       strict=True)))
        return {"student": str(args.student), "points": dot_client.count(args.collection).count,
                "dimension": student.dimension, "distances": distances,
                "dense_retrieve_median_ms": {n: median_ms(t) for n, t in times.items()},
                "dot_vs_cosine": round(statistics.median(times["dot"])
                                       / statistics.median(times["cosine"]), 3),
                "claims_with_the_same_top10": f"{same_top10} of {len(claims)}",
                "largest_score_difference": worst_score_gap}
    finally:
        cosine_client.close()
        dot_client.close()


def raw_search(size: int, dimension: int, queries: int = 30) -> dict:
    import numpy as np
    from qdrant_client import QdrantClient, models

    from llama_index_d2llm.threads import single_blas_thread

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    probes = rng.standard_normal((queries, dimension)).astype(np.float32)
    result = {}
    for distance in (models.Distance.COSINE, models.Distance.DOT):
        client = QdrantClient(":memory:")
        client.create_collection("c", vectors_config=models.VectorParams(size=dimension,
                                                                         distance=distance))
        for start in range(0, size, 5000):
            stop = min(size, start + 5000)
            client.upsert("c", points=models.Batch(
                ids=list(range(start, stop)), vectors=vectors[start:stop].tolist(),
                payloads=[{"n": i} for i in range(start, stop)]))
        times = []
        for probe in probes:
            start_time = time.perf_counter()
            with single_blas_thread(client):  # as the retriever calls an embedded Qdrant
                client.query_points("c", query=probe.tolist(), limit=100, with_payload=True,
                                    with_vectors=True)
            times.append(time.perf_counter() - start_time)
        result[distance.value] = median_ms(times)
        client.close()
    result["dot_vs_cosine"] = round(result["Dot"] / result["Cosine"], 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    student_collection_arguments(parser, queries=50)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/distance-ab-cpu.json"))
    args = parser.parse_args(argv)
    claims = [json.loads(line)["text"]
              for line in (args.data / "queries.jsonl").read_text().splitlines()]
    result: dict = {"command": "python benchmarks/probes/distance_ab.py " + " ".join(argv or [])}
    result["retriever"] = retriever_ab(args, claims[:args.queries])
    print(json.dumps(result["retriever"]), flush=True)
    dimension = result["retriever"]["dimension"]
    result["raw_search"] = {}
    with warnings.catch_warnings():  # local mode's warning past 20,000 points: we know
        warnings.simplefilter("ignore", UserWarning)
        for size in args.sizes:
            result["raw_search"][str(size)] = raw_search(size, dimension)
            print(size, result["raw_search"][str(size)], flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
