"""BM25 as Qdrant sparse vectors (what hybrid search uses) against rank_bm25, on SciFact.

    nice -n 15 python benchmarks/sparse_bm25.py --data ../shared/data/scifact

Both rank the 5,183 SciFact passages for the 809 train claims (qrels/train.tsv), top 100:
  1. ``rank_bm25`` (BM25Okapi k1=1.5 b=0.75, lowercase words, no stemming: the trainer's
     miner and ``d2llm-rag eval --bm25``);
  2. ``BM25Encoder`` sparse vectors in a local Qdrant collection with the IDF modifier,
     queried through Qdrant (``evaluation.qdrant_runs``, the collection ``D2LLMVectorStore``
     builds): Qdrant's tokenizer, English stop words and Snowball stemmer, k1=1.2, b=0.75, a
     fixed average length of 256 tokens; plus the variants given by --avg-len.
nDCG@10, Recall@100 and MRR@10 from ranx, and the wall time of each, go to --output (JSON).
No student is involved; a minute or two of CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SCIFACT, help="BEIR SciFact folder")
    parser.add_argument("--split", default="train", help="qrels split (default: the 809 claims)")
    parser.add_argument("--avg-len", type=float, action="append", default=[],
                        help="also measure the sparse vectors with this average length")
    parser.add_argument("--qdrant-path", default=":memory:",
                        help="local Qdrant folder (default: in memory)")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "results" / "sparse-bm25-scifact.json")
    args = parser.parse_args(argv)

    from llama_index_d2llm.sparse import BM25Encoder, BM25Settings
    from llama_index_d2llm.trainer.evaluation import (
        bm25_run,
        evaluate_run,
        load_beir,
        qdrant_runs,
        write_json,
    )

    data = load_beir(args.data, args.split)
    ids = sorted(data.queries)
    texts = [p.text for p in data.corpus]
    result = {"data": str(args.data), "split": args.split, "queries": len(ids),
              "corpus": len(texts), "top_k": 100, "rankings": {}}

    start = time.perf_counter()
    run = bm25_run(data, 100)
    result["rankings"]["rank_bm25 (k1=1.5, b=0.75, words)"] = {
        **evaluate_run(data.qrels, run), "seconds": round(time.perf_counter() - start, 2)}

    for avg_len in [BM25Settings().avg_len, *args.avg_len]:
        settings = BM25Settings(avg_len=avg_len)
        start = time.perf_counter()
        run = qdrant_runs(None, None, [p.id for p in data.corpus], ids, 100, args.qdrant_path,
                          passage_texts=texts, query_texts=[data.queries[q] for q in ids],
                          bm25=BM25Encoder(settings))["sparse"]
        name = (f"Qdrant sparse + IDF (k1={settings.k1}, b={settings.b}, "
                f"avg_len={settings.avg_len:g}, stemmed)")
        result["rankings"][name] = {**evaluate_run(data.qrels, run),
                                    "seconds": round(time.perf_counter() - start, 2)}
    write_json(args.output, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
