"""Where a ``D2LLMRetriever`` query spends its time, part by part, dense and hybrid.

    python benchmarks/retriever_latency.py --student runs/kfold/students/fusion-fold0 \\
        --qdrant-path runs/kfold/qdrant/fusion-fold0 --collection scifact --queries 100

Reuses a collection that ``scifact_kfold.py`` (or ``hybrid_latency.py``) built with that
student. For ``--queries`` SciFact claims, in one process, each part of ``retrieve`` is timed
on its own, in the order the retriever runs them:

- ``encode_query``: the student's backbone and PMA over the claim;
- ``qdrant_search``: the raw ``query_points`` call (cosine, or hybrid: dense + sparse
  prefetches fused by RRF), with vectors and payloads;
- ``build_nodes``: wrapping its points as hits and building the LlamaIndex nodes of the
  top ``top_n`` (the retriever builds no others);
- ``bm25_scores`` (hybrid): the second, id-filtered sparse query for the candidates' BM25;
- ``rescore``: the fusion, with the IEM when the student weighs it;
- ``retrieve``: one whole ``retrieve`` call, for comparison with the sum;
- ``bm25``: Qdrant's BM25 alone (the sparse query, encoded and searched, with payloads), the
  lexical first stage a user would otherwise run.

Medians (and 90th percentiles) in ms, written to ``--output``. Every claim is encoded once
before the timing, so that no part pays for the first query of a length. The Qdrant calls go
through the retriever's own ``ClientCall``, so they run with one BLAS thread in local mode as
``retrieve``'s do (``llama_index_d2llm/threads.py``: numpy's spinning OpenBLAS threads had
taken a core from the query encoder on 2 cores).
With ``--teacher-queries N``, the teacher (the distiller's default for the device) also scores
the top ``top_k`` candidates of N claims, as an LLM cross-encoder would have to at query time:
the ratio of its median to ``retrieve``'s is what D2LLM saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, 1000 * (time.perf_counter() - start)


def summary(parts: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median and 90th percentile of each part's times, in ms."""
    return {part: {"median_ms": round(statistics.median(v), 2),
                   "p90_ms": round(statistics.quantiles(v, n=10)[-1], 2)}
            for part, v in parts.items()}


def student_collection_arguments(parser: argparse.ArgumentParser, queries: int) -> None:
    """A student, the SciFact collection it built, and how many claims to time on it."""
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--qdrant-path", type=Path, required=True)
    parser.add_argument("--collection", default="scifact")
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--dtype", default="bfloat16")


def teacher_cost(store, embed, claims: list[str], top_k: int, max_length: int | None) -> dict:
    """The teacher (the distiller's default) scoring each claim's ``top_k`` candidates, as a
    cross-encoder would have to at query time: the cost D2LLM exists to avoid."""
    from llama_index_d2llm import D2LLMRetriever
    from llama_index_d2llm.trainer.distill import default_teacher_max_length
    from llama_index_d2llm.trainer.teacher import Teacher

    length = max_length or default_teacher_max_length(embed.student.device)
    teacher = Teacher.from_pretrained(None, max_length=length, dtype=embed.student.backbone_dtype)
    candidates = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=top_k,
                                top_n=top_k, hybrid=False)
    times = []
    for claim in claims:
        passages = [hit.node.get_content() for hit in candidates.retrieve(claim)]
        _, ms = timed(teacher.score, [claim] * len(passages), passages)
        times.append(ms)
    return {"max_length": length, "mode": teacher.mode, "passages": top_k,
            "median_ms": round(statistics.median(times), 1),
            "runs_ms": [round(t, 1) for t in times]}


