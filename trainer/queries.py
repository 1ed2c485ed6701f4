"""Stage 2: queries with their positive passages.

Distillation needs queries. A BEIR data set brings them (``queries.jsonl`` + qrels); a user with
only documents has none, so the teacher LLM writes them (``generate_queries``: one query per
passage, the passage is its positive; the LM's side is ``generation.py``). Symmetric tasks
(STS, NLI) come as sentence pairs (``pairs.py``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.student.files import atomic_write_text
from llama_index_d2llm.trainer.beir import qrels_score
from llama_index_d2llm.trainer.cache import content_key
from llama_index_d2llm.trainer.corpus import Passage, read_jsonl
from llama_index_d2llm.trainer.prompts import (
    GENERATION_EXAMPLES,
    GENERATION_PASSAGE_PREFIX,
    GENERATION_QUERY_PREFIX,
    generation_prefix,
)

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm.trainer.teacher import Teacher

logger = logging.getLogger(__name__)

GENERATION_VERSION = "generate-queries-v2"
GENERATED_PREFIX = "gen:"
#: Ids of queries made from a passage's title or heading (``headings.py``).
HEADING_PREFIX = "head:"  # v1 could cut the few-shot examples off
#: Moved to ``pairs.py``; still importable from here.
_PAIR_NAMES = frozenset({"NLI_LABEL_SCORES", "STS_MAX_SCORE", "SymmetricPair", "load_pairs"})


class QueryError(D2LLMError, ValueError):
    """Query, qrels or pair files that cannot be used; the message says what to change."""


@dataclass
class Query:
    """A query and the ids of the passages that answer it."""

    id: str
    text: str
    positives: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- BEIR queries
def load_queries(queries_path: str | Path, qrels_path: str | Path,
                 passage_ids: Collection[str]) -> list[Query]:
    """BEIR queries (``_id``, ``text``) joined with qrels (``query-id corpus-id score``).

    A qrels score above 0 makes a positive. Queries without a positive are dropped with a
    warning (an error when none has one); qrels naming a document missing from the corpus are
    an error, since they would silently teach wrong positives.
    """
    queries_path, qrels_path = Path(queries_path), Path(qrels_path)
    if queries_path.is_dir() and (queries_path / "queries.jsonl").is_file():
        queries_path = queries_path / "queries.jsonl"
    for path, what in ((queries_path, "queries file (queries.jsonl)"),
                       (qrels_path, "qrels file (e.g. qrels/train.tsv)")):
        if not path.is_file():
            raise QueryError(f"the {what} {str(path)!r} does not exist: pass the BEIR file")
    texts: dict[str, str] = {}
    empty: list[str] = []
    for number, record in read_jsonl(queries_path, QueryError):
        query_id = record.get("_id", record.get("id"))
        text = str(record.get("text") or "").strip()
        if query_id is None:
            raise QueryError(f"{queries_path}:{number} has no '_id': each line needs "
                             '{"_id": ..., "text": ...}')
        if str(query_id) in texts:
            raise QueryError(f"{queries_path}:{number} repeats query id {query_id!r}: "
                             "query ids must be unique; remove the duplicate line")
        if text:
            texts[str(query_id)] = text
        else:
            empty.append(str(query_id))
    if empty:
        logger.warning("skipping %d queries with no text in %s (e.g. %s)", len(empty),
                       queries_path, ", ".join(empty[:5]))
    positives = _read_qrels(qrels_path)
    known = passage_ids if isinstance(passage_ids, set | frozenset | dict) else set(passage_ids)
    unknown = sorted({doc for query_id, docs in positives.items() if query_id in texts
                      for doc in docs if doc not in known})
    if unknown:
        shown = ", ".join(repr(d) for d in unknown[:5])
        raise QueryError(
            f"{qrels_path} names {len(unknown)} documents that are not in the corpus ({shown}): "
            "the qrels belong to another corpus; load the corpus.jsonl of the same BEIR data set "
            "(a chunked document folder has ids like 'file.txt#0' that BEIR qrels cannot name)"
        )
    queries = [Query(query_id, text, positives[query_id])
               for query_id, text in texts.items() if positives.get(query_id)]
    without = [query_id for query_id in texts if not positives.get(query_id)]
    if not queries:
        raise QueryError(
            f"none of the {len(texts)} queries in {queries_path} has a positive (score > 0) in "
            f"{qrels_path}: pass the qrels file of the same split as the queries"
        )
    if without:
        logger.warning("dropping %d of %d queries that have no positive in %s (e.g. %s)",
                       len(without), len(texts), qrels_path, ", ".join(without[:5]))
    return queries


def _read_qrels(path: Path) -> dict[str, list[str]]:
    """query id -> positive document ids, from BEIR (3 columns) or TREC (4 columns) qrels."""
    positives: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QueryError(f"cannot read the qrels file {str(path)!r} ({exc}): check the path and "
                         "that it is UTF-8 text") from exc
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t") if "\t" in line else line.split()
        if not line.strip():
            continue
        if len(fields) not in (3, 4):
            raise QueryError(
                f"{path}:{number} has {len(fields)} fields: qrels lines are 'query-id corpus-id "
                "score' (BEIR, tab separated) or 'query-id 0 doc-id score' (TREC)"
            )
        query_id, doc_id, score = fields[0], fields[-2], fields[-1]
        try:
            value = qrels_score(score, number)
        except ValueError as exc:
            raise QueryError(f"{path}:{number}: {exc}; fix that line") from None
        if value is None:  # the header
            continue
        if value > 0:
            docs = positives.setdefault(query_id.strip(), [])
            if doc_id.strip() not in docs:
                docs.append(doc_id.strip())
    return positives


def split_queries(queries: Sequence[Query], dev_fraction: float, seed: int
                  ) -> tuple[list[Query], list[Query]]:
    """(train, dev), deterministic in the set of query ids and the seed, input order kept.

    Generated queries are split by passage: a dev query's passages are never a training
    query's positive, so the dev figure is measured on passages never trained on.
    """
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}: e.g. 0.2")
    if queries and all(is_generated(q) for q in queries):
        dev_passages = dev_ids([p for q in queries for p in q.positives], dev_fraction, seed)
        train = [q for q in queries if not set(q.positives) & dev_passages]
        dev = [q for q in queries if set(q.positives) <= dev_passages]
        return train, dev  # a query with passages on both sides is left out of both
    dev = dev_ids([query.id for query in queries], dev_fraction, seed)
    return [q for q in queries if q.id not in dev], [q for q in queries if q.id in dev]


def is_generated(query: Query) -> bool:
    """Whether the query was made from a passage (written by the teacher, or its heading),
    not judged by a person."""
    return is_generated_id(query.id)


def is_generated_id(query_id: str) -> bool:
    return query_id.startswith((GENERATED_PREFIX, HEADING_PREFIX))


def dev_ids(ids: Collection[str], dev_fraction: float, seed: int) -> set[str]:
    """The ids held out for dev: a seeded draw from the sorted distinct ids, so the same ids
    and seed give the same split in any input order; never all, and never none when some
    fraction is asked for and there are two ids or more."""
    ordered = sorted(set(ids))
    random.Random(seed).shuffle(ordered)
    size = round(len(ordered) * dev_fraction)
    if dev_fraction > 0 and len(ordered) >= 2:
        size = min(max(size, 1), len(ordered) - 1)
    return set(ordered[:size])


#: Prompts per generation batch when neither the caller nor the teacher sets one (the teacher's
#: scoring batch is automatic): generated text depends on the batch it was padded in, and a
#: full-suite run failed when generation followed the automatic scoring batch size.
GENERATION_BATCH_SIZE = 8

# ---------------------------------------------------------------------------- generated queries
def generate_queries(passages: list[Passage], teacher: Teacher, *, per_passage: int = 1,
                     cache_dir: Path | None = None, max_passages: int | None = None,
                     seed: int = 0, show_progress: bool = True, max_new_tokens: int = 32,
                     max_passage_tokens: int = 200, batch_size: int | None = None) -> list[Query]:
    """Queries written by the teacher LLM, one (or ``per_passage``) per passage.

    A few-shot "Passage: ... Question: ..." prompt (base models continue patterns; they do not
    follow instructions). The first query of a passage is greedy, further ones are sampled
    (seeded). Outputs are cleaned (first line, stripped, non-empty, de-duplicated: a text
    generated for several passages becomes one query with all of them as positives).
    With ``cache_dir``, results go to a JSONL file there (readable; rewritten atomically after
    every batch): a rerun regenerates only the passages not yet done.
    """
    if per_passage < 1:
        raise ValueError(f"per_passage must be at least 1, got {per_passage}")
    chosen = list(passages)
    if max_passages is not None and max_passages < len(chosen):
        picked = sorted(random.Random(seed).sample(range(len(chosen)), max_passages))
        chosen = [chosen[i] for i in picked]
    prefix = generation_prefix()
    cache_file = None
    done: dict[str, dict[str, Any]] = {}
    if cache_dir is not None:
        key = content_key(teacher.fingerprint, GENERATION_VERSION, prefix, per_passage, seed,
                          max_new_tokens, max_passage_tokens)
        cache_file = Path(cache_dir) / "generated-queries" / f"{key[:24]}.jsonl"
        done = _read_generated(cache_file)
    todo = [p for p in chosen if done.get(p.id, {}).get("passage_sha256") != _sha(p.text)]
    size = batch_size or getattr(teacher, "batch_size", None) or GENERATION_BATCH_SIZE
    batches = range(0, len(todo), size)
    if show_progress and todo:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating queries", unit="batch")
    # Room for the whole few-shot prefix and a passage of max_passage_tokens: a prompt cut to
    # the teacher's scoring length lost its examples, and the 270M model then wrote the one
    # example left for every passage (265 of 300 SciFact passages got no usable query).
    frame = teacher.count_tokens(prefix + GENERATION_PASSAGE_PREFIX + GENERATION_QUERY_PREFIX)
    prompt_tokens = frame + max_passage_tokens + 4
    for start in batches:
        batch = todo[start:start + size]
        prompts = [prefix + GENERATION_PASSAGE_PREFIX
                   + teacher.truncate(p.text, max_passage_tokens).replace("\n", " ")
                   + GENERATION_QUERY_PREFIX for p in batch]
        raw: list[list[str]] = [[] for _ in batch]
        for k in range(per_passage):
            outputs = teacher.generate(prompts, max_new_tokens=max_new_tokens, do_sample=k > 0,
                                       seed=seed + 1000 * k + start,
                                       max_prompt_tokens=max(prompt_tokens,
                                                             teacher.max_length - max_new_tokens))
            for row, output in enumerate(outputs):
                raw[row].append(output)
        for passage, outputs in zip(batch, raw, strict=True):
            done[passage.id] = {"passage_id": passage.id, "passage_sha256": _sha(passage.text),
                                "queries": _dedupe([clean_generated_query(o) for o in outputs]),
                                "raw": outputs}
        if cache_file is not None:
            _write_generated(cache_file, done)
    queries = _assemble(chosen, done)
    if chosen and not queries:
        raw = f" (what it wrote is in {cache_file})" if cache_file is not None else ""
        raise QueryError(f"the teacher wrote no usable query for any of the {len(chosen)} "
                         f"passages{raw}: use a larger or instruction-tuned --teacher, or pass "
                         "your own --queries and --qrels")
    return queries


def clean_generated_query(text: str) -> str:
    """First line of a generation, without labels, quotes or stray spacing ("" if unusable)."""
    line = text.strip().split("\n", 1)[0]
    line = re.sub(r"^(question|query|q)\s*[:.)-]\s*", "", line.strip(), flags=re.IGNORECASE)
    line = re.sub(r"\s+", " ", line).strip().strip("\"'`").strip()
    if len(line) < 3 or not re.search(r"[^\W\d_]", line):
        return ""
    if _normal(line) in {_normal(query) for _, query in GENERATION_EXAMPLES}:
        return ""  # the model copied an example (case and punctuation aside)
    return line


def _normal(text: str) -> str:
    """Lower-case words only: how two generated queries are compared."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def _dedupe(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for text in texts:
        if text and _normal(text) not in seen:
            seen.add(_normal(text))
            kept.append(text)
    return kept


