"""Whole-corpus dev ranking: the deployed pipeline, measured on held-out dev queries.

Each dev query searches the whole corpus (up to ``DEV_CORPUS_LIMIT`` passages, its positives
always among them) as a deployment does:

- dense: exact cosine over the student's vectors, top ``depth``;
- hybrid: that list fused by reciprocal rank with BM25's top ``depth`` (the product's BM25,
  ``SparseBM25``), as Qdrant's hybrid query fuses them;
- each list rescored as ``D2LLMRetriever`` rescores it (``student/fusion.py``): the
  candidates' cosine, BM25 score (hybrid) and IEM logit fused, at each weight of the grids.

The fusion the student records per first stage (``D2LLMConfig.fusion``) is chosen by
``choose_fusion``: for hybrid, the dev-best BM25 weight (or the RRF order) when its gain over
the default fusion's weight is beyond noise (else the default); then, for both, the dev-best
IEM weight when
its gain is beyond noise (else 0). The early-stopping figure (``dev_ndcg@10``) is the mean
over both first stages of nDCG@10 with the recorded fusion, the same figure that is
reported. Ranking each dev query's own candidate list instead (its positives and BM25
negatives) gave figures near 0.9 that said nothing about search.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.fusion import (
    DEFAULT_LEXICAL_WEIGHT,
    FIRST_STAGES,
    FusionWeights,
    fuse,
)
from llama_index_d2llm.student.modes import eval_mode
from llama_index_d2llm.trainer.dataset import RankingItem
from llama_index_d2llm.trainer.encoding import TextEncoder, encode_distinct
from llama_index_d2llm.trainer.evaluation import (
    RunDict,
    evaluate_run,
    exact_search,
    fuse_runs,
)

#: Passages searched by the dev queries at most (a seeded sample beyond it).
DEV_CORPUS_LIMIT = 10_000
#: First-stage candidates per query (what the retriever's similarity_top_k defaults to).
DEV_DEPTH = 100
#: The figure early stopping watches.
DEV_METRIC = "dev_ndcg@10"
#: Each dev query's share of it (``evaluate``), for the floor's paired comparison.
DEV_PER_QUERY = "dev_per_query"
#: BM25 weights tried for the hybrid fusion (beside the cosine's 1).
LEXICAL_GRID = (0.25, 0.5, 0.75, 1.0, 1.5)
#: IEM weights tried (0: the IEM is left out).
IEM_GRID = (0.0, 0.1, 0.25, 0.5, 1.0)

def dev_corpus_ids(items: Sequence[RankingItem], passage_ids: Sequence[str], seed: int,
                   limit: int = DEV_CORPUS_LIMIT) -> list[str]:
    """The passages dev queries search: all of them, or their positives plus a seeded sample."""
    ids = list(dict.fromkeys(passage_ids))
    if len(ids) <= limit:
        return ids
    needed = list(dict.fromkeys(pid for item in items for pid in item.positive_ids))
    rest = sorted(set(ids) - set(needed))
    random.Random(f"dev-corpus:{seed}").shuffle(rest)
    return needed + rest[:max(0, limit - len(needed))]


class SparseBM25:
    """The product's BM25 (``llama_index_d2llm.sparse``), scored in memory as Qdrant does.

    Documents hold BM25's saturated term frequencies; a query term weighs its inverse document
    frequency ``ln((N - df + 0.5) / (df + 0.5) + 1)`` over these documents, which is what
    Qdrant's IDF modifier computes from a collection's statistics. So the dev hybrid ranks
    like the hybrid retriever a user deploys.
    """

    def __init__(self, texts: Sequence[str], encoder: Any = None):
        import numpy as np
        from scipy.sparse import csr_matrix

        from llama_index_d2llm.sparse import BM25Encoder

        self.encoder = encoder or BM25Encoder()
        indices, values = self.encoder.encode_documents(list(texts))
        self.columns: dict[int, int] = {}
        rows, cols, data = [], [], []
        for row, (terms, weights) in enumerate(zip(indices, values, strict=True)):
            for term, weight in zip(terms, weights, strict=True):
                rows.append(row)
                cols.append(self.columns.setdefault(term, len(self.columns)))
                data.append(weight)
        self.matrix = csr_matrix((data, (rows, cols)), shape=(len(texts), len(self.columns)))
        count = len(texts)
        frequency = np.bincount(np.asarray(cols, dtype=np.int64), minlength=len(self.columns))
        self.idf = np.log((count - frequency + 0.5) / (frequency + 0.5) + 1.0)

    def scores(self, text: str) -> Any:
        import numpy as np

        indices, values = self.encoder.encode_queries([text])
        query = np.zeros(len(self.columns))
        for term, weight in zip(indices[0], values[0], strict=True):
            column = self.columns.get(term)
            if column is not None:
                query[column] += weight * self.idf[column]
        return self.matrix @ query

    def search(self, text: str, top_k: int, scores: Any = None) -> list[tuple[int, float]]:
        """(document position, score) of the ``top_k`` best documents with a match
        (``scores``: this text's ``scores``, when already computed)."""
        import numpy as np

        scores = self.scores(text) if scores is None else scores
        top_k = min(top_k, len(scores))
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(i), float(scores[i])) for i in best if scores[i] > 0]


