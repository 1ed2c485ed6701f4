"""Symmetric sentence pairs (STS, NLI) for the symmetric IEM branch, scores mapped to [0, 1].

Two interchangeable statements instead of a query and a passage: STS Benchmark files, NLI
files (labels as graded relevance), or any JSONL/TSV/CSV with named or two/three columns.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_index_d2llm.trainer.corpus import read_jsonl
from llama_index_d2llm.trainer.queries import QueryError

# NLI labels as graded relevance. Entailment: the hypothesis holds given the premise (1).
# Contradiction: it cannot (0). Neutral: same scene, not implied; "absolutely correct" in the
# paper's symmetric prompt fails, but it is closer than a contradiction, so 0.5. Select
# positives with score == 1 and take contradictions as the hard negatives.
NLI_LABEL_SCORES: dict[str, float] = {
    "entailment": 1.0, "0": 1.0, "neutral": 0.5, "1": 0.5, "contradiction": 0.0, "2": 0.0,
}
STS_MAX_SCORE = 5.0
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("text_a", "text_b"),
                 ("query", "passage"), ("anchor", "positive"))
_SCORE_COLUMNS = ("score", "label", "similarity", "gold_label", "relevance")


@dataclass
class SymmetricPair:
    """Two interchangeable statements and, when known, their relevance in [0, 1]."""

    text_a: str
    text_b: str
    score: float | None = None


def load_pairs(path: str | Path) -> list[SymmetricPair]:
    """Sentence pairs from JSONL, TSV or CSV, with the score mapped to [0, 1].

    Recognised: STS Benchmark files (tab separated, unquoted: genre, file, year, id, score,
    sentence1, sentence2[, extra fields ignored]; score 0-5 divided by 5); NLI files (premise,
    hypothesis, label; see ``NLI_LABEL_SCORES``); files with a header naming the columns
    (sentence1/sentence2/score, premise/hypothesis/label, text_a/text_b, ...); and headerless
    two-column (score unknown) or three-column (a, b, score) files.
    """
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"the pair file {str(path)!r} does not exist: pass a .tsv, .csv or "
                         ".jsonl file of sentence pairs")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [(number, record) for number, record in read_jsonl(path, QueryError)]
        pairs = [_pair_from_record(record, path, number) for number, record in rows]
    else:
        pairs = _pairs_from_delimited(path)
    pairs = [pair for pair in pairs if pair is not None]
    if not pairs:
        raise QueryError(f"{path} has no usable sentence pairs: check its format (see "
                         "load_pairs' documentation)")
    return _scale_scores(pairs, path)


def _pair_from_record(record: dict, path: Path, number: int) -> SymmetricPair | None:
    for first, second in _PAIR_COLUMNS:
        if first in record and second in record:
            score_key = next((k for k in _SCORE_COLUMNS if k in record), None)
            return _make_pair(record[first], record[second],
                              None if score_key is None else record[score_key],
                              score_key, path, number)
    raise QueryError(
        f"{path}:{number} has fields {sorted(record)}: a pair needs sentence1/sentence2 "
        "(+ score), premise/hypothesis (+ label) or text_a/text_b (+ score)"
    )


def _make_pair(text_a: Any, text_b: Any, raw_score: Any, score_name: str | None, path: Path,
               number: int) -> SymmetricPair | None:
    text_a, text_b = str(text_a or "").strip(), str(text_b or "").strip()
    if not text_a or not text_b:
        return None
    if raw_score is None or str(raw_score).strip() == "":
        return SymmetricPair(text_a, text_b, None)
    label = str(raw_score).strip().lower()
    # "0"/"1"/"2" are NLI class ids only in a label column; elsewhere they are STS scores.
    is_nli = not _is_number(label) or (score_name in ("label", "gold_label")
                                       and label in ("0", "1", "2", "-1"))
    if is_nli:
        if label in ("-", "-1"):  # no gold label
            return None
        if label not in NLI_LABEL_SCORES:
            raise QueryError(f"{path}:{number}: unknown NLI label {raw_score!r}; use entailment/"
                             "neutral/contradiction or 0/1/2")
        return SymmetricPair(text_a, text_b, NLI_LABEL_SCORES[label])
    score = float(label)  # a number: _is_number said so
    if not math.isfinite(score):
        raise QueryError(f"{path}:{number}: score {raw_score!r} is not a finite number; fix "
                         "that line")
    return SymmetricPair(text_a, text_b, score)


def _pairs_from_delimited(path: Path) -> list[SymmetricPair | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QueryError(f"cannot read {str(path)!r} ({exc}): it must be UTF-8 text") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    first = lines[0].split("\t")
    if len(first) >= 7 and _is_number(first[4]):  # STS Benchmark: unquoted, score in column 5
        return [_make_pair(*_sts_fields(line, path, n), "score", path, n)
                for n, line in enumerate(lines, start=1)]
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    header = [cell.strip().lower() for cell in rows[0]]
    for first_name, second_name in _PAIR_COLUMNS:
        if first_name in header and second_name in header:
            a, b = header.index(first_name), header.index(second_name)
            s = next((header.index(k) for k in _SCORE_COLUMNS if k in header), None)
            name = None if s is None else header[s]
            return [_make_pair(row[a], row[b], None if s is None else row[s], name, path, n)
                    for n, row in enumerate(rows[1:], start=2) if len(row) > max(a, b)]
    if len(rows[0]) not in (2, 3):
        raise QueryError(
            f"{path}: rows have {len(rows[0])} columns and no header naming them: write a header "
            "(sentence1, sentence2, score) or use two or three columns (a, b[, score])"
        )
    return [_make_pair(row[0], row[1], row[2] if len(row) > 2 else None, None, path, n)
            for n, row in enumerate(rows, start=1) if len(row) >= 2]


def _sts_fields(line: str, path: Path, number: int) -> tuple[str, str, str]:
    fields = line.split("\t")
    if len(fields) < 7:
        raise QueryError(f"{path}:{number} has {len(fields)} fields, an STS Benchmark line has "
                         "at least 7 (genre, file, year, id, score, sentence1, sentence2)")
    return fields[5], fields[6], fields[4]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _scale_scores(pairs: list[SymmetricPair], path: Path) -> list[SymmetricPair]:
    """Scores above 1 are read as STS 0-5 and divided by 5; anything else must be in [0, 1]."""
    scores = [pair.score for pair in pairs if pair.score is not None]
    if not scores:
        return pairs
    low, high = min(scores), max(scores)
    if low < 0 or high > STS_MAX_SCORE:
        raise QueryError(f"{path}: scores range from {low} to {high}; expected relevance in "
                         "[0, 1] or STS similarity in [0, 5]: rescale them")
    if high > 1:
        for pair in pairs:
            if pair.score is not None:
                pair.score = pair.score / STS_MAX_SCORE
    return pairs
