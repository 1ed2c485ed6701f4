"""Distilling on documents alone, judged on questions the distiller never saw.

    python benchmarks/docs_only.py --corpora scifact dbpedia quickstart \
        --variant 'default=' --variant 'no-teacher-imitation=--ci-weight 0 ...'

For each corpus (``docs_only_data.py``) and each variant, ``d2llm-rag distill --corpus DOCS``
runs with no judged query (the teacher writes queries; the variant's options are added), then
the judged questions search the corpus. Beside every student, the same rows for the starting
encoder untrained (all-MiniLM-L6-v2 as it ships) and for BM25 alone:

- ``bm25``: the product's BM25 (Qdrant's sparse vectors, scored as Qdrant scores them);
- ``dense``: cosine over the student's vectors;
- ``hybrid``: both top 100s fused by reciprocal rank (Qdrant's hybrid query);
- ``hybrid_default``: those candidates rescored by the default fusion (cosine + 0.5 BM25);
- ``dense_rescored``, ``hybrid_rescored``: rescored by the fusion the student recorded (the
  product's ranking).

Rankings are computed in memory as the retriever ranks (``docs_only_rank.py``); with
``--store`` the students' rows are measured again through ``D2LLMVectorStore`` +
``D2LLMRetriever`` on an embedded Qdrant. Results go to ``--output`` (JSON) with every
command. Needs ../shared/data; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_only_data import CORPORA, Benchmark, load_benchmark  # noqa: E402
from docs_only_rank import Corpus, paired, rank, score  # noqa: E402

ROWS_SHOWN = ("bm25", "dense", "hybrid", "hybrid_default", "dense_rescored", "hybrid_rescored")


def passages_for(benchmark: Benchmark, student) -> tuple[list[str], list[str]]:
    """The passages ``distill`` makes of the corpus for this student (same split, same ids)."""
    from llama_index_d2llm.trainer.config import DistillConfig
    from llama_index_d2llm.trainer.distill import load_inputs

    config = DistillConfig(corpus=str(benchmark.corpus), student=student.config.backbone,
                           max_passage_length=student.config.max_passage_length,
                           show_progress=False)
    passages, _, _ = load_inputs(config)
    return [p.id for p in passages], [p.text for p in passages]


def encode_cached(student, texts: list[str], kind: str, cache: Path) -> torch.Tensor:
    """The student's vectors of ``texts``, kept in ``cache`` (keyed by its fingerprint)."""
    import hashlib

    key = hashlib.sha256(("\n".join(texts) + kind + student.fingerprint).encode()).hexdigest()
    path = cache / f"{kind}-{key[:20]}.pt"
    if path.exists():
        return torch.load(path)
    vectors = student.encode(texts, kind, batch_size=32)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(vectors, path)
    return vectors


