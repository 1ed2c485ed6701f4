"""SciFact quality and cost benchmark: BM25, the teacher, and the distilled student.

    python benchmarks/scifact.py --work runs/scifact

Splits SciFact's 809 train claims into train and dev (fixed seed), then on dev reports
nDCG@10 / Recall@100 / MRR@10 of
  1. BM25 (the trainer's miner, top 100);
  2. the teacher LLM reranking BM25's top 20 (ranks 21-100 keep BM25's order);
  3. the student's first stage alone (exact cosine over the whole corpus) and
  4. first stage + IEM rescoring of the top 100 (with --eval-args --hybrid-bm25, also BM25
     and the student's vectors fused by reciprocal rank, alone and rescored by the IEM),
for a student distilled with the CLI (`d2llm-rag distill`) on the train part, once with the
first-stage vector loss and once without it. It records each stage's wall time and writes
everything to WORK/summary.json. Every stage is cached under WORK, so a rerun is cheap.
Needs ../shared/data/scifact (see its README); it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def write_split(source: Path, target: Path, dev_fraction: float, seed: int) -> dict[str, int]:
    """A BEIR folder with the train qrels split into qrels/train.tsv and qrels/dev.tsv."""
    from llama_index_d2llm.trainer.corpus import load_corpus
    from llama_index_d2llm.trainer.queries import load_queries, split_queries

    corpus = load_corpus(source / "corpus.jsonl")
    queries = load_queries(source / "queries.jsonl", source / "qrels" / "train.tsv",
                           {p.id for p in corpus})
    train, dev = split_queries(queries, dev_fraction, seed)
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    link = target / "corpus.jsonl"
    if not link.exists():
        link.symlink_to((source / "corpus.jsonl").resolve())
    with (target / "queries.jsonl").open("w") as out:
        for query in queries:
            out.write(json.dumps({"_id": query.id, "text": query.text}) + "\n")
    for name, part in (("train", train), ("dev", dev)):
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{q.id}\t{doc}\t1" for q in part for doc in q.positives]
        (target / "qrels" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return {"train_queries": len(train), "dev_queries": len(dev), "corpus": len(corpus)}


def teacher_rerank(data, bm25, teacher_max_length: int, depth: int, cache: Path) -> dict:
    """Teacher scores for BM25's top ``depth``; lower BM25 ranks follow in BM25's order."""
    from llama_index_d2llm.trainer.teacher import Teacher

    teacher = Teacher.from_pretrained(None, max_length=teacher_max_length, cache_dir=cache)
    texts = {p.id: p.text for p in data.corpus}
    pairs = [(q, d) for q in sorted(data.queries)
             for d in sorted(bm25[q], key=lambda d: -bm25[q][d])[:depth]]
    start = time.perf_counter()
    scores = teacher.score([data.queries[q] for q, _ in pairs], [texts[d] for _, d in pairs],
                           show_progress=True)
    seconds = time.perf_counter() - start
    run: dict[str, dict[str, float]] = {}
    for (q, d), logit in zip(pairs, scores.logits.tolist(), strict=True):
        run.setdefault(q, {})[d] = 1000.0 + logit  # above every BM25-only rank
    for q, docs in bm25.items():
        ranked = sorted(docs, key=lambda d: -docs[d])[depth:]
        for rank, d in enumerate(ranked):
            run.setdefault(q, {})[d] = -float(rank)
    return {"run": run, "seconds": seconds, "mode": teacher.mode, "pairs": len(pairs),
            "fingerprint": teacher.fingerprint}


def run_command(command: list[str], log: Path) -> float:
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def save_summary(work: Path, updates: dict) -> None:
    """Merge ``updates`` into WORK/summary.json, re-read first: runs of other variants (even
    concurrent ones) keep their entries."""
    from llama_index_d2llm.trainer.cache import atomic_write_json

    path = work / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_json(path, summary | updates)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/scifact"))
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--dev-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--teacher-max-length", type=int, default=256)
    parser.add_argument("--teacher-depth", type=int, default=20)
    parser.add_argument("--distill-args", default=(
        "--num-negatives 3 --num-easy-negatives 1 --max-passage-length 128 "
        "--max-query-length 64 --epochs 10 --batch-size 16"),
        help="extra options for d2llm-rag distill (the CPU settings)")
    parser.add_argument("--eval-args", default="",
                        help="extra options for every d2llm-rag eval, e.g. '--hybrid-bm25 "
                             "--max-passage-length 512'")
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the second student trained without the vector loss")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="instead of the two default students, distil one per variant: "
                             "a name and the options added to --distill-args (repeatable), "
                             "e.g. 'top2=--tune-top-layers 2 --epochs 4'")
    args = parser.parse_args(argv)

    from llama_index_d2llm.trainer.evaluation import bm25_run, evaluate_run, load_beir

    work = args.work.resolve()
    split_dir = work / "data"
    summary: dict = {"settings": vars(args) | {"work": str(work), "data": str(args.data)}}
    summary["split"] = write_split(args.data, split_dir, args.dev_fraction, args.seed)
    data = load_beir(split_dir, "dev")
    metrics = ["ndcg@10", "recall@100", "mrr@10"]

    start = time.perf_counter()
    bm25 = bm25_run(data, top_k=100)
    summary["bm25"] = evaluate_run(data.qrels, bm25, metrics) | {
        "seconds": time.perf_counter() - start}
    print("BM25", summary["bm25"], flush=True)

    if not args.skip_teacher:
        teacher = teacher_rerank(data, bm25, args.teacher_max_length, args.teacher_depth,
                                 work / "teacher-dev")
        summary["teacher_rerank_bm25_top20"] = evaluate_run(data.qrels, teacher["run"],
                                                            metrics) | {
            "seconds": teacher["seconds"], "pairs": teacher["pairs"], "mode": teacher["mode"],
            "seconds_per_query": teacher["seconds"] / max(1, len(data.queries))}
        print("teacher", summary["teacher_rerank_bm25_top20"], flush=True)

    save_summary(work, summary)
    variants = [("with_vector_loss", [])]
    if not args.no_ablation:
        variants.append(("without_vector_loss", ["--vector-loss-weight", "0"]))
    if args.variant:
        variants = [(name, shlex.split(options)) for name, options
                    in (v.split("=", 1) for v in args.variant)]
    cli = [sys.executable, "-m", "llama_index_d2llm.trainer.cli"]
    for name, extra in variants:
        student = work / f"student-{name}"
        distill = cli + [
            "distill", "--corpus", str(split_dir / "corpus.jsonl"),
            "--queries", str(split_dir / "queries.jsonl"),
            "--qrels", str(split_dir / "qrels" / "train.tsv"),
            "--output", str(student), "--work-dir", str(work / "distill"),
            "--teacher-max-length", str(args.teacher_max_length), "--seed", str(args.seed),
            "--no-progress", *shlex.split(args.distill_args), *extra]
        distill_s = run_command(distill, work / f"distill-{name}.log")
        metrics_file = work / f"eval-{name}.json"
        evaluate = cli + ["eval", str(student), "--data", str(split_dir), "--split", "dev",
                          "--token-cache", str(work / "distill" / "token_states"),
                          "--output", str(metrics_file), *shlex.split(args.eval_args)]
        eval_s = run_command(evaluate, work / f"eval-{name}.log")
        result = json.loads(metrics_file.read_text())
        summary[f"student_{name}"] = {"distill_seconds": distill_s, "eval_seconds": eval_s,
                                      "distill_command": shlex.join(distill),
                                      "eval_command": shlex.join(evaluate), **result}
        training = student / "training_summary.json"
        if training.exists():
            summary[f"student_{name}"]["training_summary"] = json.loads(training.read_text())
        print(name, json.dumps(result, indent=1)[:2000], flush=True)
        save_summary(work, {f"student_{name}": summary[f"student_{name}"]})
    return summary


if __name__ == "__main__":
    main()