def main(argv: list[str] | None = None) -> dict:
    from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever, D2LLMStudent
    from llama_index_d2llm.collection import (
        _hits,
        _search_request,
        describe_collection,
        lexical_scores,
        sparse_query,
    )
    from llama_index_d2llm.flows import ClientCall, _sync_client
    from llama_index_d2llm.store import D2LLMVectorStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    student_collection_arguments(parser, queries=100)
    parser.add_argument("--teacher-queries", type=int, default=3,
                        help="claims whose top_k candidates the teacher also scores (0: none)")
    parser.add_argument("--teacher-max-length", type=int, default=None,
                        help="default: the distiller's teacher default")
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/retriever-latency-cpu.json"))
    args = parser.parse_args(argv)
    command = "python benchmarks/retriever_latency.py " + " ".join(argv or [])

    claims = [json.loads(line)["text"]
              for line in (args.data / "queries.jsonl").read_text().splitlines()]
    claims = claims[:args.queries]
    student = D2LLMStudent.from_pretrained(args.student, dtype=args.dtype)
    embed = D2LLMEmbedding.from_student(student)
    store = D2LLMVectorStore(args.collection, embed, path=args.qdrant_path)  # Qdrant Edge
    client = store.client
    result: dict = {"command": command, "student": str(args.student), "queries": len(claims),
                    "top_k": args.top_k, "dtype": str(student.backbone_dtype),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "fusion": {s: (None if w is None else w.to_dict())
                               for s, w in ((s, student.fusion(s)) for s in ("dense", "hybrid"))}}
    try:
        info = describe_collection(store)
        result["points"] = client.count(args.collection).count
        for claim in claims:  # warm-up: the CPU kernels of every query length, compiled once
            embed.get_query_embedding(claim)
        for stage in ("dense", "hybrid"):
            retriever = D2LLMRetriever(vector_store=store, embed_model=embed,
                                       similarity_top_k=args.top_k, top_n=10,
                                       hybrid=stage == "hybrid")
            retriever.retrieve(claims[0])  # warm-up and the student check
            parts: dict[str, list[float]] = {}
            for claim in claims:
                query, ms = timed(embed.get_query_embedding, claim)
                parts.setdefault("encode_query", []).append(ms)
                sparse = sparse_query(store, claim) if stage == "hybrid" else None
                request = _search_request(store, query, args.top_k, info, None, None, None,
                                          sparse)
                response, ms = timed(ClientCall("query_points", kwargs=request).call,
                                     _sync_client(store))
                parts.setdefault("qdrant_search", []).append(ms)
                start = time.perf_counter()
                hits = _hits(store, response.points, info)
                [h.node for h in hits[:10]]  # noqa: B018 - the nodes the retriever builds
                parts.setdefault("build_nodes", []).append(1000 * (time.perf_counter() - start))
                lexical = None
                fusion = student.fusion(stage)
                if stage == "hybrid" and fusion is not None and fusion.lexical > 0:
                    lexical, ms = timed(lexical_scores, store, sparse,
                                        [h.node_id for h in hits], info)
                    parts.setdefault("bm25_scores", []).append(ms)
                _, ms = timed(student.rescore, query, [h.vector for h in hits], stage,
                              lexical_scores=lexical)
                parts.setdefault("rescore", []).append(ms)
                _, ms = timed(retriever.retrieve, claim)
                parts.setdefault("retrieve", []).append(ms)
            result[stage] = summary(parts)
            print(stage, {p: v["median_ms"] for p, v in result[stage].items()}, flush=True)
        # BM25 alone through the same collection, the lexical first stage on its own
        times = []
        for claim in claims:
            start = time.perf_counter()
            ClientCall("query_points", kwargs=dict(
                collection_name=args.collection, query=sparse_query(store, claim),
                using=info.sparse_name, limit=args.top_k, with_payload=True)).call(client)
            times.append(1000 * (time.perf_counter() - start))
        result["bm25"] = summary({"retrieve": times})
        print("bm25", result["bm25"]["retrieve"], flush=True)
        if args.teacher_queries:
            result["teacher"] = teacher_cost(store, embed, claims[:args.teacher_queries],
                                             args.top_k, args.teacher_max_length)
            for stage in ("dense", "hybrid"):
                result["teacher"][f"vs_{stage}_retrieve"] = round(
                    result["teacher"]["median_ms"] / result[stage]["retrieve"]["median_ms"], 1)
            print("teacher", result["teacher"], flush=True)
    finally:
        store.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