@dataclass
class DevRanking:
    """Dev queries, the corpus they search, and BM25's runs (fixed for the whole training)."""

    items: list[RankingItem]
    passage_ids: list[str]
    texts: dict[str, str]
    lexical: RunDict
    depth: int = DEV_DEPTH
    #: Each dev query's BM25 score of every searched passage (the fusion's lexical evidence),
    #: computed once here instead of at every dev evaluation.
    bm25_scores: dict[str, Any] | None = None

    @classmethod
    def build(cls, items: Sequence[RankingItem], texts: dict[str, str], seed: int,
              depth: int = DEV_DEPTH, limit: int = DEV_CORPUS_LIMIT) -> DevRanking | None:
        """``None`` when there is no asymmetric dev query (pairs are not corpus searches)."""
        items = [item for item in items if item.task == "asymmetric" and item.positive_ids]
        if not items:
            return None
        ids = dev_corpus_ids(items, sorted(texts), seed, limit)
        index = SparseBM25([texts[pid] for pid in ids])
        scores = {item.id: index.scores(item.text) for item in items}
        lexical = {item.id: {ids[i]: score for i, score in
                             index.search(item.text, depth, scores[item.id])}
                   for item in items}
        return cls(list(items), ids, texts, lexical, depth, scores)

    @property
    def qrels(self) -> dict[str, dict[str, int]]:
        return {item.id: dict.fromkeys(item.positive_ids, 1) for item in self.items}

    def evaluate(self, student: D2LLMStudent, encoder: TextEncoder, chunk: int = 64
                 ) -> dict[str, Any]:
        """nDCG@10 and Recall@100 of every first stage, and of its rescoring by each fusion.

        Keys: ``dev_{stage}_ndcg@10``, ``dev_{stage}_recall@100`` (the first stage),
        ``dev_{stage}_rescored_ndcg@10`` (with the fusion to record) and what chose it
        (``choose_fusion``: ``dev_hybrid_fused_ndcg@10`` and ``dev_hybrid_lexical_*``, the
        BM25 weight; ``dev_{stage}_iem_*``, the IEM weight), the fusion itself
        (``fusion_{stage}_rescore``, ``_lexical``, ``_iem``), and ``dev_ndcg@10``.
        """
        with eval_mode(student), torch.no_grad():
            queries = encode_distinct(encoder, [i.text for i in self.items], "query", chunk)
            passages = encode_distinct(encoder, [self.texts[p] for p in self.passage_ids],
                                       "passage", chunk)
            query_ids = [item.id for item in self.items]
            dense = exact_search(queries.float().cpu(), passages.float().cpu(),
                                 self.passage_ids, query_ids, self.depth)
            first_stages = {"dense": dense, "hybrid": self.hybrid(dense)}
            row = {pid: i for i, pid in enumerate(self.passage_ids)}
            metrics: dict[str, float] = {}
            for stage in FIRST_STAGES:
                metrics.update(self._stage_metrics(student, stage, first_stages[stage],
                                                   queries, passages, row))
        metrics[DEV_METRIC] = sum(metrics[f"dev_{s}_rescored_ndcg@10"]
                                  for s in FIRST_STAGES) / len(FIRST_STAGES)
        stages = [metrics.pop(per_query_key(s)) for s in FIRST_STAGES]
        metrics[DEV_PER_QUERY] = {q: sum(stage[q] for stage in stages) / len(stages)
                                  for q in stages[0]}
        return metrics

    def hybrid(self, dense: RunDict) -> RunDict:
        """Dense and BM25 fused by reciprocal rank, cut to ``depth``."""
        fused = fuse_runs([dense, {q: self.lexical[q] for q in dense}])
        return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:self.depth])
                for q, docs in fused.items()}

    def _stage_metrics(self, student: D2LLMStudent, stage: str, run: RunDict,
                       queries: torch.Tensor, passages: torch.Tensor, row: dict[str, int]
                       ) -> dict[str, float]:
        qrels = self.qrels
        first = evaluate_run(qrels, run, ["ndcg@10", "recall@100"])
        candidates = {q: sorted(docs, key=lambda d: -docs[d]) for q, docs in run.items()}
        evidence = {}
        for index, item in enumerate(self.items):
            listed = candidates.get(item.id, [])
            if not listed:
                continue
            query = queries[index].to(student.device)
            vectors = passages[[row[p] for p in listed]].to(student.device)
            cosine = torch.nn.functional.normalize(vectors.float(), dim=-1) @ \
                torch.nn.functional.normalize(query.float(), dim=-1)
            logits = student.iem(query, vectors, item.task).float()
            lexical = None
            if stage == "hybrid" and self.bm25_scores is not None:
                scores = self.bm25_scores[item.id]
                lexical = torch.tensor([float(scores[row[p]]) for p in listed])
            evidence[item.id] = (cosine.cpu(), logits.cpu(), lexical)

        def per_query(weights: FusionWeights | None) -> dict[str, float]:
            rescored = {q: dict(zip(candidates[q], fuse(c, z, weights, x).tolist(),
                                    strict=True)) for q, (c, z, x) in evidence.items()}
            return evaluate_run(qrels, rescored, ["ndcg@10"],
                                per_query=True)["per_query"]["ndcg@10"]

        return choose_fusion(stage, per_query, first)


