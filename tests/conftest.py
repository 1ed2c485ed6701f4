from __future__ import annotations

import pytest

from tests.tiny_models import build_looping_lm, build_tiny_causal_lm, device_for_tests

#: Fixtures that build a model (here or in a test module): a test that uses one, directly
#: or through another fixture, is marked slow; `python -m pytest -m "not slow"` loads none.
MODEL_FIXTURES = frozenset({"tiny_backbone", "tiny_gemma_backbone", "tiny_student_dir",
                            "tiny_bert", "looping_lm"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def device():
    """The device the tests put models on: the CPU unless D2LLM_TEST_DEVICE names another
    (``D2LLM_TEST_DEVICE=cuda`` on a GPU machine). Tests build their tensors on the model's
    device, so the suite passes on either; a test that pins the CPU says why."""
    return device_for_tests()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """Directory of a tiny random Llama-style causal LM with its tokenizer."""
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_gemma_backbone(tmp_path_factory) -> str:
    """The same, with the Gemma 3 architecture of the default model."""
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gemma"), arch="gemma3"))


@pytest.fixture(scope="session")
def looping_lm(tmp_path_factory) -> str:
    """A tiny Llama that writes one line forever (``tiny_models.build_looping_lm``)."""
    return str(build_looping_lm(tmp_path_factory.mktemp("looping-lm")))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_backbone) -> str:
    """A saved student (LoRA adapter + heads) around the tiny backbone, whose recorded fusion
    weighs its IEM (as a distiller does where the IEM gains on dev), so that the plugin's
    tests exercise the IEM."""
    from llama_index_d2llm import D2LLMStudent
    from llama_index_d2llm.student.fusion import FusionWeights

    student = D2LLMStudent.from_backbone(tiny_backbone, pma_heads=4, iem_hidden_size=16,
                                         dtype="float32", seed=0)
    _perturb_lora(student)
    student.config.fusion = {"dense": FusionWeights(iem=1.0),
                             "hybrid": FusionWeights(lexical=0.5, iem=1.0)}
    return str(student.save_pretrained(tmp_path_factory.mktemp("students") / "student"))


def _perturb_lora(student) -> None:
    """LoRA B, the IEM's output layer and the PMA gate start at zero; give them values that
    matter."""
    import torch

    with torch.no_grad():
        student.iem.output.weight.normal_(0, 0.5)
        student.pma.gate.fill_(4.0)  # PMA outweighs the mean pooling it is added to
        for name, param in student.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
