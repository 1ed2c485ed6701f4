"""Evaluation half of ``scifact_kfold.py``: each student searched as a user's retriever does.

Per student: the corpus goes into a local Qdrant collection through ``D2LLMVectorStore``
(dense vectors + BM25 sparse vectors; the passage vectors come from the distiller's cached
backbone states, which the store's own re-encoding check verifies at ingestion), then every
held-out claim is retrieved with ``D2LLMRetriever`` (``similarity_top_k=100``, ``top_n=100``),
dense and hybrid, rescored with the fusion the student recorded (``student/fusion.py``); from
the same candidates also the first stage's order, the IEM's alone, and each fusion of the
distiller's grids (an oracle curve, reported, never used to choose). BM25 alone is measured twice:
rank_bm25 (the trainer's miner) and Qdrant's sparse vectors. Query latency: median over
``latency_queries`` claims of a whole ``retrieve`` call (query encoding included), dense and
hybrid, in this process.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from pathlib import Path

METRICS = ["ndcg@10", "recall@100"]
ROWS = ("bm25", "qdrant_bm25", "dense", "dense_iem_alone", "dense_rescored", "hybrid",
        "hybrid_iem_alone", "hybrid_rescored")
DTYPE = "bfloat16"
NAMESPACE = uuid.UUID("5d1f1c0e-9a1e-4f7e-8c55-2b3c4d5e6f70")


def _point_id(passage_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, passage_id))


def build_collection(student, embed, passages, cache_dir: Path, location: Path):
    """A hybrid embedded collection (Qdrant Edge) of the corpus, vectors from cached backbone
    states."""
    import torch
    from llama_index.core.schema import TextNode

    from llama_index_d2llm.edge import EdgeClient
    from llama_index_d2llm.store import D2LLMVectorStore
    from llama_index_d2llm.trainer.token_states import TokenStateCache

    lora = student.config.lora
    cache = TokenStateCache(student, cache_dir, depth=lora.first_tuned_layer if lora else None,
                            show_progress=False)
    texts = [p.text for p in passages]
    cache.ensure(texts, "passage")
    with torch.inference_mode():
        vectors = torch.cat([cache.vectors(texts[i:i + 256], "passage").float().cpu()
                             for i in range(0, len(texts), 256)])
    client = EdgeClient.open(location)
    by_id = {p.id: vectors[i] for i, p in enumerate(passages)}
    if client.collection_exists("scifact"):
        client.delete_collection("scifact")
    store = D2LLMVectorStore("scifact", embed, client=client)
    nodes = [TextNode(id_=_point_id(p.id), text=p.text, embedding=vectors[i].tolist(),
                      metadata={"passage_id": p.id}, excluded_embed_metadata_keys=["passage_id"],
                      excluded_llm_metadata_keys=["passage_id"])
             for i, p in enumerate(passages)]
    for start in range(0, len(nodes), 512):
        store.add(nodes[start:start + 512])
    return client, store, by_id


def retrieve_runs(student, embed, store, queries: dict[str, str], query_vectors,
                  stage: str) -> tuple[dict[str, dict], dict[str, list]]:
    """Runs of one first stage: as the retriever ranks (the recorded fusion), the first
    stage's own order, and the IEM's alone over the same candidates; and the candidates."""
    from llama_index.core.schema import QueryBundle

    from llama_index_d2llm.postprocessor import RETRIEVAL_SCORE_KEY
    from llama_index_d2llm.retriever import D2LLMRetriever

    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=100,
                               top_n=100, hybrid=stage == "hybrid")
    runs: dict[str, dict] = {stage: {}, f"{stage}_iem_alone": {}, f"{stage}_rescored": {}}
    candidates = {}
    for query_id, text in queries.items():
        bundle = QueryBundle(query_str=text, embedding=query_vectors[query_id])
        nodes = retriever.retrieve(bundle)
        ids = [n.node.metadata["passage_id"] for n in nodes]
        runs[f"{stage}_rescored"][query_id] = {pid: float(n.score)
                                               for pid, n in zip(ids, nodes, strict=True)}
        first = {pid: float(n.node.metadata[RETRIEVAL_SCORE_KEY])
                 for pid, n in zip(ids, nodes, strict=True)}
        runs[stage][query_id] = first
        candidates[query_id] = sorted(first, key=lambda d: -first[d])
    return runs, candidates


def evidence(student, query_vectors, passage_vectors: dict, candidates: dict[str, list],
             bm25=None, texts: dict[str, str] | None = None) -> dict[str, tuple]:
    """Per query: the candidates' cosine, IEM logit and (given ``bm25``) BM25 score."""
    import torch

    found = {}
    for query_id, ids in candidates.items():
        query = torch.as_tensor(query_vectors[query_id], dtype=torch.float32)
        vectors = torch.stack([passage_vectors[pid] for pid in ids]).float()
        cosine = torch.nn.functional.cosine_similarity(vectors, query[None], dim=-1)
        logits = student.score(query, vectors)
        lexical = None
        if bm25 is not None:
            scores = bm25[0].scores(texts[query_id])
            lexical = torch.tensor([float(scores[bm25[1][pid]]) for pid in ids])
        found[query_id] = (cosine, logits, lexical)
    return found


