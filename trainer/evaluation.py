"""Evaluation: BEIR retrieval (first stage and after IEM reranking) and STS correlation.

Metrics come from ``ranx`` (nDCG@10, Recall@100, MRR@10 by default), never hand-written, and
any run dict can be scored with the same code (``evaluate_run``), so BM25 or teacher-reranking
baselines are measured exactly like the student. The first stage is exact cosine search over
the student's vectors (or a local Qdrant collection, as in production); the IEM then rescores
each query's top ``rerank_k``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMError, D2LLMStudent
from llama_index_d2llm.trainer.corpus import Passage, load_corpus
from llama_index_d2llm.trainer.queries import SymmetricPair

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
Qrels = dict[str, dict[str, int]]
RunDict = dict[str, dict[str, float]]
Encoder = Callable[[Sequence[str], str], torch.Tensor]


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
        return {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}
    run: RunDict = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise EvaluationError(f"{path}:{number}: a TREC run line has 6 fields "
                                  "(query Q0 doc rank score tag), this one has {len(fields)}")
        run.setdefault(fields[0], {})[fields[2]] = float(fields[4])
    return run


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba's type-safety chatter
        fused = fuse([RanxRun(run) for run in kept], method=method)
    return {q: {d: float(s) for d, s in docs.items()} for q, docs in fused.to_dict().items()}


def bm25_run(data: BeirData, top_k: int = 100, show_progress: bool = False) -> RunDict:
    """BM25 (Okapi, the trainer's negative miner) over the corpus: the lexical baseline."""
    from llama_index_d2llm.trainer.mining import BM25Index

    index = BM25Index(data.corpus)
    items = sorted(data.queries.items())
    if show_progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="BM25", unit="query")
    return {query_id: dict(index.search(text, top_k)) for query_id, text in items}


# ---------------------------------------------------------------------------- BEIR data
@dataclass
class BeirData:
    corpus: list[Passage]
    queries: dict[str, str]
    qrels: Qrels


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
            score = int(float(fields[2]))
        except ValueError:
            if number == 1:
                continue  # header
            raise EvaluationError(f"{path}:{number}: score {fields[2]!r} is not a number"
                                  ) from None
        qrels.setdefault(fields[0].strip(), {})[fields[1].strip()] = score
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


# ---------------------------------------------------------------------------- search
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


def exact_search(query_vectors: torch.Tensor, passage_vectors: torch.Tensor,
                 passage_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                 chunk: int = 256) -> RunDict:
    """Top ``top_k`` passages per query by cosine similarity (exact, chunked over queries)."""
    passages = torch.nn.functional.normalize(passage_vectors.float(), dim=-1)
    k = min(top_k, len(passage_ids))
    run: RunDict = {}
    for start in range(0, len(query_ids), chunk):
        queries = torch.nn.functional.normalize(query_vectors[start:start + chunk].float(), dim=-1)
        scores, index = (queries @ passages.T).topk(k, dim=1)
        for row, query_id in enumerate(query_ids[start:start + chunk]):
            run[query_id] = {passage_ids[i]: float(s)
                             for s, i in zip(scores[row].tolist(), index[row].tolist(),
                                             strict=True)}
    return run


def qdrant_search(query_vectors: torch.Tensor, passage_vectors: torch.Tensor,
                  passage_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                  location: str = ":memory:") -> RunDict:
    """The same through a local Qdrant collection (cosine), as a deployment would search."""
    return qdrant_runs(query_vectors, passage_vectors, passage_ids, query_ids, top_k,
                       location)["dense"]


def _open_local_qdrant(location: str) -> Any:
    from qdrant_client import QdrantClient

    return (QdrantClient(location=":memory:") if location == ":memory:"
            else QdrantClient(path=location))


