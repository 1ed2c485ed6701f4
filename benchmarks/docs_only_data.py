"""The held-out corpora of the documents-only benchmark, with the questions that judge them.

Three corpora a student is distilled on without any judged query (``d2llm-rag distill
--corpus DOCS``), each judged afterwards by questions the distiller never saw:

- ``scifact``: the SciFact corpus (5,183 abstracts), judged by all 809 claims;
- ``dbpedia``: ``dbpedia-mini`` (5,000 entity abstracts), judged by its 40 judged queries
  (grades 1 and 2);
- ``quickstart``: the quickstart's own sample corpus (41 standard-library pages), judged by
  ``benchmarks/data/quickstart_questions.jsonl``: 55 questions written for this benchmark
  (not the chatbot benchmark's), each with the file that answers it. Every chunk of that file
  counts as relevant, and the figure a user sees is whether the answering file comes first.

Needs ../shared/data for the first two; a benchmark, not a test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
QUICKSTART_CORPUS = ROOT / "examples" / "sample_corpus" / "python_stdlib"
QUICKSTART_QUESTIONS = ROOT / "benchmarks" / "data" / "quickstart_questions.jsonl"
CORPORA = ("scifact", "dbpedia", "quickstart")


@dataclass
class Benchmark:
    """A corpus and its judged questions. ``corpus`` is what ``distill --corpus`` reads."""

    name: str
    corpus: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    #: quickstart: the file that answers each question (judged at file level)
    answer_files: dict[str, str] = field(default_factory=dict)

    def judge_passages(self, passage_ids: list[str]) -> None:
        """File-judged benchmarks: every chunk of the answering file is relevant."""
        if not self.answer_files:
            return
        by_file: dict[str, list[str]] = {}
        for pid in passage_ids:
            by_file.setdefault(pid.split("#", 1)[0], []).append(pid)
        self.qrels = {q: dict.fromkeys(by_file.get(f, []), 1)
                      for q, f in self.answer_files.items()}


def _beir_queries(folder: Path, qrels_file: str) -> tuple[dict[str, str], dict]:
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / qrels_file).read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    qrels = {q: docs for q, docs in qrels.items() if any(s > 0 for s in docs.values())}
    queries = {}
    for line in (folder / "queries.jsonl").read_text().splitlines():
        record = json.loads(line)
        if str(record["_id"]) in qrels:
            queries[str(record["_id"])] = record["text"]
    return queries, qrels


def load_benchmark(name: str) -> Benchmark:
    if name == "scifact":
        folder = SHARED / "scifact"
        queries, qrels = _beir_queries(folder, "train.tsv")
        return Benchmark(name, folder / "corpus.jsonl", queries, qrels)
    if name == "dbpedia":
        folder = SHARED / "dbpedia-mini"
        queries, qrels = _beir_queries(folder, "test.tsv")
        return Benchmark(name, folder / "corpus.jsonl", queries, qrels)
    if name == "quickstart":
        records = [json.loads(line) for line in QUICKSTART_QUESTIONS.read_text().splitlines()]
        return Benchmark(name, QUICKSTART_CORPUS, {r["id"]: r["text"] for r in records}, {},
                         {r["id"]: r["file"] for r in records})
    raise ValueError(f"unknown corpus {name!r}: one of {CORPORA}")
