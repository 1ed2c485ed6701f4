"""The distillation pipeline end to end on a tiny random backbone and a fake teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.trainer.checkpoints import list_checkpoints
from llama_index_d2llm.trainer.config import DISTILL_CONFIG_NAME, ConfigError, DistillConfig
from llama_index_d2llm.trainer.corpus import CorpusError
from llama_index_d2llm.trainer.dataset import Collator, sample_easy_negatives
from llama_index_d2llm.trainer.distill import distill, prepare_data, resolve_config
from llama_index_d2llm.trainer.encoding import backbone_encoder
from llama_index_d2llm.trainer.losses import LossWeights
from llama_index_d2llm.trainer.objective import evaluate_objective
from llama_index_d2llm.trainer.token_states import TokenStateCache
from tests.distill_fixtures import OverlapTeacher, write_beir


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir"))


def make_config(tmp_path: Path, beir: Path, backbone: str, name: str = "student",
                **overrides) -> DistillConfig:
    # pinned to the CPU: these tests compare runs bit for bit (same seed, resume), which CUDA's
    # non-deterministic kernels do not promise; the device paths are tests/test_batching.py's
    settings = dict(
        output=str(tmp_path / name), corpus=str(beir / "corpus.jsonl"),
        queries=str(beir / "queries.jsonl"), qrels=str(beir / "qrels" / "train.tsv"),
        student=backbone, pma_heads=4, iem_hidden_size=16, num_negatives=3,
        num_easy_negatives=2, batch_size=4, epochs=2, dev_fraction=0.25, device="cpu",
        dtype="float32", show_progress=False, frozen_backbone=True, max_passage_length=32,
        max_query_length=16,
    )
    settings.update(overrides)
    return DistillConfig(**settings)


def test_distill_lowers_the_loss_and_writes_a_loadable_student(tmp_path, beir, tiny_backbone):
    # no dev split: early stopping would restore the weights of the best of 3 dev queries
    config = make_config(tmp_path, beir, tiny_backbone, lr=3e-3, epochs=8, dev_fraction=0.0)
    data = prepare_data(resolve_config(config), teacher=OverlapTeacher())
    assert len(data.examples) == 12 and not data.dev_items
    initial = D2LLMStudent.from_backbone(tiny_backbone, lora=None, pma_heads=4,
                                         iem_hidden_size=16, max_query_length=16,
                                         max_passage_length=32, dtype="float32",
                                         seed=config.seed)
    before = evaluate_objective(initial, data.examples, data.texts, config.losses,
                                encoder=backbone_encoder(initial))

    output = distill(config, teacher=OverlapTeacher())

    student = D2LLMStudent.from_pretrained(output, dtype="float32")
    after = evaluate_objective(student, data.examples, data.texts, config.losses,
                               encoder=backbone_encoder(student))
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert student.config.lora is None  # frozen backbone: heads only
    saved = DistillConfig.from_json_file(output / DISTILL_CONFIG_NAME)
    assert saved.frozen_backbone is True and saved.lr == 3e-3
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["training"]["steps"] == 8 * 3  # 12 examples in batches of 4
    assert summary["fingerprint"] == student.fingerprint
    assert student.encode(["the cat sat"], kind="query").shape == (1, 32)

    from llama_index_d2llm import D2LLMEmbedding

    embedding = D2LLMEmbedding(model_name=str(output), device="cpu")  # as the student above
    assert len(embedding.get_query_embedding("cat mat")) == 32


def test_resume_after_interrupt_reaches_the_same_weights(tmp_path, beir, tiny_backbone):
    def config(name: str, **overrides) -> DistillConfig:
        return make_config(tmp_path, beir, tiny_backbone, name=name, max_steps=6, epochs=5,
                           checkpoint_every=100, lr=1e-3, **overrides)

    straight = distill(config("straight"), teacher=OverlapTeacher())

    def interrupt_at_step_4(step: int, logs: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    interrupted = config("interrupted")
    with pytest.raises(KeyboardInterrupt):
        distill(interrupted, teacher=OverlapTeacher(), step_callback=interrupt_at_step_4)
    assert not Path(interrupted.output).exists()  # no half-written student
    checkpoints = list_checkpoints(interrupted.work_path / "checkpoints")
    assert [c.name for c in checkpoints] == ["step-00000004"]
    files = {p.suffix for p in checkpoints[0].rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ".md"}, files  # no pickle anywhere

    interrupted.resume = True
    resumed = distill(interrupted, teacher=OverlapTeacher())
    summary = json.loads((resumed / "training_summary.json").read_text())["training"]
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 4
    a = D2LLMStudent.from_pretrained(straight, dtype="float32")
    b = D2LLMStudent.from_pretrained(resumed, dtype="float32")
    for (name, x), (_, y) in zip(a.heads_module().state_dict().items(),
                                 b.heads_module().state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_student_negatives_are_mined_each_epoch_and_survive_resume(tmp_path, beir,
                                                                  tiny_backbone):
    def config(name: str, **overrides) -> DistillConfig:
        return make_config(tmp_path, beir, tiny_backbone, name=name, epochs=3, lr=1e-3,
                           dev_fraction=0.0, checkpoint_every=100, student_negatives=2,
                           student_negatives_depth=5, **overrides)

    straight = distill(config("straight"), teacher=OverlapTeacher())
    summary = json.loads((straight / "training_summary.json").read_text())["training"]
    assert summary["steps"] == 9 and summary["mining_seconds"] > 0

    def interrupt_at_step_5(step: int, logs: dict) -> None:
        if step == 5:  # inside the second epoch, after its mining
            raise KeyboardInterrupt

    interrupted = config("interrupted")
    with pytest.raises(KeyboardInterrupt):
        distill(interrupted, teacher=OverlapTeacher(), step_callback=interrupt_at_step_5)
    state = json.loads((list_checkpoints(interrupted.work_path / "checkpoints")[-1]
                        / "trainer_state.json").read_text())
    assert state["mined_epoch"] == 1
    positives = {f"q{t}": f"d{t}a" for t in range(12)}
    negatives = json.loads(next((interrupted.work_path / "negatives").rglob("*.json"))
                           .read_text())
    for query_id, mined in state["mined"].items():
        assert len(mined) == 2 and len(set(mined)) == 2
        assert positives[query_id] not in mined  # never a judged positive
        assert not set(mined) & set(negatives[query_id])  # nor a teacher-scored negative
    interrupted.resume = True
    resumed = distill(interrupted, teacher=OverlapTeacher())
    a = D2LLMStudent.from_pretrained(straight, dtype="float32")
    b = D2LLMStudent.from_pretrained(resumed, dtype="float32")
    for (name, x), (_, y) in zip(a.heads_module().state_dict().items(),
                                 b.heads_module().state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path, beir, tiny_backbone):
    config = make_config(tmp_path, beir, tiny_backbone, max_steps=2, checkpoint_every=1)
    distill(config, teacher=OverlapTeacher())
    changed = make_config(tmp_path, beir, tiny_backbone, max_steps=3, lr=5e-3, resume=True)
    with pytest.raises(ConfigError, match="lr"):
        distill(changed, teacher=OverlapTeacher())


def test_a_checkpoint_from_before_the_easy_negative_switch_resumes_only_its_own_recipe(
        tmp_path, beir, tiny_backbone):
    from llama_index_d2llm.trainer.checkpoints import read_checkpoint_state

    config = make_config(tmp_path, beir, tiny_backbone, max_steps=2, checkpoint_every=1)
    distill(config, teacher=OverlapTeacher())
    checkpoint = list_checkpoints(config.work_path / "checkpoints")[-1]
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["teacher_scores_easy_negatives"]  # as written before the switch
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"\(teacher_scores_easy_negatives: True -> False\)"):
        read_checkpoint_state(checkpoint, resolve_config(config))
    old_recipe = make_config(tmp_path, beir, tiny_backbone, teacher_scores_easy_negatives=True)
    assert read_checkpoint_state(checkpoint, resolve_config(old_recipe))["config"]


def test_same_seed_same_student_other_seed_other_student(tmp_path, beir, tiny_backbone):
    def fingerprint(name: str, seed: int) -> str:
        config = make_config(tmp_path, beir, tiny_backbone, name=name, seed=seed, max_steps=3)
        return D2LLMStudent.from_pretrained(distill(config, teacher=OverlapTeacher()),
                                            dtype="float32").fingerprint

    first = fingerprint("a", 7)
    assert fingerprint("b", 7) == first
    assert fingerprint("c", 8) != first


def test_lora_mode_trains_the_adapter_and_resumes(tmp_path, beir, tiny_backbone):
    # no dev split: the floor would keep the untrained adapter unless 3 dev queries cleared it
    config = make_config(tmp_path, beir, tiny_backbone, frozen_backbone=False, max_steps=3,
                         checkpoint_every=1, gradient_checkpointing=True, lr=1e-3,
                         dev_fraction=0.0)
    output = distill(config, teacher=OverlapTeacher())
    student = D2LLMStudent.from_pretrained(output, dtype="float32", trainable=True)
    assert student.config.lora is not None
    lora_b = [p for n, p in student.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero

    longer = make_config(tmp_path, beir, tiny_backbone, frozen_backbone=False, max_steps=4,
                         checkpoint_every=1, gradient_checkpointing=False, lr=1e-3,
                         resume=True, dev_fraction=0.0)
    summary = json.loads((distill(longer, teacher=OverlapTeacher())
                          / "training_summary.json").read_text())["training"]
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 4


def test_symmetric_pairs_train_alongside_queries(tmp_path, beir, tiny_backbone):
    pairs = tmp_path / "pairs.tsv"
    rows = ["sentence1\tsentence2\tscore",
            "the cat sat on the mat\ta cat on a mat\t5.0",
            "a dog runs in the park\tthe dog in the park runs\t4.6",
            "the sun and the moon\tthe moon and the sun\t4.8",
            "water in the river\tthe river water\t4.5",
            "the cat sat on the mat\tquantum physics\t0.2",
            "music and history\tthe history of music\t4.9",
            "gene and cancer\tcancer gene data\t4.2",
            "climate of the city\tthe city climate\t4.4"]
    pairs.write_text("\n".join(rows) + "\n")
    config = make_config(tmp_path, beir, tiny_backbone, pairs=str(pairs), max_steps=4,
                         num_negatives=2, dev_fraction=0.2)
    data = prepare_data(resolve_config(config), teacher=OverlapTeacher())
    tasks = {example.task for example in data.examples}
    assert tasks == {"asymmetric", "symmetric"}
    cat = next(e for e in data.examples if e.query == "the cat sat on the mat")
    # the low-scored pair is this sentence's labelled hard negative, used first
    assert data.texts[cat.candidate_ids[1]] == "quantum physics"
    output = distill(config, teacher=OverlapTeacher())
    assert D2LLMStudent.from_pretrained(output, dtype="float32").dimension == 32


def test_collate_masks_other_positives_of_the_same_query(tmp_path, beir, tiny_backbone):
    config = make_config(tmp_path, beir, tiny_backbone)
    data = prepare_data(resolve_config(config), teacher=OverlapTeacher())
    first = data.examples[0]
    twin = type(first)(**{**first.__dict__, "candidate_ids": [data.examples[1].candidate_ids[0],
                                                            *first.candidate_ids[1:]],
                          "relevant_ids": frozenset({first.candidate_ids[0],
                                                     data.examples[1].candidate_ids[0]})})
    batch = Collator(data.texts)([twin, data.examples[1], data.examples[2]])
    assert batch.false_negatives.tolist()[0] == [False, True, False]
    assert not batch.false_negatives.diagonal().any()
    easy = sample_easy_negatives(data.train_items, 2, seed=0)
    for item in data.train_items:
        assert not set(easy[item.id]) & set(item.positive_ids + item.hard_negative_ids)


class PairCountingTeacher(OverlapTeacher):
    """An OverlapTeacher that keeps every (query, passage) pair it was asked to score."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: set[tuple[str, str]] = set()

    def score(self, queries, passages, task="asymmetric", show_progress=False):
        self.pairs.update(zip(queries, passages, strict=True))
        return super().score(queries, passages, task, show_progress)