def bm25_alone_run(store, passages, queries: dict[str, str]) -> dict:
    """Qdrant's BM25 alone, scored in memory exactly as Qdrant scores the collection's sparse
    vectors (tests/test_dev_ranking.py checks it against a collection); the local mode's
    pure-Python sparse search would take 0.5 s a query here."""
    from llama_index_d2llm.trainer.dev_ranking import SparseBM25

    index = SparseBM25([p.text for p in passages], store.bm25)
    return {q: {passages[i].id: s for i, s in index.search(text, 100)}
            for q, text in queries.items()}


def fusion_curve(candidates: dict[str, list], found: dict[str, tuple], qrels: dict,
                 stage: str, lexical: float) -> dict[str, float]:
    """Held-out nDCG@10 of the same candidates under each fusion of the distiller's grids:
    what the recorded fusion could have been (an oracle, reported, never used to choose)."""
    from llama_index_d2llm.student.fusion import FusionWeights, fuse
    from llama_index_d2llm.trainer.dev_ranking import IEM_GRID, LEXICAL_GRID
    from llama_index_d2llm.trainer.evaluation import evaluate_run

    grid = {f"iem={w}": FusionWeights(lexical=lexical, iem=w) for w in IEM_GRID}
    if stage == "hybrid":
        grid.update({f"lexical={w}": FusionWeights(lexical=w) for w in LEXICAL_GRID})
        grid["first_stage"] = None
    curve = {}
    for label, weights in grid.items():
        run = {q: dict(zip(ids, fuse(*found[q][:2], weights, found[q][2]).tolist(), strict=True))
               for q, ids in candidates.items()}
        curve[label] = evaluate_run(qrels, run, ["ndcg@10"])["ndcg@10"]
    return curve


def retrieve_times(embed, store, queries: list[str], stage: str,
                   top_k: int = 100) -> list[float]:
    """ms of each whole ``retrieve()`` call (query encoding included), after one warm-up."""
    from llama_index_d2llm.retriever import D2LLMRetriever

    retriever = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=top_k,
                               top_n=10, hybrid=stage == "hybrid")
    retriever.retrieve(queries[0])  # warm-up
    times = []
    for text in queries:
        start = time.perf_counter()
        retriever.retrieve(text)
        times.append(1000 * (time.perf_counter() - start))
    return times


def latency(embed, store, queries: list[str], stage: str) -> dict[str, float]:
    """Median and quartiles of whole retrieve() calls (query encoding included), in ms."""
    times = retrieve_times(embed, store, queries, stage)
    quartiles = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times), "q1_ms": quartiles[0],
            "q3_ms": quartiles[2], "queries": len(times)}


