"""Stage 3: BM25 hard negatives."""

from __future__ import annotations

import numpy as np
import pytest

from llama_index_d2llm.trainer import mining
from llama_index_d2llm.trainer.corpus import CorpusError, Passage
from llama_index_d2llm.trainer.mining import (
    BM25Index,
    bm25_tokenize,
    mine_hard_negatives,
    mine_with_vectors,
)
from llama_index_d2llm.trainer.queries import Query

TEXTS = [
    "Protein folding in the cell is assisted by chaperones.",
    "Gene expression changes in cancer cells under stress.",
    "The river flows through the city to the sea.",
    "Climate change raises the energy demand of cities.",
    "Quantum physics describes the chemistry of the sun.",
    "Cancer cells divide without control; the gene p53 is often mutated.",
    "Music history of the city, from the river to the park.",
    "Computer network models learn from data.",
    "Water and energy: the moon and the sun drive the tides.",
    "Protein and gene networks in cancer: a data learning model.",
    "A dog runs in the park; the cat sat on the mat.",
    "",
]
PASSAGES = [Passage(f"p{i}", text) for i, text in enumerate(TEXTS)]
QUERIES = [
    Query("q1", "which gene is mutated in cancer cells", ["p5"]),
    Query("q2", "protein folding chaperones", ["p0", "p9"]),
    Query("q3", "river through the city", ["p2"]),
]


def test_scores_equal_rank_bm25_and_search_is_sorted():
    from rank_bm25 import BM25Okapi

    index = BM25Index(PASSAGES)
    reference = BM25Okapi([bm25_tokenize(p.text) for p in PASSAGES])
    for query in QUERIES + [Query("x", "the the unknownword sun", [])]:
        expected = reference.get_scores(bm25_tokenize(query.text))
        np.testing.assert_allclose(index.scores(query.text), expected, rtol=1e-12, atol=1e-12)
        hits = index.search(query.text, 5)
        assert len(hits) == 5
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        assert hits[0][1] == pytest.approx(expected.max())
    best = int(np.argmax(reference.get_scores(["p53", "mutated"])))
    assert index.search("p53 mutated", 1)[0][0] == f"p{best}" == "p5"
    assert len(index.search("cancer", 100)) == len(PASSAGES)


def test_ties_are_broken_by_corpus_order():
    passages = [Passage(f"t{i}", "same words here") for i in range(6)]
    assert [pid for pid, _ in BM25Index(passages).search("words", 4)] == ["t0", "t1", "t2", "t3"]


def test_positives_are_never_returned_and_count_is_kept():
    negatives = mine_hard_negatives(QUERIES, PASSAGES, num_negatives=4, show_progress=False)
    assert set(negatives) == {"q1", "q2", "q3"}
    for query in QUERIES:
        assert len(negatives[query.id]) == 4
        assert not set(negatives[query.id]) & set(query.positives)
        assert len(set(negatives[query.id])) == 4
    # the hardest negative for q1 shares "cancer", "cells" and "gene" with it
    assert negatives["q1"][0] in {"p1", "p9"}


def test_depth_limits_the_candidates():
    negatives = mine_hard_negatives(QUERIES, PASSAGES, num_negatives=2, depth=3,
                                    show_progress=False)
    index = BM25Index(PASSAGES)
    for query in QUERIES:
        top3 = [pid for pid, _ in index.search(query.text, 3)]
        assert negatives[query.id] == [pid for pid in top3 if pid not in query.positives][:2]
    with pytest.raises(ValueError, match="depth=1 is smaller than num_negatives=2"):
        mine_hard_negatives(QUERIES, PASSAGES, num_negatives=2, depth=1, show_progress=False)


def test_too_small_corpus_is_an_error_with_the_count_and_the_fix():
    with pytest.raises(CorpusError, match="has 5 passages.*at least 9.*at most 4"):
        mine_hard_negatives(QUERIES, PASSAGES[:5], num_negatives=8, show_progress=False)


def test_cache_is_used_and_keyed_by_inputs(tmp_path, monkeypatch):
    first = mine_hard_negatives(QUERIES, PASSAGES, num_negatives=3, cache_dir=tmp_path,
                                show_progress=False)
    assert len(list((tmp_path / "hard-negatives").glob("*.json"))) == 1

    def no_index(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(mining.BM25Index, "search", no_index)
    assert mine_hard_negatives(QUERIES, PASSAGES, num_negatives=3, cache_dir=tmp_path,
                               show_progress=False) == first
    monkeypatch.undo()
    # another setting is another entry, not a stale hit
    other = mine_hard_negatives(QUERIES, PASSAGES, num_negatives=2, cache_dir=tmp_path,
                                show_progress=False)
    assert all(len(ids) == 2 for ids in other.values())
    assert len(list((tmp_path / "hard-negatives").glob("*.json"))) == 2


def test_index_of_passages_without_words_is_an_error():
    with pytest.raises(CorpusError, match="no passage has a word"):
        BM25Index([Passage("a", "..."), Passage("b", "!!")])


def test_vector_mining_draws_from_the_nearest_non_excluded_passages():
    import torch

    passages = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [-1.0, 0.0]])
    ids = ["p0", "p1", "p2", "p3", "p4"]
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    exclude = [{"p0"}, {"p3", "p2"}]
    mined = mine_with_vectors(queries, passages, ids, exclude, count=2, depth=2, seed="s")
    assert sorted(mined[0]) == ["p1", "p2"]  # the two nearest after the excluded positive
    assert sorted(mined[1]) == ["p0", "p1"]  # p3 and p2 excluded; then the nearest to (0, 1)
    assert mine_with_vectors(queries, passages, ids, exclude, count=2, depth=2,
                             seed="s") == mined  # reproducible
    drawn = {tuple(sorted(mine_with_vectors(queries, passages, ids, exclude, count=1, depth=3,
                                             seed=str(k))[0])) for k in range(30)}
    assert drawn == {("p1",), ("p2",), ("p3",)}  # a random draw from the top 3, never p0
    with pytest.raises(CorpusError, match="--student-negatives"):
        mine_with_vectors(queries, passages, ids, [set(ids[:4]), set()], count=2, depth=2,
                          seed="s")
    with pytest.raises(ValueError, match="count"):
        mine_with_vectors(queries, passages, ids, exclude, count=3, depth=2, seed="s")


def test_hybrid_vector_mining_draws_from_the_fused_dense_and_lexical_order():
    import torch

    passages = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [-1.0, 0.0]])
    ids = ["p0", "p1", "p2", "p3", "p4"]
    queries = torch.tensor([[1.0, 0.0]])
    # dense top 3: p0 p1 p2; BM25: p4 p3 p1. Fused: p1 (1/62 + 1/63), then p0 and p4 (1/61
    # each), p3 (1/62), p2 (1/63); p0 is excluded, so the top 2 are p1 and p4
    lexical = [["p4", "p3", "p1"]]
    mined = mine_with_vectors(queries, passages, ids, [{"p0"}], count=2, depth=2, seed="s",
                              lexical=lexical)
    dense = mine_with_vectors(queries, passages, ids, [{"p0"}], count=2, depth=2, seed="s")
    assert sorted(dense[0]) == ["p1", "p2"]
    assert sorted(mined[0]) == ["p1", "p4"]