@pytest.mark.parametrize("scored", [False, True])
def test_easy_negatives_cost_a_teacher_call_only_when_asked(tmp_path, beir, tiny_backbone,
                                                            scored):
    config = make_config(tmp_path, beir, tiny_backbone, teacher_scores_easy_negatives=scored)
    teacher = PairCountingTeacher()
    data = prepare_data(resolve_config(config), teacher=teacher)
    easy_pairs = {(e.query, data.texts[pid]) for e in data.examples for pid in e.easy_ids}
    listed = {(e.query, data.texts[pid]) for e in data.examples for pid in e.candidate_ids}
    assert easy_pairs and listed <= teacher.pairs
    assert (easy_pairs <= teacher.pairs) is scored
    if not scored:
        assert not easy_pairs & teacher.pairs
        assert all(e.easy_probs.eq(0).all() for e in data.examples)
    else:
        assert any(e.easy_probs.gt(0).any() for e in data.examples)


def test_token_state_cache_is_reused_and_keyed_by_backbone(tmp_path, tiny_backbone):
    from tests.tiny_models import build_tiny_causal_lm

    student = D2LLMStudent.from_backbone(tiny_backbone, lora=None, pma_heads=4,
                                         iem_hidden_size=16, dtype="float32", seed=0)
    cache = TokenStateCache(student, tmp_path / "states", show_progress=False)
    texts = ["the cat sat on the mat", "water"]
    assert cache.ensure(texts, "passage") == 2
    states, mask = cache.batch(texts, "passage")
    batch = student.tokenize(texts, "passage")
    with torch.no_grad():
        direct = student.pool(student.token_states(**batch), batch["attention_mask"])
        cached = student.pool(states, mask)
    torch.testing.assert_close(cached, direct, atol=2e-3, rtol=2e-3)  # fp16 storage
    again = TokenStateCache(student, tmp_path / "states", show_progress=False)
    assert again.ensure(texts, "passage") == 0 and len(again) == 2
    assert again.ensure(texts, "query") == 2  # another instruction, another key
    other_backbone = build_tiny_causal_lm(tmp_path / "other", seed=1)
    other = D2LLMStudent.from_backbone(str(other_backbone), lora=None, pma_heads=4,
                                       iem_hidden_size=16, dtype="float32", seed=0)
    assert TokenStateCache(other, tmp_path / "states", show_progress=False).identity \
        != cache.identity


