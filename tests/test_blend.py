"""The rank blend of IEM and first stage (student/blend.py) and its place in the student."""

from __future__ import annotations

import pytest
import torch

from llama_index_d2llm.student.blend import blend_ranks, check_weights
from llama_index_d2llm.student.config import D2LLMConfig


def _order(scores: torch.Tensor) -> list[int]:
    return torch.argsort(scores, descending=True, stable=True).tolist()


def test_weight_zero_keeps_the_first_stage_order():
    logits = torch.tensor([0.1, 5.0, 3.0, -2.0])
    assert _order(blend_ranks(logits, 0.0)) == [0, 1, 2, 3]


def test_weight_one_orders_by_the_iem():
    logits = torch.tensor([0.1, 5.0, 3.0, -2.0])
    assert _order(blend_ranks(logits, 1.0)) == [1, 2, 0, 3]


@pytest.mark.slow
def test_half_weight_is_reciprocal_rank_fusion_of_both_orders():
    logits = torch.tensor([0.0, 2.0, 1.0])  # IEM ranks: 3, 1, 2
    blended = blend_ranks(logits, 0.5)
    expected = torch.tensor([0.5 / 61 + 0.5 / 63, 0.5 / 62 + 0.5 / 61, 0.5 / 63 + 0.5 / 62],
                            dtype=torch.float64)
    torch.testing.assert_close(blended, expected)


def test_batched_blend_ranks_each_row_on_its_own():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    blended = blend_ranks(logits, 1.0)
    assert _order(blended[0]) == [1, 0] and _order(blended[1]) == [0, 1]


@pytest.mark.parametrize("weights", [{"dense": 1.5}, {"dense": -0.1}, {"sparse": 0.5}])
def test_bad_weights_are_refused_with_their_name(weights):
    with pytest.raises(ValueError, match="dense|sparse|first_stage"):
        check_weights(weights)
    with pytest.raises(ValueError):
        D2LLMConfig(iem_weights=weights)


def test_weights_round_trip_through_the_config():
    config = D2LLMConfig(iem_weights={"dense": 0.3, "hybrid": 0.0})
    again = D2LLMConfig.from_dict(config.to_dict())
    assert again.iem_weights == {"dense": 0.3, "hybrid": 0.0}


def test_student_rescore_honours_the_recorded_weight(tiny_student_dir):
    from llama_index_d2llm.student import D2LLMStudent

    student = D2LLMStudent.from_pretrained(tiny_student_dir)
    query = student.encode(["the cat sat"], kind="query")[0]
    passages = student.encode(["a dog runs", "the cat sat on the mat", "quantum physics",
                               "the sun and the moon"], kind="passage")
    logits = student.score(query, passages)
    student.config.iem_weights = {"dense": 0.0, "hybrid": 1.0}
    assert _order(student.rescore(query, passages, first_stage="dense")) == [0, 1, 2, 3]
    assert _order(student.rescore(query, passages, first_stage="hybrid")) == _order(logits)
    student.config.iem_weights = {}
    assert _order(student.rescore(query, passages)) == _order(logits)  # unrecorded: IEM alone
    with pytest.raises(ValueError, match="first_stage"):
        student.rescore(query, passages, first_stage="sparse")