#: A query the teacher wrote for this many passages or more names none of them ("What is the
#: purpose of the following code?"): it is dropped, not trained on with every one as positive.
GENERIC_QUERY_PASSAGES = 3


def _assemble(passages: list[Passage], done: dict[str, dict[str, Any]]) -> list[Query]:
    by_text: dict[str, Query] = {}
    empty = 0
    for passage in passages:
        texts = [t for t in (clean_generated_query(raw) for raw in
                             done.get(passage.id, {}).get("queries", [])) if t]
        empty += not texts
        for number, text in enumerate(texts):
            query = by_text.get(_normal(text))
            if query is None:
                by_text[_normal(text)] = Query(f"{GENERATED_PREFIX}{passage.id}:{number}", text,
                                               [passage.id])
            elif passage.id not in query.positives:
                query.positives.append(passage.id)
    generic = [q for q in by_text.values() if len(q.positives) >= GENERIC_QUERY_PASSAGES]
    if empty:
        logger.warning("the teacher wrote no usable query for %d of %d passages", empty,
                       len(passages))
    if generic:
        logger.info("dropping %d generated queries written for %d passages or more (e.g. %r): "
                    "they name none of them", len(generic), GENERIC_QUERY_PASSAGES,
                    generic[0].text)
    return [q for q in by_text.values() if len(q.positives) < GENERIC_QUERY_PASSAGES]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_generated(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    done: dict[str, dict[str, Any]] = {}
    try:
        for _, record in read_jsonl(path, QueryError):
            if "passage_id" in record and isinstance(record.get("queries"), list):
                done[str(record["passage_id"])] = record
    except QueryError as exc:
        logger.warning("ignoring the unreadable generated-query cache %s (%s)", path, exc)
        return {}
    return done


def _write_generated(path: Path, done: dict[str, dict[str, Any]]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                                    for record in done.values()))


def __getattr__(name: str) -> Any:
    if name in _PAIR_NAMES:
        from llama_index_d2llm.trainer import pairs

        return getattr(pairs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
