"""A student folder edited by a stranger (issue 22): every number and field of its
``d2llm_config.json`` that the fingerprint does not cover is checked, and what fails is refused
with an error naming the file, never loaded silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.student import CheckpointError
from llama_index_d2llm.student.fusion import FusionWeights


def _edit(source: str, target: Path, **fields: str) -> Path:
    """A copy of the student whose config has ``fields`` replaced by raw JSON text (so that
    NaN and Infinity, which Python's json reads, can be written)."""
    student = Path(shutil.copytree(source, target))
    path = student / "d2llm_config.json"
    data = json.loads(path.read_text())
    for name in fields:
        data[name] = f"@{name}@"
    text = json.dumps(data)
    for name, raw in fields.items():
        text = text.replace(f'"@{name}@"', raw)
    path.write_text(text)
    return student


@pytest.mark.parametrize("fusion", [
    '{"dense": {"lexical": 0.0, "iem": NaN}, "hybrid": {"lexical": 0.5, "iem": 1.0}}',
    '{"hybrid": {"lexical": Infinity, "iem": 0.0}}',
    '{"hybrid": {"lexical": 0.5, "iem": -Infinity}}',
])
def test_a_fusion_weight_that_is_not_finite_is_refused(tmp_path, tiny_student_dir, fusion):
    """22.3: NaN or inf loaded silently and wrecked the ranking (nDCG@10 0.286, 0.143)."""
    student = _edit(tiny_student_dir, tmp_path / "student", fusion=fusion)
    with pytest.raises(CheckpointError) as error:
        D2LLMStudent.from_pretrained(student, dtype="float32")
    message = str(error.value)
    assert str(student / "d2llm_config.json") in message and "finite number >= 0" in message
    with pytest.raises(ValueError, match="finite"):
        FusionWeights(iem=float("nan"))


@pytest.mark.parametrize("fields", [
    {"fusion": '{"hybrid": {"lexical": -1, "iem": 0}}'},  # 22.10: errors named no file
    {"fusion": "5"},
    {"lora": '"all"'},
    {"extra": "3"},
    {"max_query_length": '"64"'},
])
def test_a_setting_of_the_wrong_kind_names_the_file(tmp_path, tiny_student_dir, fields):
    """Not a TypeError or AttributeError from deep inside: one error naming the file."""
    student = _edit(tiny_student_dir, tmp_path / "student", **fields)
    with pytest.raises(CheckpointError, match="invalid setting") as error:
        D2LLMStudent.from_pretrained(student, dtype="float32")
    assert str(student / "d2llm_config.json") in str(error.value)


@pytest.mark.parametrize("fingerprint", [None, "null"])
def test_a_config_without_its_fingerprint_is_refused(tmp_path, tiny_student_dir, fingerprint):
    """22.4: removing or nulling "fingerprint" let edited settings load (max_query_length
    64 -> 4 here)."""
    student = _edit(tiny_student_dir, tmp_path / "student", max_query_length="4",
                    **({} if fingerprint is None else {"fingerprint": fingerprint}))
    path = student / "d2llm_config.json"
    if fingerprint is None:
        data = json.loads(path.read_text())
        del data["fingerprint"]
        path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="records no fingerprint"):
        D2LLMStudent.from_pretrained(student, dtype="float32")
