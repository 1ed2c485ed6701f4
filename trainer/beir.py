"""A BEIR data set read for evaluation: corpus, the queries of a split and their judgements."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from llama_index_d2llm.trainer.corpus import Passage, load_corpus
from llama_index_d2llm.trainer.runs import EvaluationError, Qrels


@dataclass
class BeirData:
    corpus: list[Passage]
    queries: dict[str, str]
    qrels: Qrels


#: The score column's name in a qrels header line ("query-id corpus-id score" in BEIR); any
#: other word there is a score that is not a number.
QRELS_SCORE_HEADERS = frozenset({"score", "label", "relevance", "rel"})


def qrels_score(text: str, line_number: int) -> float | None:
    """A qrels line's score, or None for a header line; a ValueError saying so for anything
    that is not a finite number (a first line "q1 d1 abc" was taken for a header, and NaN
    made a judged passage silently irrelevant)."""
    try:
        value = float(text)
    except ValueError:
        if line_number == 1 and text.strip().lower() in QRELS_SCORE_HEADERS:
            return None
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"score {text!r} is not a number (0 for not relevant, 1 or more for "
                         "relevant)")
    return value


def read_qrels(path: str | Path) -> Qrels:
    """BEIR/TREC qrels: ``query-id corpus-id score`` (TAB separated, optional header)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"qrels file {str(path)!r} does not exist: a BEIR data set has "
                              "qrels/{split}.tsv; check --split")
    qrels: Qrels = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t") if "\t" in line else line.split()
        if not fields or not line.strip():
            continue
        if len(fields) == 4:  # TREC: query 0 doc score
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3:
            raise EvaluationError(f"{path}:{number} has {len(fields)} fields; a qrels line is "
                                  "'query-id<TAB>corpus-id<TAB>score'")
        try:
            score = qrels_score(fields[2], number)
        except ValueError as exc:
            raise EvaluationError(f"{path}:{number}: {exc}; fix that line") from None
        if score is not None:
            qrels.setdefault(fields[0].strip(), {})[fields[1].strip()] = int(score)
    return qrels


def load_beir(data_dir: str | Path, split: str = "test") -> BeirData:
    """Corpus, queries of the split, and its judgements from a BEIR folder."""
    data_dir = Path(data_dir).expanduser()
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (data_dir / name).is_file():
            present = sorted(p.stem for p in (data_dir / "qrels").glob("*.tsv"))
            hint = f" (qrels present: {present})" if present else ""
            raise EvaluationError(f"{str(data_dir / name)!r} is missing: --data must be a BEIR "
                                  f"folder with corpus.jsonl, queries.jsonl and qrels/{split}"
                                  f".tsv{hint}")
    qrels = read_qrels(data_dir / "qrels" / f"{split}.tsv")
    corpus = load_corpus(data_dir / "corpus.jsonl")
    known = {p.id for p in corpus}
    unknown = sorted({d for docs in qrels.values() for d in docs if d not in known})
    if unknown:
        raise EvaluationError(f"qrels/{split}.tsv names {len(unknown)} documents missing from "
                              f"corpus.jsonl (e.g. {unknown[:3]}): the files are not one data set")
    queries: dict[str, str] = {}
    for number, line in enumerate((data_dir / "queries.jsonl").read_text(
            encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EvaluationError(f"{data_dir / 'queries.jsonl'}:{number} is not JSON ({exc})"
                                  ) from None
        query_id = str(record.get("_id", record.get("id", "")))
        if query_id in qrels and str(record.get("text", "")).strip():
            queries[query_id] = str(record["text"]).strip()
    if not queries:
        raise EvaluationError(f"no query of queries.jsonl has judgements in qrels/{split}.tsv")
    return BeirData(corpus, queries, {q: qrels[q] for q in queries})
