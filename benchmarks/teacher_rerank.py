"""The teacher's quality against its cost, at each prompt length: what its max length buys.

    python benchmarks/teacher_rerank.py --data ../shared/data/scifact --claims 80 \
        --max-lengths 128 256 512 --output benchmarks/results/teacher-rerank-cpu.json

``--claims`` claims drawn (seeded) from the judged claims of ``--split``; for each, the product's
BM25 (Qdrant's tokenizer and IDF, ``dev_ranking.SparseBM25``) ranks the corpus and the teacher
(the offline Gemma 3 270M unless ``--teacher``) reorders its top ``--depth``, ranks below keeping
BM25's order, once per ``--max-lengths`` value (the prompt is cut in its passage). Reported per
length: nDCG@10, its paired difference against BM25 and against the first length (mean and
standard error over the claims), seconds per pair and per query (``depth`` pairs), and how many
prompts were cut. The same model serves every length, without a score cache, so each length is
timed from scratch; the lengths run in turn, so a busy machine slows them alike only if it stays
busy: run it on an idle CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Mean and standard error of the per-claim differences a - b."""
    diffs = [a[q] - b[q] for q in a]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"mean": round(statistics.fmean(diffs), 4),
            "std_err": round(spread / math.sqrt(len(diffs)), 4)}


def reranked(first_stage: dict[str, dict[str, float]], scores: dict[tuple[str, str], float],
             depth: int) -> dict[str, dict[str, float]]:
    """The teacher's order over each claim's top ``depth``, BM25's order below it."""
    run: dict[str, dict[str, float]] = {}
    for query, docs in first_stage.items():
        ranked = sorted(docs, key=lambda d: -docs[d])
        run[query] = {d: 1000.0 + scores[query, d] for d in ranked[:depth]}
        run[query].update({d: -float(rank) for rank, d in enumerate(ranked[depth:])})
    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--split", default="train", help="qrels split whose claims are drawn")
    parser.add_argument("--claims", type=int, default=80)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--teacher", default=None, help="default: the offline Gemma 3 270M")
    parser.add_argument("--batch-size", type=int, default=8, help="the teacher's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    from llama_index_d2llm.trainer.dev_ranking import SparseBM25
    from llama_index_d2llm.trainer.evaluation import evaluate_run, load_beir
    from llama_index_d2llm.trainer.teacher import Teacher

    data = load_beir(args.data, split=args.split)
    claims = sorted(random.Random(args.seed).sample(sorted(data.queries), args.claims))
    qrels = {q: data.qrels[q] for q in claims}
    texts = {p.id: p.text for p in data.corpus}
    index = SparseBM25([p.text for p in data.corpus])
    ids = [p.id for p in data.corpus]
    first_stage: dict[str, dict[str, float]] = {}
    for query in claims:
        first_stage[query] = {ids[row]: float(score)
                              for row, score in index.search(data.queries[query], 100)}
    bm25 = evaluate_run(qrels, first_stage, ["ndcg@10"], per_query=True)
    pairs = [(q, d) for q in claims
             for d in sorted(first_stage[q], key=lambda d: -first_stage[q][d])[:args.depth]]

    loaded = Teacher.from_pretrained(args.teacher, dtype=args.dtype, batch_size=args.batch_size)
    runs, baseline = [], None
    for length in args.max_lengths:
        teacher = Teacher(loaded.model, loaded.tokenizer, name=loaded.name, config=loaded.config,
                          max_length=length)
        template = teacher.templates["asymmetric"]
        encoded = [teacher._encode(template, data.queries[q], texts[d]) for q, d in pairs]
        teacher.score(*zip(*[(data.queries[q], texts[d]) for q, d in pairs[:args.batch_size]],
                           strict=True))  # warm-up: one batch
        start = time.perf_counter()
        scores = teacher.score([data.queries[q] for q, _ in pairs], [texts[d] for _, d in pairs])
        seconds = time.perf_counter() - start
        by_pair = dict(zip(pairs, scores.logits.tolist(), strict=True))
        result = evaluate_run(qrels, reranked(first_stage, by_pair, args.depth), ["ndcg@10"],
                              per_query=True)
        per_query = result["per_query"]["ndcg@10"]
        baseline = baseline or per_query
        runs.append({
            "max_length": length, "ndcg@10": round(result["ndcg@10"], 4),
            "vs_bm25": paired(per_query, bm25["per_query"]["ndcg@10"]),
            f"vs_max_length_{args.max_lengths[0]}": paired(per_query, baseline),
            "seconds": round(seconds, 1), "seconds_per_pair": round(seconds / len(pairs), 4),
            "pairs_per_s": round(len(pairs) / seconds, 2),
            "ms_per_query": round(1000 * seconds / len(claims)),
            "mean_prompt_tokens": round(statistics.fmean(len(e.ids) for e in encoded), 1),
            "truncated_prompts": sum(e.truncated for e in encoded),
        })
        print(json.dumps(runs[-1]), flush=True)
    summary = {
        "command": "python benchmarks/teacher_rerank.py " + " ".join(argv or []),
        "teacher": loaded.name, "mode": loaded.mode, "dtype": str(loaded.dtype),
        "claims": len(claims), "depth": args.depth, "pairs": len(pairs), "seed": args.seed,
        "bm25": {"ndcg@10": round(bm25["ndcg@10"], 4)}, "runs": runs,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