def evaluate_student(student, benchmark: Benchmark, cache: Path,
                     corpora: dict[tuple, tuple], through_store: bool = False) -> dict:
    """Every row for one student on one benchmark (first stages, and its recorded fusion);
    with ``through_store`` the same rows again through the store and the retriever."""
    key = (benchmark.name, student.config.backbone, student.config.max_passage_length)
    if key not in corpora:
        ids, texts = passages_for(benchmark, student)
        benchmark.judge_passages(ids)
        corpora[key] = (Corpus.build(ids, texts, benchmark.queries), benchmark.qrels)
    corpus, qrels = corpora[key]
    passage_vectors = encode_cached(student, corpus.texts, "passage", cache)
    query_vectors = encode_cached(student, [benchmark.queries[q] for q in corpus.query_ids],
                                  "query", cache)
    fusions = {stage: student.fusion(stage) for stage in ("dense", "hybrid")}

    def iem(query: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        return student.score(query, passages)

    runs = rank(corpus, query_vectors, passage_vectors, iem=iem, fusions=fusions)
    results = score(runs, qrels, benchmark.answer_files)
    results["fusion"] = {s: (None if f is None else f.to_dict()) for s, f in fusions.items()}
    results["passages"] = len(corpus.ids)
    if through_store:
        from docs_only_store import store_runs

        queries = {q: benchmark.queries[q] for q in corpus.query_ids}
        runs = store_runs(student, corpus.ids, corpus.texts, queries, passage_vectors,
                          query_vectors)
        seconds = runs.pop("seconds")
        results["store"] = score(runs, qrels, benchmark.answer_files)
        results["store"]["seconds"] = seconds
    return results


def distill(corpus: Path, output: Path, work: Path, options: str, log: Path) -> dict:
    """``d2llm-rag distill`` once (skipped when the student exists); its command and time."""
    command = [sys.executable, "-m", "llama_index_d2llm.trainer.cli", "distill",
               "--corpus", str(corpus), "--output", str(output), "--work-dir", str(work),
               "--no-progress", *shlex.split(options)]
    record = {"command": shlex.join(command)}
    if not (output / "d2llm_config.json").exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("w") as out:
            status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
        if status:
            raise SystemExit(f"distill failed ({status}); see {log}")
        record["seconds"] = round(time.perf_counter() - start, 1)
    summary = json.loads((output / "training_summary.json").read_text())
    record["training"] = {k: summary["training"].get(k) for k in
                          ("steps", "best_step", "best_metric", "start_metric", "kept_start")}
    record["timings"] = summary.get("timings", {})
    return record


def summarise(results: dict) -> dict:
    """Means without the per-query values, for printing and the JSON's summary."""
    out = {}
    for row in ROWS_SHOWN:
        if row in results:
            entry = results[row]
            out[row] = {k: entry[k] for k in ("ndcg@10", "file@1", "file@3") if k in entry}
    if "store" in results:
        out["store"] = summarise(results["store"])
        out["store"]["seconds"] = results["store"]["seconds"]
    return out


def compare(results: dict, baseline: dict) -> dict:
    """The student's product ranking against the untrained encoder's and BM25, per query
    (through the store when it was measured there: the untrained encoder's hybrid rescored
    by the default fusion, the student's by its own)."""
    if "store" in results and "store" in baseline:
        results, baseline = results["store"], baseline["store"]
        baseline = {**baseline, "hybrid_default": baseline["hybrid_rescored"]}
    mine = results["hybrid_rescored"]["per_query"]
    return {other: dict(zip(("mean", "se"), paired(mine, baseline[other]["per_query"]),
                            strict=True))
            for other in ("hybrid_default", "bm25")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/docs-only"))
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--distill-args", default="", help="options every variant gets")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS")
    parser.add_argument("--starting-encoder", default="minilm")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--store", action="store_true", help=(
        "also measure every row through D2LLMVectorStore + D2LLMRetriever on the embedded "
        "store (the figures to report)"))
    args = parser.parse_args(argv)

    from llama_index_d2llm.student import D2LLMStudent

    work = args.work.resolve()
    output = args.output or work / "docs-only.json"
    report: dict = json.loads(output.read_text()) if output.exists() else {}
    report.setdefault("commands", {})["benchmark"] = shlex.join(sys.argv)
    corpora: dict = {}
    untrained = D2LLMStudent.from_backbone(args.starting_encoder, lora=None)
    for name in args.corpora:
        benchmark = load_benchmark(name)
        base = evaluate_student(untrained, benchmark, work / "vectors", corpora, args.store)
        entry = report.setdefault(name, {})
        entry["untrained"] = summarise(base)
        print(f"{name}: untrained {args.starting_encoder}: {entry['untrained']}", flush=True)
        for spec in args.variant:
            variant, options = spec.split("=", 1)
            student_dir = work / name / variant
            log = work / "logs" / f"{name}-{variant}.log"
            record = distill(benchmark.corpus, student_dir, work / name / "work",
                             f"{args.distill_args} {options}", log)
            student = D2LLMStudent.from_pretrained(student_dir)
            results = evaluate_student(student, benchmark, work / "vectors", corpora,
                                       args.store)
            entry[variant] = {"distill": record, "rows": summarise(results),
                              "fusion": results["fusion"], "vs": compare(results, base)}
            print(f"{name}: {variant}: {entry[variant]['rows']} vs {entry[variant]['vs']} "
                  f"fusion {results['fusion']} {record['training']}", flush=True)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=1) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    _print_table(report, args.corpora)
    return report


def _print_table(report: dict, corpora: list[str]) -> None:
    for name in corpora:
        print(f"\n{name}")
        for variant, entry in report.get(name, {}).items():
            rows = entry if variant == "untrained" else entry.get("rows", {})
            cells = " ".join(f"{row} {rows[row]['ndcg@10']:.4f}" for row in ROWS_SHOWN
                             if row in rows)
            print(f"  {variant:<24} {cells}")


if __name__ == "__main__":
    main()