def test_bad_input_fails_before_the_teacher_is_used(tmp_path, beir, tiny_backbone):
    teacher = OverlapTeacher()
    with pytest.raises(CorpusError, match="too few to mine"):
        distill(make_config(tmp_path, beir, tiny_backbone, num_negatives=30), teacher=teacher)
    not_a_student = tmp_path / "mine"
    not_a_student.mkdir()
    (not_a_student / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a D2LLM student"):
        distill(make_config(tmp_path, beir, tiny_backbone, name="mine"), teacher=teacher)
    assert teacher.calls == 0
    with pytest.raises(ConfigError, match="--queries and --qrels"):
        make_config(tmp_path, beir, tiny_backbone, qrels=None)
    with pytest.raises(ConfigError, match="--dev-fraction"):
        make_config(tmp_path, beir, tiny_backbone, dev_fraction=1.5)
    with pytest.raises(ConfigError, match="nothing to distil"):
        DistillConfig(output="x")
    with pytest.raises(ConfigError, match="--student-negatives-depth"):
        make_config(tmp_path, beir, tiny_backbone, student_negatives=8,
                    student_negatives_depth=4)


def test_distill_config_round_trips(tmp_path):
    config = DistillConfig(corpus="docs", losses=LossWeights(vector=0.0), max_steps=5)
    path = config.to_json_file(tmp_path / DISTILL_CONFIG_NAME)
    assert DistillConfig.from_json_file(path) == config
    with pytest.raises(ConfigError, match="unknown distillation settings"):
        DistillConfig.from_dict({**config.to_dict(), "lerning_rate": 1})


def test_student_negatives_default_to_on_for_judged_queries_only():
    # device="cpu": the defaults resolved for a CPU are the ones checked (a GPU picks others)
    judged = DistillConfig(corpus="c.jsonl", queries="q.jsonl", qrels="q.tsv", device="cpu")
    assert resolve_config(judged).student_negatives == 16
    assert resolve_config(DistillConfig(corpus="docs", device="cpu")).student_negatives == 0
    chosen = DistillConfig(corpus="c.jsonl", queries="q.jsonl", qrels="q.tsv", device="cpu",
                           student_negatives=0)
    assert resolve_config(chosen).student_negatives == 0


def test_teacher_prompts_are_short_on_a_cpu_unless_chosen():
    from llama_index_d2llm.trainer.distill import default_teacher_max_length

    assert resolve_config(DistillConfig(corpus="d", device="cpu")).teacher_max_length == 128
    assert default_teacher_max_length(torch.device("cuda")) == 512
    chosen = DistillConfig(corpus="d", device="cpu", teacher_max_length=384)
    assert resolve_config(chosen).teacher_max_length == 384
    with pytest.raises(ConfigError, match="teacher-max-length"):
        DistillConfig(corpus="d", teacher_max_length=0)


def test_the_default_backbone_keeps_its_measured_best_depth():
    from llama_index_d2llm.student.backbone import DEFAULT_BACKBONE_LAYERS

    for gemma in ("gemma", None):  # None: what configs written before MiniLM became the default say
        assert resolve_config(DistillConfig(corpus="docs", device="cpu", student=gemma)) \
            .backbone_layers == DEFAULT_BACKBONE_LAYERS == 13
    assert resolve_config(DistillConfig(corpus="docs", device="cpu")).backbone_layers is None
    named = DistillConfig(corpus="docs", device="cpu", student="some/model")
    assert resolve_config(named).backbone_layers is None  # other models: every layer
    assert resolve_config(DistillConfig(corpus="d", device="cpu", student="gemma",
                                        backbone_layers=18)) \
        .backbone_layers == 18
    with pytest.raises(ConfigError, match="backbone-layers"):
        DistillConfig(corpus="docs", backbone_layers=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_slices_compose_to_the_whole_backbone(tmp_path, arch):
    from llama_index_d2llm.student.backbone import layer_slice
    from tests.tiny_models import build_tiny_causal_lm

    student = D2LLMStudent.from_backbone(str(build_tiny_causal_lm(tmp_path, arch=arch)),
                                         lora=None, pma_heads=4, dtype="float32", seed=0)
    batch = student.tokenize(["the cat sat on the mat", "water"], "passage")  # padded
    with torch.no_grad():
        whole = student.body(**batch).last_hidden_state
        lower = layer_slice(student.body, 0, 1, final_norm=False)(**batch).last_hidden_state
        upper = layer_slice(student.body, 1, 2, final_norm=True)
        split = upper(inputs_embeds=lower, attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(split.last_hidden_state[mask], whole[mask], atol=1e-5, rtol=1e-5)
    assert len(student.body.layers) == 2 and not isinstance(student.body.norm, torch.nn.Identity)


def test_top_layer_lora_trains_on_cached_lower_states(tmp_path, beir, tiny_backbone):
    config = make_config(tmp_path, beir, tiny_backbone, tune_top_layers=1, lr=3e-3, epochs=3,
                         dev_fraction=0.0)
    output = distill(config, teacher=OverlapTeacher())
    trained = D2LLMStudent.from_pretrained(output, dtype="float32", trainable=True)
    assert trained.config.lora.layers == [1]  # the tiny backbone has 2 blocks
    tuned = {n.split(".layers.")[1].split(".")[0] for n, p in trained.backbone.named_parameters()
             if "lora_B" in n and p.abs().sum() > 0}
    assert tuned == {"1"}  # LoRA trained, on the top block only
    # the cache training filled serves evaluation of the merged student: same vectors
    merged = D2LLMStudent.from_pretrained(output, dtype="float32")
    cache = TokenStateCache(merged, Path(config.work_path) / "token_states", depth=1,
                            show_progress=False)
    texts = ["the cat and the mat of the cat", "the quantum and the physics of the quantum"]
    assert cache.ensure(texts, "passage") == 0  # training cached these: a hit, not a miss
    with torch.no_grad():
        torch.testing.assert_close(cache.vectors(texts, "passage"), merged.encode(texts),
                                   atol=2e-3, rtol=2e-3)
    with pytest.raises(ConfigError, match="leaves nothing frozen"):
        distill(make_config(tmp_path, beir, tiny_backbone, tune_top_layers=2),
                teacher=OverlapTeacher())


def test_the_distiller_records_the_fusion_chosen_on_a_whole_corpus_dev_ranking(
        tmp_path, beir, tiny_backbone):
    config = make_config(tmp_path, beir, tiny_backbone, epochs=2, dev_fraction=0.25)
    output = distill(config, teacher=OverlapTeacher())
    student = D2LLMStudent.from_pretrained(output, dtype="float32")
    summary = json.loads((output / "training_summary.json").read_text())
    dev = summary["training"]["dev"]
    assert set(student.config.fusion) == {"dense", "hybrid"}
    for stage in ("dense", "hybrid"):
        fusion = student.config.fusion[stage]
        if fusion is None:
            assert not dev[f"fusion_{stage}_rescore"]
        else:
            assert (fusion.lexical, fusion.iem) == (dev[f"fusion_{stage}_lexical"],
                                                    dev[f"fusion_{stage}_iem"])
        # a fusion moves from the default only where it gains on dev: never below it (the
        # default for dense search is the first stage's cosine)
        default = dev.get(f"dev_{stage}_default_ndcg@10", dev[f"dev_{stage}_ndcg@10"])
        assert dev[f"dev_{stage}_rescored_ndcg@10"] >= default - 1e-9
    history = summary["training"]["history"]
    assert history and all("dev_ndcg@10" in entry for entry in history)


def test_without_a_teacher_the_judgements_label_the_pairs(tmp_path, beir, tiny_backbone,
                                                          monkeypatch):
    import llama_index_d2llm.trainer.preparation as preparation

    def no_teacher(*args, **kwargs):
        raise AssertionError("--teacher none must not load a teacher")

    monkeypatch.setattr(preparation, "_load_teacher", no_teacher)
    config = make_config(tmp_path, beir, tiny_backbone, teacher="none", epochs=2)
    resolved = resolve_config(config)
    assert resolved.losses.contrastive_imitation == 0 and resolved.losses.rank_imitation == 0
    assert resolved.losses.pairwise_rank == 0 and resolved.losses.feature_imitation == 0
    data = prepare_data(resolved)
    for example in data.examples:
        assert example.teacher_probs.tolist() == [1.0] + [0.0] * (len(example.candidate_ids) - 1)
    output = distill(config)
    assert D2LLMStudent.from_pretrained(output, dtype="float32").config.fusion


def test_no_teacher_needs_judged_queries(tmp_path, beir, tiny_backbone):
    with pytest.raises(ConfigError, match="--teacher none"):
        make_config(tmp_path, beir, tiny_backbone, teacher="none", queries=None, qrels=None)