def qdrant_runs(query_vectors: torch.Tensor | None, passage_vectors: torch.Tensor | None,
                passage_ids: Sequence[str], query_ids: Sequence[str], top_k: int,
                location: str = ":memory:", *, passage_texts: Sequence[str] | None = None,
                query_texts: Sequence[str] | None = None, bm25: Any = None) -> dict[str, RunDict]:
    """Runs of a local Qdrant collection built as ``D2LLMVectorStore`` builds one.

    With vectors: ``"dense"`` (cosine). With texts too: ``"sparse"`` (BM25 sparse vectors,
    IDF by Qdrant) and ``"hybrid"`` (both fused by RRF in one ``query_points`` call, the
    request ``D2LLMRetriever`` sends: ``llama_index_d2llm.sparse.hybrid_query``). Texts
    without vectors: ``"sparse"`` only.
    """
    from qdrant_client import models

    from llama_index_d2llm.sparse import (
        SPARSE_VECTOR_NAME,
        BM25Encoder,
        hybrid_query,
        sparse_vector_params,
    )

    dense_name, sparse_name = "text-dense", SPARSE_VECTOR_NAME
    lexical = passage_texts is not None and query_texts is not None
    if passage_vectors is None and not lexical:
        raise EvaluationError("qdrant_runs needs passage vectors, texts, or both")
    encoder = (bm25 or BM25Encoder()) if lexical else None
    client = _open_local_qdrant(location)
    name = "d2llm-evaluation"
    try:
        if client.collection_exists(name):
            client.delete_collection(name)
        client.create_collection(
            name, vectors_config={} if passage_vectors is None else {
                dense_name: models.VectorParams(size=passage_vectors.shape[1],
                                                distance=models.Distance.COSINE)},
            sparse_vectors_config={sparse_name: sparse_vector_params()} if lexical else None)
        for start in range(0, len(passage_ids), 512):
            stop = min(start + 512, len(passage_ids))
            vectors: list[dict[str, Any]] = [{} for _ in range(start, stop)]
            if passage_vectors is not None:
                for i, vector in enumerate(passage_vectors[start:stop]):
                    vectors[i][dense_name] = vector.tolist()
            if encoder is not None:
                indices, values = encoder.encode_documents(passage_texts[start:stop])
                for i, (idx, val) in enumerate(zip(indices, values, strict=True)):
                    vectors[i][sparse_name] = models.SparseVector(indices=idx, values=val)
            client.upsert(name, points=[
                models.PointStruct(id=start + i, vector=vector,
                                   payload={"passage_id": passage_ids[start + i]})
                for i, vector in enumerate(vectors)])
        requests: dict[str, list[Any]] = {}
        if passage_vectors is not None:
            requests["dense"] = [dict(query=v.tolist(), using=dense_name, limit=top_k)
                                 for v in query_vectors]
        if encoder is not None:
            sparse = [models.SparseVector(indices=i, values=v)
                      for i, v in zip(*encoder.encode_queries(query_texts), strict=True)]
            requests["sparse"] = [dict(query=q, using=sparse_name, limit=top_k) for q in sparse]
            if passage_vectors is not None:
                requests["hybrid"] = [
                    hybrid_query(v.tolist(), q, dense_name=dense_name, sparse_name=sparse_name,
                                 limit=top_k)
                    for v, q in zip(query_vectors, sparse, strict=True)]
        runs: dict[str, RunDict] = {}
        for kind, kind_requests in requests.items():
            run: RunDict = {}
            for start in range(0, len(query_ids), 64):
                # the product's request, without the vectors only the IEM needs
                batch = [models.QueryRequest(with_payload=True, **{
                    k: v for k, v in r.items() if k != "with_vectors"})
                    for r in kind_requests[start:start + 64]]
                for query_id, response in zip(query_ids[start:start + 64],
                                              client.query_batch_points(name, batch),
                                              strict=True):
                    run[query_id] = {point.payload["passage_id"]: float(point.score)
                                     for point in response.points}
            runs[kind] = run
        return runs
    finally:
        client.close()


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
    from llama_index_d2llm.trainer.cache import atomic_write_json

    return atomic_write_json(path, obj)