def evaluate_student(work: Path, data: Path, name: str, queries: dict[str, str],
                     qrels: dict, latency_queries: int) -> dict:
    from llama_index_d2llm import D2LLMEmbedding, D2LLMStudent
    from llama_index_d2llm.trainer.corpus import load_corpus
    from llama_index_d2llm.trainer.dev_ranking import SparseBM25
    from llama_index_d2llm.trainer.evaluation import BeirData, bm25_run, evaluate_run

    passages = load_corpus(data / "corpus.jsonl")
    # the dtype the states were cached in (a timing probe under load may pick the other one)
    student = D2LLMStudent.from_pretrained(work / "students" / name, dtype=DTYPE)
    embed = D2LLMEmbedding.from_student(student)
    timings = {}
    start = time.perf_counter()
    client, store, passage_vectors = build_collection(
        student, embed, passages, work / "distill" / "token_states", work / "qdrant" / name)
    timings["ingest_s"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        vectors = {q: embed.get_query_embedding(t) for q, t in queries.items()}
        timings["encode_queries_s"] = time.perf_counter() - start
        runs = {"bm25": bm25_run(BeirData(passages, queries, qrels), top_k=100),
                "qdrant_bm25": bm25_alone_run(store, passages, queries)}
        index = SparseBM25([p.text for p in passages], store.bm25)
        rows = {p.id: i for i, p in enumerate(passages)}
        curves = {}
        for stage in ("dense", "hybrid"):
            stage_runs, candidates = retrieve_runs(student, embed, store, queries, vectors,
                                                   stage)
            runs.update(stage_runs)
            found = evidence(student, vectors, passage_vectors, candidates,
                             (index, rows) if stage == "hybrid" else None, queries)
            runs[f"{stage}_iem_alone"] = {
                q: dict(zip(ids, found[q][1].tolist(), strict=True))
                for q, ids in candidates.items()}
            recorded = student.fusion(stage)
            curves[stage] = fusion_curve(candidates, found, qrels, stage,
                                         recorded.lexical if recorded else 0.5)
        fusion = {stage: (None if w is None else w.to_dict())
                  for stage, w in ((s, student.fusion(s)) for s in ("dense", "hybrid"))}
        result = {"queries": len(queries), "fusion": fusion, "ndcg@10_by_fusion": curves,
                  "fingerprint": student.fingerprint, "timings": timings,
                  **{row: evaluate_run(qrels, runs[row], METRICS) for row in ROWS}}
        sample = list(queries.values())[:latency_queries]
        if sample:
            result["latency"] = {stage: latency(embed, store, sample, stage)
                                 for stage in ("dense", "hybrid")}
        return result
    finally:
        client.close()


def evaluate_jobs(work: Path, data: Path, queries: dict[str, str], qrels: dict, jobs: list,
                  variants: list, docs_only: list[str], latency_queries: int) -> None:
    from scifact_kfold import mean_std, save

    results = {}
    for name, _, held_out, _ in jobs:
        path = work / "eval" / f"{name}.json"
        if not (work / "students" / name / "d2llm_config.json").exists():
            print(f"{name}: no student yet, skipped", flush=True)
            continue
        if not path.exists():
            subset = {q: queries[q] for q in sorted(held_out)}
            result = evaluate_student(work, data, name, subset, {q: qrels[q] for q in subset},
                                      latency_queries if name.endswith("fold0") or
                                      name.endswith("-docs") else 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
        results[name] = json.loads(path.read_text())
        print(name, {row: round(results[name][row]["ndcg@10"], 4) for row in ROWS}, flush=True)
    summary = {}
    for variant, _ in variants:
        folds = [results[n] for n in sorted(results) if n.startswith(f"{variant}-fold")]
        if not folds:
            continue
        summary[variant] = {"folds": len(folds), **{
            row: {metric: mean_std([f[row][metric] for f in folds]) for metric in METRICS}
            for row in ROWS}}
        for stage in ("dense", "hybrid"):
            summary[variant][f"rescoring_gain_{stage}_ndcg@10"] = mean_std(
                [f[f"{stage}_rescored"]["ndcg@10"] - f[stage]["ndcg@10"] for f in folds])
        summary[variant]["fusion"] = [f["fusion"] for f in folds]
        curves = [f["ndcg@10_by_fusion"] for f in folds if "ndcg@10_by_fusion" in f]
        if curves:  # the held-out figure each fixed fusion would have given (not a choice)
            summary[variant]["ndcg@10_by_fusion"] = {
                stage: {w: mean_std([c[stage][w] for c in curves]) for w in curves[0][stage]}
                for stage in curves[0]}
    for name in docs_only:
        if f"{name}-docs" in results:
            summary[f"{name}-docs"] = results[f"{name}-docs"]
    save(work, {"results": summary, "per_student": results})
    print(json.dumps({v: {row: {m: round(s[row][m]["mean"], 4) for m in METRICS}
                          for row in ROWS} for v, s in summary.items() if "dense" in s
                      and isinstance(s["dense"], dict) and "ndcg@10" in s["dense"]
                      and isinstance(s["dense"]["ndcg@10"], dict)}, indent=1), flush=True)
