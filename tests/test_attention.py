"""Backbones load with SDPA attention pinned (issue 25: fill the GPU), falling back to the
model's own attention only where its code has no SDPA path."""

from __future__ import annotations

import pytest
import torch

from llama_index_d2llm.student import backbone


def test_student_and_teacher_backbones_load_with_sdpa(tiny_backbone, device):
    from llama_index_d2llm.trainer.teacher import Teacher

    body = backbone.load_body(tiny_backbone, torch.float32)
    assert body.config._attn_implementation == "sdpa"
    teacher = Teacher.from_pretrained(tiny_backbone, dtype="float32", device=device)
    assert teacher.model.config._attn_implementation == "sdpa"


def test_the_pin_is_asked_for_and_dropped_only_for_models_without_sdpa():
    calls = []

    class NoSdpa:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append(kwargs)
            if "attn_implementation" in kwargs:
                raise ValueError("NoSdpa does not support an attention implementation through "
                                 "torch.nn.functional.scaled_dot_product_attention (sdpa) yet")
            return "loaded"

    assert backbone.load_pretrained(NoSdpa, "x", dtype=torch.float32) == "loaded"
    assert calls == [{"attn_implementation": "sdpa", "dtype": torch.float32},
                     {"dtype": torch.float32}]

    class Broken:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            raise ValueError("some other problem")

    with pytest.raises(ValueError, match="other problem"):
        backbone.load_pretrained(Broken, "x")
