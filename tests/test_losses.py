"""Each distillation loss against a case computed by hand, and the combined objective."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from llama_index_d2llm.student import InteractionEmulation
from llama_index_d2llm.trainer.losses import (
    D2LLMDistillationLoss,
    LossWeights,
    contrastive_imitation_loss,
    feature_imitation_loss,
    in_batch_loss,
    pairwise_rank_loss,
    rank_imitation_loss,
    vector_contrastive_loss,
)


def close(value: torch.Tensor, expected: float) -> None:
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_contrastive_imitation_weights_logits_by_teacher():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = torch.tensor([[0.5, 0.5, 0.0]])
    # weights [0.5, 1 - 0.5, 1 - 0] -> weighted logits [1.0, 0.5, 0.0]
    close(contrastive_imitation_loss(logits, probs), math.log(math.e + math.exp(0.5) + 1) - 1)
    # temperature 0.5 doubles the weighted logits: [2, 1, 0]
    close(contrastive_imitation_loss(logits, probs, temperature=0.5),
          math.log(math.exp(2) + math.e + 1) - 2)


def test_contrastive_imitation_is_infonce_for_a_certain_teacher():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, 0.5]])
    certain = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    expected = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    close(contrastive_imitation_loss(logits, certain), expected.item())


def test_rank_imitation_is_one_minus_pearson():
    student = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # r = 1, -1, and (centred [-1,0,1].[-1,1,0]) / (sqrt2 sqrt2) = 0.5
    close(rank_imitation_loss(student, teacher), ((1 - 1) + (1 + 1) + (1 - 0.5)) / 3)
    with pytest.raises(ValueError, match="two candidates"):
        rank_imitation_loss(torch.zeros(2, 1), torch.zeros(2, 1))


def test_pairwise_rank_counts_only_pairs_the_teacher_orders():
    hard_logits = torch.tensor([[1.0, 0.0]])
    easy_logits = torch.tensor([[0.0]])
    hard_probs = torch.tensor([[0.9, 0.2]])
    easy_probs = torch.tensor([[0.4]])
    # lambda = [0.5, max(0, -0.2) = 0]; -0.5 log sigmoid(1) averaged over the 2 pairs
    expected = 0.5 * math.log(1 + math.exp(-1)) / 2
    close(pairwise_rank_loss(hard_logits, easy_logits, hard_probs, easy_probs), expected)
    empty = pairwise_rank_loss(hard_logits, torch.zeros(1, 0), hard_probs, torch.zeros(1, 0))
    close(empty, 0.0)


def test_feature_imitation_is_squared_frobenius_of_cosine_matrices():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],    # cosines: identity
                            [[2.0, 0.0], [1.0, 0.0]]])   # cosines: all ones
    teacher = torch.tensor([[[1.0, 0.5], [0.5, 1.0]],
                            [[1.0, 1.0], [1.0, 1.0]]])
    # query 1: two off-diagonal differences of 0.5 -> 0.5; query 2: 0
    close(feature_imitation_loss(student, teacher), (0.5 + 0.0) / 2)


def test_in_batch_infonce_and_false_negative_mask():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    row0 = math.log(1 + math.exp(-2))
    close(in_batch_loss(logits), (row0 + math.log(2)) / 2)
    mask = torch.tensor([[False, True], [False, False]])
    close(in_batch_loss(logits, mask), (0 + math.log(2)) / 2)
    close(in_batch_loss(logits * 2, temperature=2.0), (row0 + math.log(2)) / 2)


def test_vector_loss_weights_hard_negatives_and_uses_in_batch_positives():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[[1.0, 0.0], [0.6, 0.8]],    # positive, hard negative
                               [[0.0, 1.0], [0.6, 0.8]]])
    probs = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    # query 1: [cos p1 = 1, (1 - 0.5) * 0.6, cos(q1, p2) = 0]
    # query 2: [1, (1 - 0) * 0.8, cos(q2, p1) = 0]
    expected = (math.log(math.e + math.exp(0.3) + 1) - 1
                + math.log(math.e + math.exp(0.8) + 1) - 1) / 2
    close(vector_contrastive_loss(queries, candidates, probs, temperature=1.0), expected)
    # masking p2 as relevant to q1 removes the third logit of query 1
    mask = torch.tensor([[False, True], [False, False]])
    masked = (math.log(math.e + math.exp(0.3)) - 1 + math.log(math.e + math.exp(0.8) + 1) - 1) / 2
    close(vector_contrastive_loss(queries, candidates, probs, mask, temperature=1.0), masked)


def test_mined_negatives_join_the_in_batch_and_vector_denominators():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    mined = torch.tensor([[1.0], [0.0]])
    # row 0: -log(e^2 / (e^2 + e^0 + e^1)); row 1: -log(e^1 / (e^1 + e^1 + e^0))
    expected = (math.log(math.exp(2) + 1 + math.e) - 2 + math.log(2 * math.e + 1) - 1) / 2
    close(in_batch_loss(logits, mined_logits=mined), expected)
    close(in_batch_loss(logits, mined_logits=torch.zeros(2, 0)), in_batch_loss(logits).item())
    with pytest.raises(ValueError, match="mined-negative logits"):
        in_batch_loss(logits, mined_logits=torch.zeros(3, 1))

    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[[1.0, 0.0], [0.6, 0.8]],
                               [[0.0, 1.0], [0.6, 0.8]]])
    probs = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    extra = torch.tensor([[[2.0, 0.0]], [[0.0, -3.0]]])  # cosines 1 and -1 after normalising
    expected = (math.log(math.e + math.exp(0.3) + 1 + math.e) - 1
                + math.log(math.e + math.exp(0.8) + 1 + math.exp(-1)) - 1) / 2
    close(vector_contrastive_loss(queries, candidates, probs, temperature=1.0,
                                  mined_vectors=extra), expected)


def _batch(batch=3, negatives=2, easy=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        query_vectors=F.normalize(torch.randn(batch, dim, generator=generator), dim=-1),
        candidate_vectors=F.normalize(torch.randn(batch, 1 + negatives, dim,
                                                  generator=generator), dim=-1),
        teacher_logits=torch.randn(batch, 1 + negatives, generator=generator),
        teacher_probs=torch.rand(batch, 1 + negatives, generator=generator),
        teacher_cosines=torch.rand(batch, 1 + negatives, 1 + negatives, generator=generator),
        easy_vectors=F.normalize(torch.randn(batch, easy, dim, generator=generator), dim=-1),
        easy_probs=torch.rand(batch, easy, generator=generator),
    )


def test_total_is_the_weighted_sum_and_zero_weights_skip_terms():
    torch.manual_seed(0)
    iem = InteractionEmulation(8, 16)
    torch.nn.init.normal_(iem.output.weight)  # a trained head, not the zero start
    inputs = _batch()
    weights = LossWeights(pairwise_rank=0.5, feature_imitation=0.25, vector=2.0)
    out = D2LLMDistillationLoss(weights)(iem, tasks=["asymmetric"] * 3, **inputs)
    names = ["in_batch", "contrastive_imitation", "rank_imitation", "pairwise_rank",
             "feature_imitation", "vector"]
    assert set(out) == {*names, "loss"}
    expected = sum(getattr(weights, name) * out[name] for name in names)
    close(out["loss"], expected.item())
    out["loss"].backward()
    assert iem.f1.weight.grad is not None and iem.f1.weight.grad.abs().sum() > 0

    only_ci = LossWeights(in_batch=0, rank_imitation=0, pairwise_rank=0, feature_imitation=0,
                          vector=0)
    out = D2LLMDistillationLoss(only_ci)(iem, tasks=["asymmetric"] * 3, **inputs)
    assert set(out) == {"contrastive_imitation", "loss"}
    logits = iem(inputs["query_vectors"], inputs["candidate_vectors"], "asymmetric")
    close(out["loss"], contrastive_imitation_loss(logits, inputs["teacher_probs"]).item())


def test_mixed_tasks_use_their_own_iem_branch():
    torch.manual_seed(0)
    iem = InteractionEmulation(8, 16)
    torch.nn.init.normal_(iem.output.weight)  # a trained head, not the zero start
    inputs = _batch()
    tasks = ["asymmetric", "symmetric", "asymmetric"]
    only_ci = LossWeights(in_batch=0, rank_imitation=0, pairwise_rank=0, feature_imitation=0,
                          vector=0)
    out = D2LLMDistillationLoss(only_ci)(iem, tasks=tasks, **inputs)
    rows = [iem(inputs["query_vectors"][i:i + 1], inputs["candidate_vectors"][i:i + 1], task)
            for i, task in enumerate(tasks)]
    logits = torch.cat(rows)
    close(out["loss"], contrastive_imitation_loss(logits, inputs["teacher_probs"]).item())
    all_asymmetric = D2LLMDistillationLoss(only_ci)(iem, tasks=["asymmetric"] * 3, **inputs)
    assert not torch.isclose(out["loss"], all_asymmetric["loss"])


def test_loss_weights_validate_and_round_trip():
    weights = LossWeights(vector=0.0, temperature_vector=0.1)
    assert LossWeights.from_dict(weights.to_dict()) == weights
    with pytest.raises(ValueError, match="temperature"):
        LossWeights(temperature_vector=0)
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(vector=-1)
    with pytest.raises(ValueError, match="unknown loss settings"):
        LossWeights.from_dict({"vectr": 1.0})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        zero = LossWeights(in_batch=0, contrastive_imitation=0, rank_imitation=0,
                           pairwise_rank=0, feature_imitation=0, vector=0)
        D2LLMDistillationLoss(zero)(InteractionEmulation(8, 16), tasks=["asymmetric"] * 3,
                                    **_batch())