def choose_fusion(stage: str, per_query: Callable[[FusionWeights | None], dict[str, float]],
                  first: dict[str, float]) -> dict[str, float]:
    """The fusion to record for this first stage, and the dev figures that chose it.

    ``per_query(weights)`` gives each dev query's nDCG@10 under a fusion (``None``: the first
    stage's order). Hybrid: the dev-best BM25 weight of ``LEXICAL_GRID`` is kept when its
    gain over the default fusion's weight (0.5) clears the noise rule (``choose_weight``),
    else the default stays; the RRF order (no rescoring) competes as weight 0. Then the IEM
    weight: the dev-best of ``IEM_GRID`` on top, by the same rule against none. Starting from
    the default and moving only on evidence is the floor of the fusion: a documents-only dev
    set of a few dozen generated queries once recorded the RRF order where the default
    ranked the user's real questions better.
    """
    metrics = {f"dev_{stage}_ndcg@10": first["ndcg@10"],
               f"dev_{stage}_recall@100": first["recall@100"]}
    lexical = 0.0
    if stage == "hybrid":
        curve = {0.0: per_query(None)}  # 0: the RRF order, no rescoring
        curve.update({w: per_query(FusionWeights(lexical=w)) for w in LEXICAL_GRID})
        choice = choose_weight(curve, baseline=DEFAULT_LEXICAL_WEIGHT)
        metrics.update({f"dev_{stage}_default_ndcg@10": _mean(curve[DEFAULT_LEXICAL_WEIGHT]),
                        f"dev_{stage}_fused_ndcg@10": _mean(curve[choice.best]),
                        f"dev_{stage}_lexical_best": choice.best,
                        f"dev_{stage}_lexical_gain": choice.gain,
                        f"dev_{stage}_lexical_gain_se": choice.standard_error})
        if choice.weight == 0.0:
            metrics.update({f"dev_{stage}_rescored_ndcg@10": _mean(curve[0.0]),
                            f"fusion_{stage}_rescore": 0.0, f"fusion_{stage}_lexical": 0.0,
                            f"fusion_{stage}_iem": 0.0, per_query_key(stage): curve[0.0]})
            return metrics
        lexical = choice.weight
    curve = {w: per_query(FusionWeights(lexical=lexical, iem=w)) for w in IEM_GRID}
    choice = choose_weight(curve)
    metrics.update({f"dev_{stage}_iem_best": choice.best,
                    f"dev_{stage}_iem_best_ndcg@10": _mean(curve[choice.best]),
                    f"dev_{stage}_iem_gain": choice.gain,
                    f"dev_{stage}_iem_gain_se": choice.standard_error,
                    f"dev_{stage}_rescored_ndcg@10": _mean(curve[choice.weight]),
                    f"fusion_{stage}_rescore": 1.0, f"fusion_{stage}_lexical": lexical,
                    f"fusion_{stage}_iem": choice.weight,
                    per_query_key(stage): curve[choice.weight]})
    return metrics


