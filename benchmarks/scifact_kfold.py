"""SciFact k-fold benchmark: every figure is a mean over held-out folds of the 809 claims.

    python benchmarks/scifact_kfold.py --work runs/kfold                    # distil + evaluate
    python benchmarks/scifact_kfold.py --work runs/kfold --stage eval       # evaluate only

81 dev claims move nDCG@10 by 0.05 between seeds, so a decision taken on one split is noise.
Here the 809 claims are split into ``--folds`` folds (seeded); for each fold and each variant
a student is distilled with ``d2llm-rag distill`` on the other folds (the distiller holds
10% of those out for its own dev ranking: early stopping and the rescoring's fusion), then the
fold is searched as a user's ``D2LLMRetriever`` searches it: through a real local Qdrant
collection (dense vectors + BM25 sparse vectors), dense or hybrid, each rescored with the
fusion the student recorded, beside the first stage's own order and the IEM's alone.
The folds' figures are written to WORK/kfold.json with their mean and standard deviation.

``--docs-only NAME=OPTIONS`` also distils one student from the corpus alone (generated
queries, how most users distil) and evaluates it on all 809 claims.

All distillations share one work directory, so the teacher's scores and the backbone's token
states are computed once. Needs ../shared/data/scifact; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
#: The README's CPU flags; the teacher's prompt length is the distiller's CPU default (128).
CPU_DISTILL_ARGS = ("--num-negatives 3 --num-easy-negatives 1 --max-passage-length 128 "
                    "--max-query-length 64 --epochs 10 --batch-size 16 --dtype bfloat16")
LABELS_ONLY = "--ci-weight 0 --pearson-weight 0 --pairwise-weight 0 --feature-weight 0"
METRICS = ("ndcg@10", "recall@100")


def read_claims(data: Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The judged claims and their qrels."""
    from llama_index_d2llm.trainer.evaluation import read_qrels

    qrels = read_qrels(data / "qrels" / "train.tsv")
    queries = {}
    for line in (data / "queries.jsonl").read_text().splitlines():
        record = json.loads(line)
        if str(record["_id"]) in qrels:
            queries[str(record["_id"])] = record["text"]
    return queries, qrels


def write_fold(data: Path, target: Path, queries: dict[str, str],
               qrels: dict[str, dict[str, int]], held_out: set[str]) -> Path:
    """A BEIR folder: qrels/train.tsv holds the other folds, qrels/test.tsv this one."""
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    link = target / "corpus.jsonl"
    if not link.exists():
        link.symlink_to((data / "corpus.jsonl").resolve())
    with (target / "queries.jsonl").open("w") as out:
        for query_id, text in queries.items():
            out.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for name, keep in (("train", lambda q: q not in held_out), ("test", lambda q: q in held_out)):
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{q}\t{d}\t{s}" for q in sorted(qrels) if keep(q) for d, s in qrels[q].items()]
        (target / "qrels" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return target


def folds_of(query_ids: list[str], folds: int, seed: int) -> list[set[str]]:
    shuffled = sorted(query_ids)
    random.Random(seed).shuffle(shuffled)
    return [set(shuffled[i::folds]) for i in range(folds)]


def distill_student(work: Path, fold_dir: Path | None, corpus: Path, name: str,
                    options: str, seed: int) -> dict:
    """``d2llm-rag distill`` once (skipped when the student exists); returns its command."""
    student = work / "students" / name
    command = [sys.executable, "-m", "llama_index_d2llm.trainer.cli", "distill",
               "--corpus", str(corpus), "--output", str(student),
               "--work-dir", str(work / "distill"), "--seed", str(seed), "--no-progress"]
    if fold_dir is not None:
        command += ["--queries", str(fold_dir / "queries.jsonl"),
                    "--qrels", str(fold_dir / "qrels" / "train.tsv")]
    command += shlex.split(options)
    record = {"student": str(student), "distill_command": shlex.join(command)}
    if not (student / "d2llm_config.json").exists():
        from scifact import run_command  # beside this script

        (work / "logs").mkdir(parents=True, exist_ok=True)
        record["distill_seconds"] = run_command(command, work / "logs" / f"distill-{name}.log")
    return record


def save(work: Path, updates: dict) -> None:
    from llama_index_d2llm.trainer.cache import atomic_write_json

    path = work / "kfold.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_json(path, summary | updates)


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "folds": values}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kfold"))
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--distill-args", default=CPU_DISTILL_ARGS)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="a student per fold: a name and options added to --distill-args "
                             "(repeatable; default: 'default=' and 'labels=<imitation off>')")
    parser.add_argument("--docs-only", action="append", default=[], metavar="NAME=OPTIONS",
                        help="a student distilled from the corpus alone (generated queries), "
                             "evaluated on all claims")
    parser.add_argument("--stage", choices=("distill", "eval", "all"), default="all")
    parser.add_argument("--latency-queries", type=int, default=100)
    args = parser.parse_args(argv)

    work = args.work.resolve()
    queries, qrels = read_claims(args.data)
    folds = folds_of(sorted(queries), args.folds, args.seed)
    variants = [v.split("=", 1) for v in args.variant] or [["default", ""],
                                                           ["labels", LABELS_ONLY]]
    save(work, {"settings": {"folds": args.folds, "seed": args.seed, "data": str(args.data),
                             "distill_args": args.distill_args,
                             "variants": dict(variants),
                             "docs_only": dict(v.split("=", 1) for v in args.docs_only)}})
    corpus = args.data / "corpus.jsonl"
    jobs = []
    for number, held_out in enumerate(folds):
        fold_dir = write_fold(args.data, work / "folds" / f"fold{number}", queries, qrels,
                              held_out)
        for name, options in variants:
            jobs.append((f"{name}-fold{number}", fold_dir, held_out,
                         f"{args.distill_args} {options}"))
    for name, options in (v.split("=", 1) for v in args.docs_only):
        jobs.append((f"{name}-docs", None, set(queries), f"{args.distill_args} {options}"))
    if args.stage in ("distill", "all"):
        for name, fold_dir, _, options in jobs:
            record = distill_student(work, fold_dir, corpus, name, options, args.seed)
            save(work, {f"distill:{name}": record})
    if args.stage in ("eval", "all"):
        from kfold_eval import evaluate_jobs  # noqa: I001 - beside this script

        evaluate_jobs(work, args.data, queries, qrels, jobs, variants,
                      [v.split("=", 1)[0] for v in args.docs_only], args.latency_queries)
    return json.loads((work / "kfold.json").read_text())


if __name__ == "__main__":
    main()
