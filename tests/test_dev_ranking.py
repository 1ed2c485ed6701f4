"""The whole-corpus dev ranking: its BM25 ranks as the product's Qdrant hybrid collection."""

from __future__ import annotations

import pytest

from llama_index_d2llm.trainer.dataset import RankingItem
from llama_index_d2llm.trainer.dev_ranking import SparseBM25, dev_corpus_ids

TEXTS = [
    "the cat sat on the mat", "a dog runs in the park", "the cat and the dog",
    "protein folding in the cell", "gene expression in cancer cells", "water and energy",
    "climate change and rivers", "music history of the city", "quantum physics of the sun",
    "cells divide and cells grow", "the moon and the sun", "computer network models",
]


def test_in_memory_bm25_scores_like_qdrants_sparse_vectors_with_idf():
    from qdrant_client import QdrantClient, models

    from llama_index_d2llm.sparse import BM25Encoder, sparse_vector_params

    encoder = BM25Encoder()
    index = SparseBM25(TEXTS, encoder)
    client = QdrantClient(location=":memory:")
    client.create_collection("c", vectors_config={},
                             sparse_vectors_config={"bm25": sparse_vector_params()})
    indices, values = encoder.encode_documents(TEXTS)
    client.upsert("c", points=[
        models.PointStruct(id=i, vector={"bm25": models.SparseVector(indices=ix, values=vx)})
        for i, (ix, vx) in enumerate(zip(indices, values, strict=True))])
    for query in ("cells in cancer", "the sun", "dog park", "cat"):
        ours = index.search(query, 5)
        theirs = client.query_points("c", query=encoder.query_vector(query), using="bm25",
                                     limit=5).points
        assert [i for i, _ in ours] == [p.id for p in theirs]
        assert [s for _, s in ours] == pytest.approx([p.score for p in theirs], rel=1e-4)


def test_dev_corpus_keeps_every_positive_when_it_samples():
    items = [RankingItem(id="q", text="x", task="asymmetric", positive_ids=["p7", "p9"],
                         hard_negative_ids=[])]
    ids = [f"p{i}" for i in range(10)]
    assert dev_corpus_ids(items, ids, seed=1, limit=20) == ids
    sample = dev_corpus_ids(items, ids, seed=1, limit=4)
    assert len(sample) == 4 and {"p7", "p9"} <= set(sample)
    assert dev_corpus_ids(items, ids, seed=1, limit=4) == sample


def test_the_dev_best_weight_is_kept_only_when_its_gain_is_beyond_noise():
    from llama_index_d2llm.trainer.dev_ranking import choose_weight

    queries = [f"q{i}" for i in range(40)]
    first = {q: 0.5 for q in queries}
    # a steady gain on every query: kept
    steady = {0.0: first, 0.5: {q: 0.6 for q in queries}, 1.0: {q: 0.55 for q in queries}}
    assert choose_weight(steady).weight == 0.5
    # a larger mean gain that one lucky query makes: not kept, the first stage stays
    lucky = {0.0: first, 0.5: {q: (1.0 if q == "q0" else 0.49) for q in queries},
             1.0: {q: 0.4 for q in queries}}
    choice = choose_weight(lucky)
    assert choice.best == 0.5 and choice.gain > 0 and choice.weight == 0.0
    # nothing beats the first stage: 0
    worse = {0.0: first, 0.5: {q: 0.4 for q in queries}, 1.0: {q: 0.3 for q in queries}}
    assert choose_weight(worse).weight == 0.0


def test_choose_fusion_moves_from_the_default_only_on_evidence_then_weighs_the_iem():
    from llama_index_d2llm.student.fusion import FusionWeights
    from llama_index_d2llm.trainer.dev_ranking import choose_fusion, format_report, fusion_from

    queries = [f"q{i}" for i in range(30)]
    first = {"ndcg@10": 0.5, "recall@100": 0.9}

    def helps(weights):  # BM25 helps on every query; the IEM only adds noise
        if weights is None:
            return {q: 0.5 for q in queries}
        bonus = 0.1 if weights.lexical else 0.0
        lucky = 0.2 if weights.iem else 0.0  # on one query only: noise
        return {q: 0.5 + bonus + (lucky if q == "q0" else 0.0) for q in queries}

    # every BM25 weight helps as much: the best (0.25) gains nothing over the default's 0.5
    metrics = choose_fusion("hybrid", helps, first)
    assert fusion_from(metrics) == {"hybrid": FusionWeights(lexical=0.5)}
    assert metrics["dev_hybrid_rescored_ndcg@10"] == pytest.approx(0.6)
    assert "recorded: BM25 0.50, IEM 0.00" in format_report(metrics)

    def more_bm25(weights):  # the heavier BM25, the better, on every query
        return {q: 0.5 if weights is None else 0.5 + weights.lexical / 10 for q in queries}

    metrics = choose_fusion("hybrid", more_bm25, first)
    assert fusion_from(metrics) == {"hybrid": FusionWeights(lexical=1.5)}

    def hurts(weights):
        return {q: 0.5 if weights is None else 0.45 for q in queries}

    metrics = choose_fusion("hybrid", hurts, first)
    assert fusion_from(metrics) == {"hybrid": None}
    assert metrics["dev_hybrid_rescored_ndcg@10"] == pytest.approx(0.5)
    assert "first-stage order kept" in format_report(metrics)

    def iem_helps(weights):
        return {q: 0.5 + (0.05 if weights and weights.iem else 0.0) for q in queries}

    metrics = choose_fusion("dense", iem_helps, first)
    assert fusion_from(metrics) == {"dense": FusionWeights(iem=0.1)}