def per_query_key(stage: str) -> str:
    """Where ``choose_fusion`` leaves each dev query's nDCG@10 under the recorded fusion."""
    return f"dev_{stage}_per_query"


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0


@dataclass(frozen=True)
class WeightChoice:
    weight: float
    best: float
    gain: float
    standard_error: float


#: One-sided 95%: the dev gain of the best weight must clear this many standard errors.
GAIN_Z = 1.645


def choose_weight(per_query: dict[float, dict[str, float]], z: float = GAIN_Z,
                  baseline: float = 0.0) -> WeightChoice:
    """The weight to record: the dev-best weight only when its gain over the ``baseline``
    weight (what a student records without dev evidence: no IEM, BM25 at the default
    fusion's 0.5) is beyond noise, else the baseline.

        d_q  = nDCG@10_q(w_best) - nDCG@10_q(baseline)          per dev query q
        keep w_best  iff  mean(d) > z * std(d) / sqrt(n)

    Why not the plain argmax: on 5-fold SciFact the dev-best IEM weight of a rank blend
    (0.4-0.7 on 65 dev queries) lowered held-out nDCG@10 by 0.010 (dense) and 0.015 (hybrid)
    on average; the argmax of several noisy figures picks noise.
    """
    import statistics

    means = {w: statistics.fmean(v.values()) for w, v in per_query.items()}
    best = max(means, key=lambda w: (round(means[w], 9), -w))
    diffs = [per_query[best][q] - per_query[baseline][q] for q in per_query[baseline]]
    gain = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    keep = best != baseline and gain > z * se
    return WeightChoice(weight=best if keep else baseline, best=best, gain=gain,
                        standard_error=se)


def fusion_from(metrics: dict[str, float]) -> dict[str, FusionWeights | None]:
    """The fusions a dev evaluation chose, as ``D2LLMConfig.fusion`` holds them."""
    fusion: dict[str, FusionWeights | None] = {}
    for stage in FIRST_STAGES:
        if f"fusion_{stage}_rescore" not in metrics:
            continue
        fusion[stage] = (FusionWeights(lexical=float(metrics[f"fusion_{stage}_lexical"]),
                                       iem=float(metrics[f"fusion_{stage}_iem"]))
                         if metrics[f"fusion_{stage}_rescore"] else None)
    return fusion


def format_report(metrics: dict[str, float]) -> str:
    """What the rescoring buys, as the distiller prints it."""
    lines = ["dev ranking over the corpus (nDCG@10):"]
    for stage in FIRST_STAGES:
        if f"dev_{stage}_ndcg@10" not in metrics:
            continue
        parts = [f"  {stage:<6} first stage {metrics[f'dev_{stage}_ndcg@10']:.4f}"]
        if f"dev_{stage}_lexical_best" in metrics:
            parts.append(f"+ BM25 scores (weight {metrics[f'dev_{stage}_lexical_best']:.2f}) "
                         f"{metrics[f'dev_{stage}_fused_ndcg@10']:.4f}, gain "
                         f"{metrics[f'dev_{stage}_lexical_gain']:+.4f} +- "
                         f"{metrics[f'dev_{stage}_lexical_gain_se']:.4f}")
        if f"dev_{stage}_iem_best" in metrics:
            parts.append(f"+ IEM (weight {metrics[f'dev_{stage}_iem_best']:.2f}) "
                         f"{metrics[f'dev_{stage}_iem_best_ndcg@10']:.4f}, gain "
                         f"{metrics[f'dev_{stage}_iem_gain']:+.4f} +- "
                         f"{metrics[f'dev_{stage}_iem_gain_se']:.4f}")
        if metrics.get(f"fusion_{stage}_rescore"):
            recorded = (f"BM25 {metrics[f'fusion_{stage}_lexical']:.2f}, "
                        f"IEM {metrics[f'fusion_{stage}_iem']:.2f}")
        else:
            recorded = "first-stage order kept"
        parts.append(f"recorded: {recorded} -> {metrics[f'dev_{stage}_rescored_ndcg@10']:.4f}")
        lines.append(" | ".join(parts))
    return "\n".join(lines)
