"""The fusion that rescores first-stage candidates (student/fusion.py) and its place in the
student."""

from __future__ import annotations

import pytest
import torch

from llama_index_d2llm.student.config import D2LLMConfig
from llama_index_d2llm.student.fusion import (
    FusionWeights,
    check_fusion,
    default_fusion,
    fuse,
    standardize,
)


def _order(scores: torch.Tensor) -> list[int]:
    return torch.argsort(scores, descending=True, stable=True).tolist()


COSINE = torch.tensor([0.90, 0.80, 0.70, 0.60])
LEXICAL = torch.tensor([0.0, 2.0, 30.0, 1.0])  # one passage stands far above on BM25
LOGITS = torch.tensor([0.0, 5.0, 1.0, 9.0])


def test_standardize_gives_mean_zero_unit_spread_and_zeros_without_spread():
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert z.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert z.std(unbiased=False).item() == pytest.approx(1.0)
    assert standardize(torch.tensor([4.0, 4.0, 4.0])).tolist() == [0.0, 0.0, 0.0]
    assert standardize(torch.tensor([4.0])).tolist() == [0.0]


def test_the_cosine_alone_orders_by_cosine():
    assert _order(fuse(COSINE, LOGITS, FusionWeights())) == [0, 1, 2, 3]


def test_a_bm25_score_far_above_the_rest_moves_its_passage_up():
    """What RRF cannot do: it sees ranks only, so the outlier counts as one place ahead."""
    assert _order(fuse(COSINE, LOGITS, FusionWeights(lexical=1.0), LEXICAL))[0] == 2


def test_the_iem_weight_brings_in_the_iem_order():
    assert _order(fuse(COSINE, LOGITS, FusionWeights(iem=100.0))) == _order(LOGITS)
    expected = standardize(COSINE) + 0.5 * standardize(LEXICAL) + 0.25 * standardize(LOGITS)
    torch.testing.assert_close(fuse(COSINE, LOGITS, FusionWeights(0.5, 0.25), LEXICAL),
                               expected)


def test_no_fusion_keeps_the_first_stage_order_also_per_row():
    assert _order(fuse(COSINE.flip(0), LOGITS, None)) == [0, 1, 2, 3]
    batched = fuse(torch.stack([COSINE, COSINE.flip(0)]), torch.stack([LOGITS, LOGITS]), None)
    assert _order(batched[0]) == _order(batched[1]) == [0, 1, 2, 3]
    rows = fuse(torch.stack([COSINE, COSINE.flip(0)]), torch.stack([LOGITS, LOGITS]),
                FusionWeights())
    assert _order(rows[0]) == [0, 1, 2, 3] and _order(rows[1]) == [3, 2, 1, 0]


def test_a_lexical_weight_without_bm25_scores_says_what_is_missing():
    with pytest.raises(ValueError, match="BM25"):
        fuse(COSINE, LOGITS, FusionWeights(lexical=0.5))


@pytest.mark.parametrize("fusion", [{"dense": {"iem": -1}}, {"sparse": None},
                                    {"hybrid": {"bm25": 0.5}}, {"hybrid": 0.5},
                                    {"dense": {"iem": True}}])
def test_bad_fusions_are_refused_with_their_name(fusion):
    with pytest.raises(ValueError, match="dense|hybrid|sparse|first_stage|iem"):
        check_fusion(fusion)
    with pytest.raises(ValueError):
        D2LLMConfig(fusion=fusion)


def test_the_fusion_round_trips_through_the_config_and_old_weights_are_dropped(caplog):
    config = D2LLMConfig(fusion={"dense": {"lexical": 0.0, "iem": 0.25}, "hybrid": None})
    again = D2LLMConfig.from_dict(config.to_dict())
    assert again.fusion == {"dense": FusionWeights(iem=0.25), "hybrid": None}
    old = config.to_dict()
    old.pop("fusion")
    old["iem_weights"] = {"dense": 0.4}
    assert D2LLMConfig.from_dict(old).fusion == {}
    assert "older version" in caplog.text


def test_student_rescore_honours_the_recorded_fusion(tiny_student_dir):
    from llama_index_d2llm.student import D2LLMStudent

    student = D2LLMStudent.from_pretrained(tiny_student_dir)
    query = student.encode(["the cat sat"], kind="query")[0]
    passages = student.encode(["a dog runs", "the cat sat on the mat", "quantum physics",
                               "the sun and the moon"], kind="passage")
    cosine = torch.nn.functional.cosine_similarity(passages, query[None], dim=-1)
    logits = student.score(query, passages)
    lexical = [0.0, 0.0, 40.0, 1.0]
    student.config.fusion = {}  # as distilled without dev queries
    assert student.fusion("dense") == default_fusion("dense") == FusionWeights()
    assert student.fusion("hybrid") == FusionWeights(lexical=0.5)
    assert _order(student.rescore(query, passages)) == _order(cosine)
    torch.testing.assert_close(
        student.rescore(query, passages, "hybrid", lexical_scores=lexical),
        fuse(cosine, logits, FusionWeights(lexical=0.5), torch.tensor(lexical)).float())
    student.config.fusion = {"dense": FusionWeights(iem=1000.0), "hybrid": None}
    assert _order(student.rescore(query, passages, "dense")) == _order(logits)
    assert _order(student.rescore(query, passages, "hybrid")) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="first_stage"):
        student.rescore(query, passages, first_stage="sparse")
