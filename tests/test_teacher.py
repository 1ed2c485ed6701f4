"""Stage 4: the teacher's scores against naive full-vocabulary computations, truncation, cache."""

from __future__ import annotations

import pytest
import torch

from llama_index_d2llm.trainer.teacher import Teacher, TeacherError
from tests.tiny_models import device_for_tests

TEST_DEVICE = device_for_tests()

QUERIES = ["the cat sat", "which gene in cancer cells", "a dog", "water energy of the sun"]
PASSAGES = ["on the mat . yes", "protein cell gene cancer data learning model network",
            "runs in the park", "the moon and the sun . climate city river history music"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_dir(request, tiny_backbone, tiny_gemma_backbone):
    return tiny_backbone if request.param == "llama" else tiny_gemma_backbone


def load(path: str, **kwargs) -> Teacher:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("device", TEST_DEVICE)
    return Teacher.from_pretrained(path, **kwargs)


def naive_last_logits(teacher: Teacher, ids: list[int]) -> torch.Tensor:
    """The full LM's logits at the last position of one unpadded sequence."""
    with torch.no_grad():
        ids_ = torch.tensor([ids], device=teacher.device)
        return teacher.model(input_ids=ids_).logits[0, -1].float().cpu()


def naive_query_likelihood(teacher: Teacher, ids: list[int], start: int, end: int) -> float:
    with torch.no_grad():
        ids_ = torch.tensor([ids], device=teacher.device)
        logits = teacher.model(input_ids=ids_).logits[0].float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    return torch.stack([logprobs[p - 1, ids[p]] for p in range(start, end)]).mean().item()


@pytest.mark.parametrize("order", ["query-passage-prompt", "prompt-query-passage"])
def test_yesno_two_rows_equal_the_full_lm_head(model_dir, order):
    teacher = load(model_dir, mode="yesno", prompt_order=order, batch_size=3)
    scores = teacher.score(QUERIES, PASSAGES)  # padded batches of different lengths
    for i, (query, passage) in enumerate(zip(QUERIES, PASSAGES, strict=True)):
        encoded = teacher._encode(teacher.templates["asymmetric"], query, passage)
        logits = naive_last_logits(teacher, encoded.ids)
        expected = logits[teacher.yes_id] - logits[teacher.no_id]
        assert scores.logits[i].item() == pytest.approx(expected.item(), abs=1e-4)
        assert scores.probs[i].item() == pytest.approx(
            torch.softmax(logits[[teacher.yes_id, teacher.no_id]], 0)[0].item(), abs=1e-5)
    assert scores.features.shape == (4, teacher.hidden_size)
    assert scores.features.dtype == torch.float32
    single = teacher.score(QUERIES[1:2], PASSAGES[1:2])
    torch.testing.assert_close(single.features[0], scores.features[1], atol=1e-4, rtol=1e-4)


def test_final_logit_softcapping_is_applied_like_the_model(tiny_gemma_backbone, tmp_path):
    """Gemma 2/3 squash logits with tanh(x / cap) * cap; the two-row shortcut must too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_gemma_backbone)
    config.final_logit_softcapping = 0.05  # the tiny model's logits are small: a small cap
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_backbone, config=config)
    for mode in ("yesno", "query-likelihood"):
        plain = load(tiny_gemma_backbone, mode=mode)
        capped = Teacher(model, plain.tokenizer, name="capped", mode=mode)
        assert capped.fingerprint != plain.fingerprint
        scores = capped.score(QUERIES, PASSAGES).logits
        assert not torch.allclose(scores, plain.score(QUERIES, PASSAGES).logits, atol=1e-3)
        for i, (query, passage) in enumerate(zip(QUERIES, PASSAGES, strict=True)):
            encoded = capped._encode(capped.templates["asymmetric"], query, passage)
            if mode == "yesno":
                logits = naive_last_logits(capped, encoded.ids)
                expected = (logits[capped.yes_id] - logits[capped.no_id]).item()
            else:
                expected = naive_query_likelihood(capped, encoded.ids, encoded.query_start,
                                                  encoded.query_end)
            assert scores[i].item() == pytest.approx(expected, abs=1e-4)


def test_query_likelihood_padded_batch_equals_single_and_naive(model_dir):
    teacher = load(model_dir, mode="query-likelihood", batch_size=4)
    assert teacher.mode == "query-likelihood"
    batch = teacher.score(QUERIES, PASSAGES, task="asymmetric")
    for i, (query, passage) in enumerate(zip(QUERIES, PASSAGES, strict=True)):
        single = teacher.score([query], [passage])
        assert single.logits[0].item() == pytest.approx(batch.logits[i].item(), abs=1e-4)
        torch.testing.assert_close(single.features[0], batch.features[i], atol=1e-4, rtol=1e-4)
        encoded = teacher._encode(teacher.templates["asymmetric"], query, passage)
        naive = naive_query_likelihood(teacher, encoded.ids, encoded.query_start,
                                       encoded.query_end)
        assert batch.logits[i].item() == pytest.approx(naive, abs=1e-4)
    expected_probs = torch.sigmoid((batch.logits - teacher.ql_center) / teacher.ql_scale)
    torch.testing.assert_close(batch.probs, expected_probs)
    symmetric = teacher.score(QUERIES, PASSAGES, task="symmetric")
    assert not torch.allclose(symmetric.logits, batch.logits)  # another prompt


def test_vocabulary_chunks_do_not_change_query_likelihood(tiny_backbone, monkeypatch):
    from llama_index_d2llm.trainer import teacher_head as teacher_module

    teacher = load(tiny_backbone, mode="query-likelihood")
    whole = teacher.score(QUERIES, PASSAGES).logits
    monkeypatch.setattr(teacher_module, "_VOCAB_CHUNK_ELEMENTS", 1000)  # 2 positions a chunk
    torch.testing.assert_close(teacher.score(QUERIES, PASSAGES).logits, whole)
    # vocabulary slices, the last one short, combined by logaddexp: the same normaliser
    vocab = teacher._head_weight.shape[0]
    monkeypatch.setattr(teacher_module, "_CPU_VOCAB_SLICE", 7)
    assert vocab % 7 and vocab > 7 * 10
    torch.testing.assert_close(teacher.score(QUERIES, PASSAGES).logits, whole)
    states = torch.randn(5, teacher.hidden_size, dtype=teacher.dtype, device=teacher.device)
    torch.testing.assert_close(teacher._log_normaliser(states),
                               torch.logsumexp(teacher._head_logits(states), dim=-1))


def test_truncation_cuts_the_passage_and_keeps_prompt_and_query(tiny_backbone, caplog):
    teacher = load(tiny_backbone, mode="query-likelihood", max_length=48)
    template = teacher.templates["asymmetric"]
    passage = "the cat sat on the mat . " * 40
    query = "which gene in cancer cells"
    full = load(tiny_backbone, mode="query-likelihood", max_length=4096)
    untruncated = full._encode(template, query, passage)
    encoded = teacher._encode(template, query, passage)
    assert encoded.truncated and len(encoded.ids) == 48
    query_ids = untruncated.ids[untruncated.query_start:untruncated.query_end]
    assert encoded.ids[encoded.query_start:encoded.query_end] == query_ids
    assert encoded.query_end == len(encoded.ids)  # the query is whole, at the end
    text = teacher.tokenizer.decode(encoded.ids)
    assert text.startswith("Passage: the cat sat")
    assert "A question or claim this passage addresses: which gene in cancer cells" in text
    with caplog.at_level("WARNING"):
        scores = teacher.score([query], [passage])
    assert "their passages were shortened" in caplog.text
    naive = naive_query_likelihood(teacher, encoded.ids, encoded.query_start, encoded.query_end)
    assert scores.logits[0].item() == pytest.approx(naive, abs=1e-4)
    # yes/no prompts keep the instruction after the passage too
    yesno = load(tiny_backbone, mode="yesno", max_length=200)
    ids = yesno._encode(yesno.templates["asymmetric"], query, passage).ids
    assert len(ids) == 200
    assert yesno.tokenizer.decode(ids).endswith("Please answer yes or no.\nAnswer:")
    with pytest.raises(TeacherError, match="raise max_length"):
        load(tiny_backbone, mode="yesno", max_length=30)._encode(
            yesno.templates["asymmetric"], query, passage)


def test_cache_answers_second_call_without_running_the_model(tiny_backbone, tmp_path):
    first_teacher = load(tiny_backbone, cache_dir=tmp_path, batch_size=1)
    calls = {"n": 0}
    first_teacher.body.register_forward_hook(lambda *args: calls.__setitem__("n", calls["n"] + 1))
    first = first_teacher.score(QUERIES, PASSAGES, cache_every=2)
    assert calls["n"] == 4
    assert len(list((tmp_path / "teacher-scores" / first_teacher.fingerprint).glob("*"))) == 2
    # a new teacher object (a new process, in effect) reads the cache
    second_teacher = load(tiny_backbone, cache_dir=tmp_path, batch_size=1)
    assert second_teacher.fingerprint == first_teacher.fingerprint
    calls["n"] = 0
    second_teacher.body.register_forward_hook(lambda *args: calls.__setitem__("n", calls["n"] + 1))
    again = second_teacher.score(list(reversed(QUERIES)) + QUERIES[:1],
                                 list(reversed(PASSAGES)) + PASSAGES[:1])
    assert calls["n"] == 0
    torch.testing.assert_close(again.logits, torch.cat([first.logits.flip(0), first.logits[:1]]))
    torch.testing.assert_close(again.features[0], first.features[-1])
    # only the new pair runs; duplicates in one call run once
    mixed = second_teacher.score([QUERIES[0], "new query", "new query"],
                                 [PASSAGES[0], "new passage", "new passage"])
    assert calls["n"] == 1
    assert mixed.logits[1] == mixed.logits[2]


def test_interrupted_scoring_resumes_from_written_chunks(tiny_backbone, tmp_path, monkeypatch):
    teacher = load(tiny_backbone, cache_dir=tmp_path, batch_size=1)
    real_forward = teacher._forward
    calls = {"n": 0}

    def failing_forward(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_forward(batch)

    monkeypatch.setattr(teacher, "_forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        teacher.score(QUERIES, PASSAGES, cache_every=2)
    assert len(teacher._cache) == 2  # the first chunk of two pairs was written
    calls["n"] = 10
    teacher.score(QUERIES, PASSAGES, cache_every=2)
    assert calls["n"] == 12  # only the two missing pairs ran


def test_cache_is_also_written_by_time(tiny_backbone, tmp_path):
    teacher = load(tiny_backbone, cache_dir=tmp_path, batch_size=1)
    teacher.score(QUERIES, PASSAGES, cache_every=1000, cache_seconds=0)
    assert len(list((tmp_path / "teacher-scores" / teacher.fingerprint).glob("*"))) == 4
    assert len(teacher._cache) == 4


def test_fingerprint_names_model_mode_and_prompt(tiny_backbone, tiny_gemma_backbone):
    base = load(tiny_backbone)
    assert load(tiny_backbone).fingerprint == base.fingerprint
    assert load(tiny_backbone, mode="yesno").fingerprint != base.fingerprint
    assert (load(tiny_backbone, mode="yesno", prompt_order="prompt-query-passage").fingerprint
            != load(tiny_backbone, mode="yesno").fingerprint)
    assert load(tiny_gemma_backbone).fingerprint != base.fingerprint
    assert len(base.fingerprint) == 16


def test_auto_mode_follows_the_chat_template(tiny_backbone):
    assert load(tiny_backbone).mode == "query-likelihood"  # a base model: no chat template
    teacher = Teacher.from_pretrained(tiny_backbone, dtype="float32")
    teacher.tokenizer.chat_template = (
        "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}")
    chat = Teacher(teacher.model, teacher.tokenizer, name="tiny-chat")
    assert chat.mode == "yesno" and chat.use_chat_template
    prompt = chat.prompt("q", "p")
    assert prompt.startswith("<user>#Q: q\n#P: p\n") and prompt.endswith("</user><bot>")
    scores = chat.score(QUERIES[:2], PASSAGES[:2])
    assert torch.all((scores.probs > 0) & (scores.probs < 1))


def test_yes_no_tokens_must_be_single_tokens(tiny_backbone):
    with pytest.raises(TeacherError, match="no single token.*mode='query-likelihood'"):
        load(tiny_backbone, mode="yesno", yes_token="quantum physics", no_token="no")
    with pytest.raises(TeacherError, match="both yes_token and no_token"):
        load(tiny_backbone, mode="yesno", yes_token="yes")


def test_bad_input(tiny_backbone):
    teacher = load(tiny_backbone)
    with pytest.raises(ValueError, match="2 queries and 1 passages"):
        teacher.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"passage texts at positions \[1\] are empty"):
        teacher.score(["a", "b"], ["c", " "])
    with pytest.raises(ValueError, match="task must be"):
        teacher.score(["a"], ["b"], task="lexical")
    with pytest.raises(TeacherError, match="mode must be"):
        load(tiny_backbone, mode="cross")
    with pytest.raises(TeacherError, match="could not load the teacher"):
        Teacher.from_pretrained("/nonexistent/teacher-model")


def test_generate_returns_one_line_continuations(tiny_backbone):
    teacher = load(tiny_backbone)
    outputs = teacher.generate(["the cat sat on", "a dog runs in the park and the"],
                               max_new_tokens=8)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    assert all("\n" not in o.strip()[:-1] for o in outputs)
    alone = teacher.generate(["the cat sat on"], max_new_tokens=8)
    assert alone[0] == outputs[0]  # left padding does not change a greedy continuation
    sampled = [teacher.generate(["the cat"], max_new_tokens=8, do_sample=True, seed=3)
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
