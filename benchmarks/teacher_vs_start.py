"""Does the teacher know more than the starting encoder on real questions?

    python benchmarks/teacher_vs_start.py --corpora scifact dbpedia quickstart --queries 100 \
        --depth 20 --output benchmarks/results/teacher-vs-start-cpu.json

The distiller's own check (``trainer/teacher_check.py``) compares the teacher with the starting
encoder on generated dev queries, which the teacher wrote from their passages and so favour it.
This benchmark asks the same question on the judged questions of the documents-only benchmark
(``docs_only_data.py``), which nobody generated: each question's first ``--depth`` candidates
from the untrained encoder's hybrid (cosine + 0.5 BM25 over the RRF top 100, the product's
default ranking) are reordered by the teacher's score alone and by the teacher's standardised
score added to the hybrid's, and nDCG@10 is compared, paired per question. A teacher that does
not beat the default ranking here cannot teach a student to beat it: that is the ceiling of
what imitating it can give on this corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_only import passages_for  # noqa: E402
from docs_only_data import CORPORA, load_benchmark  # noqa: E402
from docs_only_rank import Corpus, paired, rank, score  # noqa: E402


def _standardised(values: dict[str, float]) -> dict[str, float]:
    numbers = torch.tensor(list(values.values()), dtype=torch.float64)
    spread = float(numbers.std()) if len(numbers) > 1 else 0.0
    mean = float(numbers.mean())
    return {k: (v - mean) / (spread or 1.0) for k, v in values.items()}


def rerank_corpus(name: str, teacher, encoder: str, queries: int, depth: int, seed: int
                  ) -> dict:
    from llama_index_d2llm.student import D2LLMStudent

    benchmark = load_benchmark(name)
    student = D2LLMStudent.from_backbone(encoder, lora=None)
    ids, texts = passages_for(benchmark, student)
    benchmark.judge_passages(ids)
    chosen = sorted(q for q in benchmark.qrels if q in benchmark.queries)
    if len(chosen) > queries:
        chosen = sorted(random.Random(seed).sample(chosen, queries))
    corpus = Corpus.build(ids, texts, {q: benchmark.queries[q] for q in chosen})
    with torch.no_grad():
        passage_vectors = student.encode(texts, "passage", batch_size=32)
        query_vectors = student.encode([benchmark.queries[q] for q in chosen], "query")
    hybrid = rank(corpus, query_vectors, passage_vectors)["hybrid_default"]
    top = {q: dict(sorted(hybrid[q].items(), key=lambda kv: -kv[1])[:depth]) for q in chosen}
    text_of = dict(zip(ids, texts, strict=True))
    pairs = [(q, pid) for q in chosen for pid in top[q]]
    start = time.perf_counter()
    logits = teacher.score([benchmark.queries[q] for q, _ in pairs],
                           [text_of[pid] for _, pid in pairs], task="asymmetric",
                           show_progress=True).logits
    seconds = time.perf_counter() - start
    teacher_run: dict[str, dict[str, float]] = {}
    for (q, pid), logit in zip(pairs, logits.tolist(), strict=True):
        teacher_run.setdefault(q, {})[pid] = logit
    both = {}
    for q in chosen:
        a, b = _standardised(top[q]), _standardised(teacher_run[q])
        both[q] = {pid: a[pid] + b[pid] for pid in top[q]}
    runs = {"hybrid_default": top, "teacher": teacher_run, "hybrid_plus_teacher": both}
    qrels = {q: benchmark.qrels[q] for q in chosen}  # a question left out must not count 0
    results = score(runs, qrels, {q: benchmark.answer_files[q] for q in chosen
                                  if q in benchmark.answer_files})
    out = {row: {k: v for k, v in entry.items() if k != "per_query"}
           for row, entry in results.items()}
    for row in ("teacher", "hybrid_plus_teacher"):
        mean, se = paired(results[row]["per_query"], results["hybrid_default"]["per_query"])
        out[row]["vs_hybrid_default"] = {"mean": mean, "se": se}
    out["questions"], out["pairs"] = len(chosen), len(pairs)
    out["teacher_pairs_per_s"] = round(len(pairs) / seconds, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--queries", type=int, default=100, help="judged questions per corpus")
    parser.add_argument("--depth", type=int, default=20, help="candidates the teacher reorders")
    parser.add_argument("--teacher", default=None,
                        help="a causal LM folder (default: the offline Gemma 3 270M)")
    parser.add_argument("--teacher-max-length", type=int, default=128)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("runs/teacher-vs-start-cache"),
                        help="the teacher's scores, kept so that a rerun costs nothing")
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/teacher-vs-start-cpu.json"))
    args = parser.parse_args(argv)

    from llama_index_d2llm.trainer.teacher import Teacher, TeacherConfig

    teacher = Teacher.from_pretrained(
        args.teacher, config=TeacherConfig(max_length=args.teacher_max_length),
        device=torch.device("cpu"), dtype="auto", cache_dir=args.cache)
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"command": f"python benchmarks/teacher_vs_start.py {command}"}
    for name in args.corpora:
        report[name] = rerank_corpus(name, teacher, args.encoder, args.queries, args.depth,
                                     args.seed)
        print(name, json.dumps(report[name]), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
