"""Evaluation: BEIR retrieval (first stage and after IEM reranking) and STS correlation.

Metrics come from ``ranx`` (``runs.py``), so BM25 or teacher-reranking baselines are measured
exactly like the student. The first stage is exact cosine search over the student's vectors
(or a local Qdrant collection, as in production: ``search.py``); the IEM then rescores each
query's top ``rerank_k``. The data is a BEIR folder (``beir.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.trainer.beir import BeirData, load_beir, read_qrels
from llama_index_d2llm.trainer.pairs import SymmetricPair
from llama_index_d2llm.trainer.runs import (
    DEFAULT_METRICS,
    EvaluationError,
    Qrels,
    RunDict,
    evaluate_run,
    fuse_runs,
    read_run,
)
from llama_index_d2llm.trainer.search import exact_search, qdrant_runs, qdrant_search

__all__ = [  # the run, data and search pieces live in runs.py, beir.py and search.py
    "DEFAULT_METRICS", "BeirData", "Encoder", "EvaluationError", "Qrels", "RunDict", "bm25_run",
    "evaluate_pairs", "evaluate_run", "evaluate_student", "exact_search", "fuse_runs",
    "load_beir", "qdrant_runs", "qdrant_search", "read_qrels", "read_run", "rerank", "spearman",
    "student_encoder", "write_json",
]

logger = logging.getLogger(__name__)

Encoder = Callable[[Sequence[str], str], torch.Tensor]


def bm25_run(data: BeirData, top_k: int = 100, show_progress: bool = False) -> RunDict:
    """BM25 (Okapi, the trainer's negative miner) over the corpus: the lexical baseline."""
    from llama_index_d2llm.trainer.mining import BM25Index

    index = BM25Index(data.corpus)
    items = sorted(data.queries.items())
    if show_progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="BM25", unit="query")
    return {query_id: dict(index.search(text, top_k)) for query_id, text in items}


# ---------------------------------------------------------------------------- student runs
def student_encoder(student: D2LLMStudent, batch_size: int = 16, show_progress: bool = False,
                    token_cache: Any = None) -> Encoder:
    """texts, kind -> vectors; through cached backbone states when a frozen-mode cache is given."""
    if token_cache is None:
        return lambda texts, kind: student.encode(list(texts), kind=kind, batch_size=batch_size,
                                                  show_progress=show_progress)

    def encode(texts: Sequence[str], kind: str) -> torch.Tensor:
        token_cache.ensure(texts, kind)
        output = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                output.append(token_cache.vectors(texts[start:start + batch_size], kind)
                              .float().cpu())
        return torch.cat(output) if output else torch.empty(0, student.dimension)

    return encode


def rerank(student: D2LLMStudent, run: RunDict, query_vectors: dict[str, torch.Tensor],
           passage_vectors: dict[str, torch.Tensor], rerank_k: int,
           task: str = "asymmetric", first_stage: str = "dense",
           lexical: Callable[[str, list[str]], list[float]] | None = None) -> RunDict:
    """Each query's top ``rerank_k`` first-stage passages rescored as the retriever does: the
    fusion the student recorded for that first stage (``student/fusion.py``), with the
    candidates' BM25 scores from ``lexical(query_id, passage_ids)`` for hybrid search."""
    reranked: RunDict = {}
    for query_id, docs in run.items():
        top = sorted(docs, key=docs.get, reverse=True)[:rerank_k]
        if not top:
            reranked[query_id] = {}
            continue
        scores = student.rescore(query_vectors[query_id],
                                 torch.stack([passage_vectors[d] for d in top]),
                                 first_stage=first_stage, task=task,
                                 lexical_scores=None if lexical is None else lexical(query_id,
                                                                                     top))
        reranked[query_id] = dict(zip(top, scores.tolist(), strict=True))
    return reranked


