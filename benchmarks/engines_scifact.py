"""SciFact through ``D2LLMRetriever`` on both engines: Qdrant Edge and qdrant-client's local mode.

    python benchmarks/engines_scifact.py --student STUDENT --qdrant-path EDGE_FOLDER \\
        --output benchmarks/results/engines-scifact-cpu.json

Reuses an Edge collection ``scifact`` that ``hybrid_latency.py`` built with that student (no
re-encoding), copies it into a local-mode folder with ``edge_migrate.copy_collection`` (the
same points, vectors and payloads), then retrieves ``--queries`` claims with the same
retriever settings on each engine, dense and hybrid, and reports nDCG@10 of the rescored top
10 (ranx, the ``train`` qrels: SciFact's only split here) and how many claims got the same
top 10 in the same order. Local mode searches exactly; Edge searches its HNSW index when the
collection is large enough to have one (printed: ``indexed_vectors``), so a difference is
HNSW's approximation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def runs(store, embed, queries: dict[str, str], hybrid: bool) -> dict[str, dict[str, float]]:
    from llama_index_d2llm import D2LLMRetriever

    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=100,
                               top_n=10, hybrid=hybrid)
    found = {}
    for qid, text in queries.items():
        found[qid] = {h.node.metadata["doc"]: float(h.score) for h in retriever.retrieve(text)}
    return found


def main(argv: list[str] | None = None) -> dict:
    from qdrant_client import QdrantClient

    from llama_index_d2llm import D2LLMEmbedding, D2LLMVectorStore
    from llama_index_d2llm.edge_migrate import copy_collection
    from llama_index_d2llm.trainer.evaluation import evaluate_run, load_beir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--qdrant-path", type=Path, required=True, help="the Edge folder")
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    data = load_beir(args.data, "train")
    queries = {q: data.queries[q] for q in sorted(data.qrels)[:args.queries]}
    qrels = {q: data.qrels[q] for q in queries}
    embed = D2LLMEmbedding(model_name=str(args.student), device="cpu")
    result: dict = {"student": embed.student.name, "queries": len(queries), "split": "train",
                    "similarity_top_k": 100, "top_n": 10}
    with tempfile.TemporaryDirectory() as local_folder, \
            D2LLMVectorStore("scifact", embed, path=args.qdrant_path) as edge:
        local_client = QdrantClient(path=local_folder)
        result["points_copied"] = copy_collection(edge.client, "scifact", local_client)
        result["edge_indexed_vectors"] = edge.client.shard("scifact").info().indexed_vectors_count
        local = D2LLMVectorStore("scifact", embed, client=local_client)
        for mode in ("dense", "hybrid"):
            found = {name: runs(store, embed, queries, mode == "hybrid")
                     for name, store in (("edge", edge), ("local", local))}
            result[mode] = {name: evaluate_run(qrels, run, ["ndcg@10"])["ndcg@10"]
                            for name, run in found.items()}
            result[mode]["same_top10_in_order"] = sum(
                list(found["edge"][q]) == list(found["local"][q]) for q in queries)
            print(mode, result[mode], flush=True)
        local_client.close()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
