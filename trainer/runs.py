"""Runs (query -> {passage: score}) and their metrics: the ``ranx`` layer of evaluation.

Metrics come from ``ranx`` (nDCG@10, Recall@100, MRR@10 by default), never hand-written, and
any run dict is scored by the same ``evaluate_run``, so BM25 or teacher-reranking baselines
are measured exactly like the student.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
Qrels = dict[str, dict[str, int]]
RunDict = dict[str, dict[str, float]]


class EvaluationError(D2LLMError, ValueError):
    """Evaluation data that cannot be used; the message says what to change."""


def evaluate_run(qrels: Qrels, run: RunDict, metrics: Sequence[str] = DEFAULT_METRICS,
                 per_query: bool = False) -> dict[str, Any]:
    """Mean metrics (``ranx``) of a run against relevance judgements.

    Every judged query counts: one missing from the run scores 0. Queries of the run that have
    no judgement cannot be scored and are ignored. With ``per_query`` also returns
    ``{"per_query": {metric: {query_id: value}}}``.
    """
    from ranx import Qrels as RanxQrels
    from ranx import Run as RanxRun
    from ranx import evaluate

    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()
              if any(int(r) > 0 for r in docs.values())}
    if not judged:
        raise EvaluationError("the relevance judgements have no query with a relevant document "
                              "(score > 0): pass the qrels of the split you evaluate")
    scored = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in judged}
    # ranx cannot hold a query with no results: such queries score 0, as missing ones do
    scored = {q: docs for q, docs in scored.items() if docs}
    ids = sorted(judged)
    result: dict[str, Any] = {}
    if scored:
        # the judgements of the scored queries only: ranx's make_comparable would do the same,
        # but it is compiled by numba on every first call in a process (about 10 s)
        ranx_run = RanxRun(scored)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numba's type-safety chatter
            evaluate(RanxQrels({q: judged[q] for q in scored}), ranx_run, list(metrics),
                     save_results_in_run=True)
        per = {m: {q: float(ranx_run.scores[m].get(q, 0.0)) for q in ids} for m in metrics}
    else:
        per = {m: {q: 0.0 for q in ids} for m in metrics}
    for metric in metrics:
        result[metric] = sum(per[metric].values()) / len(ids)
    if per_query:
        result["per_query"] = per
    return result


def read_run(path: str | Path) -> RunDict:
    """A run file: JSON ``{query_id: {doc_id: score}}`` or TREC (``q Q0 doc rank score tag``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvaluationError(f"cannot read the run file {str(path)!r} ({exc})") from exc
    if text.lstrip().startswith("{"):
        try:
            run = json.loads(text)
        except ValueError as exc:
            raise EvaluationError(f"{path} is not valid JSON ({exc})") from None
        if not all(isinstance(v, dict) for v in run.values()):
            raise EvaluationError(f"{path}: a JSON run maps query ids to {{doc_id: score}}")
        return {str(q): {str(d): _score(s, f"{path}: query {q!r}, document {d!r}")
                         for d, s in docs.items()} for q, docs in run.items()}
    run: RunDict = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise EvaluationError(f"{path}:{number}: a TREC run line has 6 fields "
                                  f"(query Q0 doc rank score tag), this one has {len(fields)}")
        run.setdefault(fields[0], {})[fields[2]] = _score(fields[4], f"{path}:{number}")
    return run


def _score(value: Any, where: str) -> float:
    """A run's score as a float; one that is not a finite number is an error saying where
    (NaN would rank its document anywhere)."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not math.isfinite(score):
        raise EvaluationError(f"{where}: score {value!r} is not a finite number; fix it")
    return score


def fuse_runs(runs: Sequence[RunDict], method: str = "rrf") -> RunDict:
    """One run from several (``ranx.fuse``): reciprocal rank fusion by default,

        score(d) = sum_r 1 / (60 + rank_r(d)),

    which needs no score normalisation and no tuned weight, so it cannot be fitted to the
    data it is measured on. Used for hybrid search: BM25's exact term matches plus the
    student's vectors.
    """
    from ranx import Run as RanxRun
    from ranx import fuse

    kept = [{q: docs for q, docs in run.items() if docs} for run in runs]
    kept = [run for run in kept if run]
    if len(kept) < 2:  # ranx fuses two runs or more (a run with no hit at all crashed it)
        return {q: _reciprocal_ranks(docs) for q, docs in (kept[0] if kept else {}).items()}
    # ranx needs the same queries in every run: a query with hits in some runs only (a title
    # of stop words finds nothing by BM25) is fused over the runs that have it
    everywhere = set.intersection(*(set(run) for run in kept))
    out: RunDict = {}
    if everywhere:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numba's type-safety chatter
            fused = fuse([RanxRun({q: run[q] for q in everywhere}) for run in kept],
                         method=method)
        out = {q: {d: float(s) for d, s in docs.items()} for q, docs in fused.to_dict().items()}
    for query in set().union(*kept) - everywhere:
        scores: dict[str, float] = {}
        for run in kept:
            for doc, score in _reciprocal_ranks(run.get(query, {})).items():
                scores[doc] = scores.get(doc, 0.0) + score
        out[query] = scores
    return out


def _reciprocal_ranks(docs: dict[str, float], k: int = 60) -> dict[str, float]:
    """RRF of one ranking: ``1 / (k + rank)``, the fusion of a single run."""
    ranked = sorted(docs, key=lambda d: -docs[d])
    return {d: 1.0 / (k + rank) for rank, d in enumerate(ranked, start=1)}
