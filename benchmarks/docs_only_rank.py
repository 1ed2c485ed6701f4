"""In-memory rankings of a benchmark, as the hybrid retriever ranks (fast, for exploring).

The same pieces the distiller's dev ranking uses (``trainer/dev_ranking.py``): exact cosine
search, the product's BM25 scored as Qdrant scores it (``SparseBM25``), reciprocal-rank fusion
of both top 100s, then the candidates rescored by ``student/fusion.py``. The figures the
README reports come from ``docs_only.py --store``, through ``D2LLMVectorStore`` and
``D2LLMRetriever``; this module is what lets a variant be judged in seconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llama_index_d2llm.student.fusion import FusionWeights, fuse
from llama_index_d2llm.trainer.dev_ranking import SparseBM25
from llama_index_d2llm.trainer.runs import RunDict, evaluate_run, fuse_runs
from llama_index_d2llm.trainer.search import exact_search

DEPTH = 100
DEFAULT_HYBRID = FusionWeights(lexical=0.5)


@dataclass
class Corpus:
    """Passages, their BM25 index and each question's BM25 scores (built once per corpus)."""

    ids: list[str]
    texts: list[str]
    bm25: SparseBM25
    query_ids: list[str]
    bm25_scores: dict[str, object]
    bm25_run: RunDict

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], queries: dict[str, str]) -> Corpus:
        index = SparseBM25(list(texts))
        scores = {q: index.scores(text) for q, text in queries.items()}
        run = {q: {ids[i]: s for i, s in index.search(queries[q], DEPTH, scores[q])}
               for q in queries}
        return cls(list(ids), list(texts), index, list(queries), scores, run)


def rank(corpus: Corpus, query_vectors: torch.Tensor, passage_vectors: torch.Tensor, *,
         iem: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
         fusions: dict[str, FusionWeights | None] | None = None) -> dict[str, RunDict]:
    """Runs of every row: bm25, dense, hybrid (RRF), hybrid_default (cosine + 0.5 BM25), and
    with ``fusions`` (the student's recorded ones) dense_rescored and hybrid_rescored."""
    dense = exact_search(query_vectors, passage_vectors, corpus.ids, corpus.query_ids, DEPTH)
    fused = fuse_runs([dense, corpus.bm25_run])
    hybrid = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:DEPTH])
              for q, docs in fused.items()}
    runs = {"bm25": corpus.bm25_run, "dense": dense, "hybrid": hybrid,
            "hybrid_default": _rescore(corpus, hybrid, query_vectors, passage_vectors,
                                       DEFAULT_HYBRID, iem, lexical=True)}
    for stage, first in (("dense", dense), ("hybrid", hybrid)):
        if fusions is not None and stage in fusions:
            runs[f"{stage}_rescored"] = _rescore(corpus, first, query_vectors, passage_vectors,
                                                 fusions[stage], iem, lexical=stage == "hybrid")
    return runs


def _rescore(corpus: Corpus, run: RunDict, query_vectors: torch.Tensor,
             passage_vectors: torch.Tensor, weights: FusionWeights | None,
             iem: Callable | None, lexical: bool) -> RunDict:
    if weights is None:
        return run
    row = {pid: i for i, pid in enumerate(corpus.ids)}
    out: RunDict = {}
    for index, query_id in enumerate(corpus.query_ids):
        listed = sorted(run[query_id], key=lambda d: -run[query_id][d])
        vectors = passage_vectors[[row[p] for p in listed]].float()
        query = query_vectors[index].float()
        cosine = torch.nn.functional.normalize(vectors, dim=-1) @ \
            torch.nn.functional.normalize(query, dim=-1)
        logits = (iem(query, vectors).float() if iem is not None and weights.iem > 0
                  else torch.zeros_like(cosine))
        scores = None
        if lexical and weights.lexical > 0:
            all_scores = corpus.bm25_scores[query_id]
            scores = torch.tensor([float(all_scores[row[p]]) for p in listed])
        out[query_id] = dict(zip(listed, fuse(cosine, logits, weights, scores).tolist(),
                                 strict=True))
    return out


def score(runs: dict[str, RunDict], qrels: dict[str, dict[str, int]],
          answer_files: dict[str, str] | None = None) -> dict[str, dict]:
    """nDCG@10 (mean and per query) of each run; for file-judged questions also whether the
    answering file comes first (``file@1``) and among the first three files (``file@3``)."""
    results = {}
    for name, run in runs.items():
        evaluated = evaluate_run(qrels, run, ["ndcg@10", "recall@100"], per_query=True)
        entry = {"ndcg@10": evaluated["ndcg@10"], "recall@100": evaluated["recall@100"],
                 "per_query": evaluated["per_query"]["ndcg@10"]}
        if answer_files:
            firsts = {q: _files_in_order(run.get(q, {})) for q in answer_files}
            entry["file@1"] = sum(f[:1] == [answer_files[q]] for q, f in firsts.items())
            entry["file@3"] = sum(answer_files[q] in f[:3] for q, f in firsts.items())
            entry["questions"] = len(answer_files)
        results[name] = entry
    return results


def _files_in_order(docs: dict[str, float]) -> list[str]:
    ranked = sorted(docs, key=lambda d: -docs[d])
    return list(dict.fromkeys(pid.split("#", 1)[0] for pid in ranked))


def paired(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Mean and standard error of the per-query differences ``a - b``."""
    diffs = [a[q] - b[q] for q in a]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se