def evaluate_student(student: D2LLMStudent, data: BeirData | str | Path, *, split: str = "test",
                     top_k: int = 100, rerank_k: int = 100, first_stage: str = "exact",
                     metrics: Sequence[str] = DEFAULT_METRICS, max_queries: int | None = None,
                     batch_size: int = 16, show_progress: bool = True, token_cache: Any = None,
                     qdrant_location: str = ":memory:", task: str = "asymmetric",
                     runs_output: str | Path | None = None,
                     lexical_run: RunDict | None = None, hybrid: bool = False
                     ) -> dict[str, Any]:
    """First-stage and IEM-reranked retrieval metrics of a student on a BEIR data set.

    ``first_stage``: ``"exact"`` (cosine over every passage) or ``"qdrant"`` (a local Qdrant
    collection at ``qdrant_location``). ``rerank_k=0`` skips reranking. With a
    ``lexical_run`` (BM25's), also the hybrid first stage (``fuse_runs`` of both) and the
    IEM's rescoring of the hybrid's top ``rerank_k``. With ``hybrid`` and the Qdrant first
    stage, the hybrid first stage is Qdrant's own, as ``D2LLMRetriever`` searches: BM25
    sparse vectors beside the dense ones, fused by RRF in the query (``qdrant_runs``).
    """
    if hybrid and first_stage != "qdrant" and lexical_run is None:
        raise EvaluationError("hybrid=True needs first_stage='qdrant' (Qdrant's hybrid search) "
                              "or a lexical_run to fuse with the exact search")
    if first_stage not in ("exact", "qdrant"):
        raise EvaluationError(f"first_stage must be 'exact' or 'qdrant', got {first_stage!r}")
    if top_k < 1 or rerank_k < 0:
        raise EvaluationError("top_k must be >= 1 and rerank_k >= 0")
    if not isinstance(data, BeirData):
        data = load_beir(data, split)
    query_ids = sorted(data.queries)[:max_queries] if max_queries else sorted(data.queries)
    qrels = {q: data.qrels[q] for q in query_ids}
    encode = student_encoder(student, batch_size, show_progress, token_cache)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    passage_vectors = encode([p.text for p in data.corpus], "passage")
    timings["encode_corpus_s"] = time.perf_counter() - start
    start = time.perf_counter()
    query_vectors = encode([data.queries[q] for q in query_ids], "query")
    timings["encode_queries_s"] = time.perf_counter() - start
    passage_ids = [p.id for p in data.corpus]
    start = time.perf_counter()
    qdrant_found: dict[str, RunDict] = {}
    if first_stage == "exact":
        first = exact_search(query_vectors, passage_vectors, passage_ids, query_ids,
                             max(top_k, rerank_k))
    else:
        texts = ({"passage_texts": [p.text for p in data.corpus],
                  "query_texts": [data.queries[q] for q in query_ids]}
                 if hybrid and lexical_run is None else {})
        qdrant_found = qdrant_runs(query_vectors, passage_vectors, passage_ids, query_ids,
                                   max(top_k, rerank_k), qdrant_location, **texts)
        first = qdrant_found["dense"]
    timings["search_s"] = time.perf_counter() - start
    result: dict[str, Any] = {
        "student": student.name, "fingerprint": student.fingerprint, "split": split,
        "queries": len(query_ids), "corpus": len(passage_ids), "first_stage_method": first_stage,
        "top_k": top_k, "rerank_k": rerank_k,
        "first_stage": evaluate_run(qrels, _truncate(first, top_k), metrics),
    }
    runs = {"first_stage": first}
    if rerank_k:
        start = time.perf_counter()
        by_id_q = dict(zip(query_ids, query_vectors, strict=True))
        by_id_p = dict(zip(passage_ids, passage_vectors, strict=True))
        reranked = rerank(student, first, by_id_q, by_id_p, rerank_k, task)
        timings["rerank_s"] = time.perf_counter() - start
        result["reranked"] = evaluate_run(qrels, reranked, metrics)
        runs["reranked"] = reranked
    if "hybrid" in qdrant_found:
        result["sparse"] = evaluate_run(qrels, _truncate(qdrant_found["sparse"], top_k), metrics)
    if lexical_run is not None or "hybrid" in qdrant_found:
        if "hybrid" in qdrant_found:
            hybrid = qdrant_found["hybrid"]
        else:
            missing = [q for q in query_ids if q not in lexical_run]
            if missing:
                raise EvaluationError(f"the lexical run has no results for {len(missing)} "
                                      f"queries (e.g. {missing[0]!r}): it must cover the "
                                      "evaluated queries")
            hybrid = _truncate(fuse_runs([_truncate(first, top_k),
                                          _truncate({q: lexical_run[q] for q in query_ids},
                                                    top_k)]), max(top_k, rerank_k))
        result["hybrid_method"] = "qdrant" if "hybrid" in qdrant_found else "ranx rrf"
        result["hybrid"] = evaluate_run(qrels, _truncate(hybrid, top_k), metrics)
        runs["hybrid"] = hybrid
        if rerank_k:
            hybrid_reranked = rerank(student, hybrid, by_id_q, by_id_p, rerank_k, task,
                                     first_stage="hybrid",
                                     lexical=_product_bm25(data, {q: data.queries[q]
                                                                  for q in query_ids}))
            result["hybrid_reranked"] = evaluate_run(qrels, hybrid_reranked, metrics)
            runs["hybrid_reranked"] = hybrid_reranked
    result["timings"] = timings
    if runs_output is not None:
        write_json(runs_output, runs)
    return result


def _product_bm25(data: BeirData, queries: dict[str, str]
                  ) -> Callable[[str, list[str]], list[float]]:
    """BM25 scores of given passages as the hybrid retriever gets them from Qdrant (the
    product's BM25, ``dev_ranking.SparseBM25``, scored in memory), one query at a time."""
    from llama_index_d2llm.trainer.dev_ranking import SparseBM25

    index = SparseBM25([p.text for p in data.corpus])
    row = {p.id: i for i, p in enumerate(data.corpus)}

    def scores(query_id: str, passage_ids: list[str]) -> list[float]:
        found = index.scores(queries[query_id])
        return [float(found[row[p]]) for p in passage_ids]

    return scores


def _truncate(run: RunDict, k: int) -> RunDict:
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:k]) for q, docs in run.items()}


# ---------------------------------------------------------------------------- STS
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(x, y).statistic
    return float(value) if not math.isnan(value) else 0.0


def evaluate_pairs(student: D2LLMStudent, pairs: Sequence[SymmetricPair], *,
                   task: str = "symmetric", batch_size: int = 16, show_progress: bool = False,
                   token_cache: Any = None) -> dict[str, Any]:
    """Spearman correlation of IEM logits and of vector cosines with the gold pair scores."""
    scored = [pair for pair in pairs if pair.score is not None]
    if len(scored) < 2:
        raise EvaluationError("STS evaluation needs at least two pairs with a gold score")
    encode = student_encoder(student, batch_size, show_progress, token_cache)
    a = encode([pair.text_a for pair in scored], "query")
    b = encode([pair.text_b for pair in scored], "passage")
    gold = [pair.score for pair in scored]
    iem = [float(student.score(a[i], b[i:i + 1], task=task)[0]) for i in range(len(scored))]
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    return {"pairs": len(scored), "task": task, "iem_spearman": spearman(iem, gold),
            "cosine_spearman": spearman(cosine, gold)}


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON write (temporary file + rename)."""
    from llama_index_d2llm.student.files import atomic_write_json

    return atomic_write_json(path, obj)
