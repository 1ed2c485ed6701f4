"""Stage 2b: keep the generated queries that find their own passage again (round-trip
consistency, as InPars and Promptagator filter theirs).

A small base LLM writes many queries that name nothing in their passage ("What is the purpose
of the following code?", a copy of a few-shot example). Trained on, they teach the student that
unrelated texts match. A query is kept when its passage comes back among the first ``depth``
results of the product's BM25 or of the starting encoder (the untrained student), searching
the whole corpus: either one finding it shows the query is about that passage, and asking
for both would keep only what BM25 already finds. The ranks of every query are written to
``round-trip.jsonl`` in the work directory, so the filter can be inspected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_index_d2llm.trainer.cache import atomic_write_json, content_key
from llama_index_d2llm.trainer.corpus import Passage
from llama_index_d2llm.trainer.encoding import TextEncoder
from llama_index_d2llm.trainer.queries import Query

logger = logging.getLogger(__name__)

#: A generated query is kept when one of its passages is within this rank of either search.
DEFAULT_ROUND_TRIP_DEPTH = 10
#: Below this share of queries kept, the log warns that the teacher writes poor queries.
FEW_KEPT = 0.2
ROUND_TRIP_VERSION = "round-trip-v1"


@dataclass(frozen=True)
class RoundTrip:
    """Where a query's own passage ranks when the query searches the corpus (1 = first;
    ``None``: BM25 shares no term with it, or no encoder was used)."""

    bm25_rank: int | None
    encoder_rank: int | None

    def within(self, depth: int) -> bool:
        return any(rank is not None and rank <= depth
                   for rank in (self.bm25_rank, self.encoder_rank))


def round_trips(queries: Sequence[Query], passages: Sequence[Passage],
                encoder: TextEncoder | None) -> dict[str, RoundTrip]:
    """Each query's best-placed positive by BM25 and by ``encoder`` (the starting encoder's
    cosine, called once per kind with every text; ``None``: BM25 only), over the whole
    corpus."""
    from llama_index_d2llm.trainer.dev_ranking import SparseBM25

    ids = [p.id for p in passages]
    row = {pid: i for i, pid in enumerate(ids)}
    index = SparseBM25([p.text for p in passages])
    if encoder is not None:  # one call a kind: a cached encoder computes its states at once
        with torch.no_grad():
            passage_vectors = torch.nn.functional.normalize(
                encoder([p.text for p in passages], "passage").float().cpu(), dim=-1)
            query_vectors = torch.nn.functional.normalize(
                encoder([q.text for q in queries], "query").float().cpu(), dim=-1)
    trips = {}
    for number, query in enumerate(queries):
        rows = [row[p] for p in query.positives if p in row]
        lexical = torch.as_tensor(index.scores(query.text))
        bm25 = min((_rank(lexical, r) for r in rows if lexical[r] > 0), default=None)
        dense = None
        if encoder is not None:
            cosines = passage_vectors @ query_vectors[number]
            dense = min((_rank(cosines, r) for r in rows), default=None)
        trips[query.id] = RoundTrip(bm25, dense)
    return trips


def _rank(scores: torch.Tensor, row: int) -> int:
    """1 + how many passages score strictly above ``row``."""
    return int((scores > scores[row]).sum()) + 1


def keep_round_trips(queries: Sequence[Query], passages: Sequence[Passage],
                     encoder: TextEncoder | None, *, depth: int = DEFAULT_ROUND_TRIP_DEPTH,
                     cache_dir: Path | None = None, encoder_key: str = "") -> list[Query]:
    """The queries whose passage comes back within ``depth`` (``round_trips``); their ranks
    are kept in ``cache_dir`` (keyed by the queries, corpus and encoder) and reused."""
    cache_file = None
    trips: dict[str, RoundTrip] | None = None
    if cache_dir is not None:
        key = content_key(ROUND_TRIP_VERSION, encoder_key,
                          [(q.id, q.text, q.positives) for q in queries],
                          [(p.id, p.text) for p in passages])
        cache_file = Path(cache_dir) / f"round-trip-{key[:24]}.json"
        trips = _read(cache_file)
    if trips is None:
        trips = round_trips(queries, passages, encoder)
        if cache_file is not None:
            atomic_write_json(cache_file, {
                "depth_used": depth,
                "queries": [{"id": q.id, "text": q.text, "positives": q.positives,
                             "bm25_rank": trips[q.id].bm25_rank,
                             "encoder_rank": trips[q.id].encoder_rank} for q in queries]})
    kept = [q for q in queries if trips[q.id].within(depth)]
    summary = describe(trips, depth)
    if not kept:
        from llama_index_d2llm.trainer.queries import QueryError

        raise QueryError(
            f"none of the {len(queries)} generated queries finds its own passage within the "
            f"first {depth} results ({summary}): the teacher writes queries unrelated to the "
            "passages; use a stronger --teacher, or bring judged --queries/--qrels")
    logger.info("round trip: kept %d of %d generated queries whose passage comes back within "
                "the first %d (%s)", len(kept), len(queries), depth, summary)
    if len(kept) < FEW_KEPT * len(queries):
        logger.warning("the round trip kept only %d of %d generated queries: the teacher's "
                       "queries rarely name their passage. A stronger --teacher writes better "
                       "ones; --round-trip-depth 0 keeps them all (not advised)", len(kept),
                       len(queries))
    return kept


def describe(trips: dict[str, RoundTrip], depth: int) -> str:
    """How many queries each search brings back (for the log and the README's figures)."""
    total = len(trips)
    bm25 = sum(t.bm25_rank is not None and t.bm25_rank <= depth for t in trips.values())
    dense = sum(t.encoder_rank is not None and t.encoder_rank <= depth for t in trips.values())
    first = sum(1 in (t.bm25_rank, t.encoder_rank) for t in trips.values())
    return (f"BM25 {bm25}/{total}, starting encoder {dense}/{total}, either first "
            f"{first}/{total}")


def _read(path: Path) -> dict[str, RoundTrip] | None:
    import json

    try:
        data = json.loads(path.read_text())
        return {q["id"]: RoundTrip(q["bm25_rank"], q["encoder_rank"]) for q in data["queries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
