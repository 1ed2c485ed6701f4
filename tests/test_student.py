"""The student model: encoding, scoring, save/load, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_index_d2llm import CheckpointError, D2LLMStudent, DeviceError

TEXTS = ["the cat sat on the mat", "a dog runs in the park", "quantum physics of the sun",
         "water", "the history of music and the city river network model"]


@pytest.fixture(scope="module")
def student(tiny_student_dir, device):
    return D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32", device=device)


def test_encode_shape_order_and_normalisation(student):
    vectors = student.encode(TEXTS, kind="passage", batch_size=2)
    assert vectors.shape == (len(TEXTS), student.dimension)
    assert vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(TEXTS)))
    reversed_vectors = student.encode(TEXTS[::-1], kind="passage", batch_size=2)
    torch.testing.assert_close(reversed_vectors.flip(0), vectors, atol=1e-5, rtol=1e-5)


def test_batched_equals_single(student):
    batched = student.encode(TEXTS, batch_size=8)
    single = torch.cat([student.encode([t], batch_size=1) for t in TEXTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_query_and_passage_instructions_differ(student):
    assert not torch.allclose(student.encode(["water"], kind="query"),
                              student.encode(["water"], kind="passage"))


def test_padding_is_masked_in_pma(student):
    batch = student.tokenize(["water", "the history of music and the city"], "passage")
    states = student.token_states(batch["input_ids"], batch["attention_mask"])
    pooled = student.pool(states, batch["attention_mask"])[0]
    alone = student.tokenize(["water"], "passage")
    pooled_alone = student.pool(student.token_states(**alone), alone["attention_mask"])[0]
    torch.testing.assert_close(pooled, pooled_alone, atol=1e-5, rtol=1e-5)


def test_score_shapes_and_consistency(student):
    q = student.encode(["cat"], kind="query")
    p = student.encode(TEXTS)
    one = student.score(q[0], p)
    assert one.shape == (len(TEXTS),)
    many = student.score(q.repeat(3, 1), p)
    assert many.shape == (3, len(TEXTS))
    per_query = student.score(q.repeat(2, 1), p.expand(2, -1, -1))
    torch.testing.assert_close(per_query[1], one, atol=1e-6, rtol=1e-6)
    # the split W1 computation equals the plain concatenation of the paper
    q, p, one = q.to(student.device), p.to(student.device), one.to(student.device)
    concat = torch.cat([q.expand(len(TEXTS), -1), p], dim=1) * student.iem.input_scale
    hidden = torch.relu(student.iem.f1(concat))
    branch = torch.relu(student.iem.f2["asymmetric"](hidden))
    cosine = student.iem.log_cosine_scale.exp() * (p @ q[0])  # vectors are unit-normalised
    torch.testing.assert_close((student.iem.output(branch).squeeze(-1) + cosine).detach(), one,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(student.score(q[0], p, task="symmetric"), one)
    with pytest.raises(ValueError, match="task must be"):
        student.score(q[0], p, task="other")
    with pytest.raises(ValueError, match="another model"):
        student.score(q[0], torch.zeros(2, student.dimension + 1))


def test_save_load_round_trip_gives_identical_vectors(tmp_path, tiny_backbone):
    trained = D2LLMStudent.from_backbone(tiny_backbone, pma_heads=4, iem_hidden_size=16,
                                         dtype="float32", seed=1)
    with torch.no_grad():
        for name, p in trained.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = trained.encode(TEXTS)
    fingerprint = trained.fingerprint
    out = trained.save_pretrained(tmp_path / "s")
    assert {p.name for p in out.iterdir()} == {"d2llm_config.json", "heads.safetensors",
                                               "adapter"}
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    loaded = D2LLMStudent.from_pretrained(out, dtype="float32")
    assert loaded.fingerprint == fingerprint == json.loads(
        (out / "d2llm_config.json").read_text())["fingerprint"]
    torch.testing.assert_close(loaded.encode(TEXTS), before, atol=1e-5, rtol=1e-5)
    # the adapter matters: the base backbone alone gives other vectors
    base = D2LLMStudent.from_backbone(tiny_backbone, lora=None, pma_heads=4, iem_hidden_size=16,
                                      dtype="float32")
    base.heads_module().load_state_dict(trained.heads_module().state_dict())
    assert not torch.allclose(base.encode(TEXTS), before, atol=1e-4)
    # a trainable load keeps the adapter and can be saved again
    again = D2LLMStudent.from_pretrained(out, dtype="float32", trainable=True)
    assert again.fingerprint == fingerprint
    again.save_pretrained(tmp_path / "s2")


def test_merged_export_is_self_contained(tmp_path, tiny_student_dir):
    student = D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32", trainable=True)
    before = student.encode(TEXTS)
    out = student.save_pretrained(tmp_path / "merged", merged=True)
    assert (out / "backbone" / "model.safetensors").exists()
    config = json.loads((out / "d2llm_config.json").read_text())
    assert config["backbone"] == "backbone" and config["lora"] is None
    loaded = D2LLMStudent.from_pretrained(out, dtype="float32")
    torch.testing.assert_close(loaded.encode(TEXTS), before, atol=1e-5, rtol=1e-5)


def test_gemma_architecture_backbone(tiny_gemma_backbone):
    student = D2LLMStudent.from_backbone(tiny_gemma_backbone, pma_heads=4, iem_hidden_size=8,
                                         dtype="float32")
    assert student.encode(TEXTS).shape == (len(TEXTS), 32)


def test_long_text_is_truncated_with_the_limit_stated(student, caplog):
    long_text = "the cat sat on the mat " * 200
    with caplog.at_level("WARNING"):
        student._warned_truncation.clear()
        vector = student.encode([long_text])
    assert vector.shape == (1, student.dimension)
    assert "max_passage_length=256" in caplog.text
    assert student.tokenize([long_text])["input_ids"].shape[1] == 256


def test_empty_text_is_refused(student):
    with pytest.raises(ValueError, match="text 1 is empty"):
        student.encode(["water", "   "])
    assert student.encode([]).shape == (0, student.dimension)


def test_missing_and_corrupt_directories(tmp_path, tiny_student_dir):
    with pytest.raises(CheckpointError, match="no student directory"):
        D2LLMStudent.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no d2llm_config.json"):
        D2LLMStudent.from_pretrained(tmp_path / "empty")

    import shutil

    corrupt = Path(shutil.copytree(tiny_student_dir, tmp_path / "corrupt"))
    (corrupt / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        D2LLMStudent.from_pretrained(corrupt)

    edited = Path(shutil.copytree(tiny_student_dir, tmp_path / "edited"))
    from safetensors.torch import load_file, save_file

    heads = load_file(edited / "heads.safetensors")
    name = next(iter(heads))
    heads[name] = heads[name] + 1.0
    save_file(heads, edited / "heads.safetensors")
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        D2LLMStudent.from_pretrained(edited)

    other_version = Path(shutil.copytree(tiny_student_dir, tmp_path / "v99"))
    config = json.loads((other_version / "d2llm_config.json").read_text())
    config["format_version"] = 99
    (other_version / "d2llm_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        D2LLMStudent.from_pretrained(other_version)


def test_interrupted_save_leaves_no_loadable_directory(tmp_path, student, monkeypatch):
    from llama_index_d2llm.student import checkpoint as model_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module, "compute_fingerprint", fail)
    with pytest.raises(KeyboardInterrupt):
        student.save_pretrained(tmp_path / "half", merged=True)
    assert not (tmp_path / "half").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_asked_for_where_none_is(tiny_student_dir):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        D2LLMStudent.from_pretrained(tiny_student_dir, device="cuda")


def test_pma_heads_must_divide_hidden(tiny_backbone):
    with pytest.raises(ValueError, match="does not divide"):
        D2LLMStudent.from_backbone(tiny_backbone, pma_heads=5, lora=None, dtype="float32")


def test_backbone_layers_keep_the_first_layers_and_round_trip(tmp_path, tiny_gemma_backbone):
    from transformers import AutoModel

    one = D2LLMStudent.from_backbone(tiny_gemma_backbone, backbone_layers=1, pma_heads=4,
                                     iem_hidden_size=8, dtype="float32", seed=3)
    assert len(one.backbone.base_model.model.layers) == 1
    # the pooled states are the first layer's output (through the final norm)
    full = AutoModel.from_pretrained(tiny_gemma_backbone, dtype=torch.float32).to(one.device)
    batch = one.tokenize(TEXTS[:2])
    with torch.no_grad():
        hidden = full(**batch, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(one.backbone.base_model.model(**batch).last_hidden_state,
                                   full.norm(hidden), atol=1e-5, rtol=1e-5)
    before = one.encode(TEXTS)
    for merged in (False, True):
        out = one.save_pretrained(tmp_path / f"one-{merged}", merged=merged)
        loaded = D2LLMStudent.from_pretrained(out, dtype="float32")
        assert loaded.config.backbone_layers == 1
        torch.testing.assert_close(loaded.encode(TEXTS), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has 2 transformer layers"):
        D2LLMStudent.from_backbone(tiny_gemma_backbone, backbone_layers=3, pma_heads=4,
                                   dtype="float32")


def test_untrained_iem_ranks_like_cosine_and_old_heads_still_load(tmp_path, tiny_backbone):
    student = D2LLMStudent.from_backbone(tiny_backbone, pma_heads=4, iem_hidden_size=16,
                                         dtype="float32", seed=0)
    q, p = student.encode(["the cat"], "query")[0], student.encode(TEXTS)
    torch.testing.assert_close(student.score(q, p), 20.0 * (p @ q), atol=1e-4, rtol=1e-4)
    # a student saved before the cosine skip existed has no such field: bare MLP head
    bare = D2LLMStudent.from_backbone(tiny_backbone, pma_heads=4, iem_hidden_size=16,
                                      iem_cosine_skip=False, dtype="float32", seed=0)
    out = bare.save_pretrained(tmp_path / "bare")
    config = json.loads((out / "d2llm_config.json").read_text())
    del config["iem_cosine_skip"]
    (out / "d2llm_config.json").write_text(json.dumps(config))
    loaded = D2LLMStudent.from_pretrained(out, dtype="float32")
    assert not loaded.iem.cosine_skip
    torch.testing.assert_close(loaded.score(q, p), bare.score(q, p))


def test_the_cpu_dtype_probe_is_decided_once_per_machine(tmp_path, monkeypatch):
    """A probe under load can flip; the dtype is part of cache keys, so it must not."""
    from llama_index_d2llm.student import backbone

    answers = iter([True, False, False, True])
    monkeypatch.setenv("D2LLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backbone, "_probe_fast_bf16", lambda: next(answers))
    seen = []
    for _ in range(3):
        backbone.cpu_has_fast_bf16.cache_clear()
        seen.append(backbone.cpu_has_fast_bf16())
    backbone.cpu_has_fast_bf16.cache_clear()
    assert seen == [True, True, True]
    assert (tmp_path / "cpu-dtype.json").exists()


def test_eval_mode_restores_training_and_leaves_an_evaluating_model_alone():
    from torch import nn

    from llama_index_d2llm.student.modes import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("an error inside the block")
    assert all(m.training for m in model.modules())
    model.eval()
    model[1].train()  # one submodule still training: the block must not see it
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
