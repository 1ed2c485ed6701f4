"""Distillation starts from the encoder it is given, and never records less than that start.

- step 0 is the starting encoder: the untrained student embeds exactly as its backbone's own
  pooling (mean, or CLS), and its IEM ranks as the cosine does;
- the pooling and the prompts a sentence-transformers folder declares are what it starts from;
- students saved before the base pooling existed load unchanged (PMA alone);
- generated queries that name no passage (copied examples, texts written for many passages,
  queries that do not find their passage again) are not trained on, and dev queries are of
  passages never trained on;
- the floor: when no distilled state beats the starting point on dev, the starting point is
  what is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.student.pooling import declared_pooling, declared_prompts
from llama_index_d2llm.trainer.corpus import Passage
from llama_index_d2llm.trainer.queries import Query, split_queries
from tests.tiny_models import build_tiny_encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert")))


def student_of(backbone: str, **overrides) -> D2LLMStudent:
    settings = dict(lora=None, pma_heads=4, dtype="float32", max_passage_length=48, seed=0)
    return D2LLMStudent.from_backbone(backbone, **(settings | overrides))


def pooled_backbone(student: D2LLMStudent, texts: list[str], mode: str) -> torch.Tensor:
    """The backbone's own pooling of ``texts``, computed without the student's heads."""
    from llama_index_d2llm.student.modes import eval_mode

    batch = student.tokenize(texts, "passage")
    with eval_mode(student), torch.no_grad():
        states = student.body(**batch).last_hidden_state.float()
    if mode == "cls":
        pooled = states[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


TEXTS = ["the river city and its history", "protein cell gene", "a short one"]


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_the_untrained_student_embeds_as_its_backbone_pools(tiny_bert, mode):
    student = student_of(tiny_bert, base_pooling=mode)
    assert torch.allclose(student.encode(TEXTS), pooled_backbone(student, TEXTS, mode),
                          atol=1e-6)
    # the IEM starts as a scaled cosine: its ranking is the first stage's
    vectors = student.encode(TEXTS)
    query = student.encode(["river history"], "query")[0]
    logits = student.score(query, vectors)
    assert logits.argsort().tolist() == (vectors @ query).argsort().tolist()
    # training moves away from it through the gate, which starts at 0
    with torch.no_grad():
        student.pma.gate.fill_(1.0)
    assert not torch.allclose(student.encode(TEXTS), pooled_backbone(student, TEXTS, mode),
                              atol=1e-4)


def test_a_sentence_transformers_folder_declares_its_pooling_and_prompts(tiny_bert, tmp_path):
    folder = Path(shutil.copytree(tiny_bert, tmp_path / "st-model"))
    assert declared_pooling(folder) is None and declared_prompts(folder) == ("", "")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    pooling = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}}))
    assert declared_pooling(folder) == "cls"
    student = student_of(str(folder))
    assert student.config.base_pooling == "cls"
    assert (student.config.query_instruction, student.config.passage_instruction) == (
        "query: ", "passage: ")
    # a pooling no student can start from (max) declares nothing: mean pooling then
    pooling = {"pooling_mode_max_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert declared_pooling(folder) is None
    # a plain model: mean pooling and the generic instructions
    plain = student_of(tiny_bert)
    assert plain.config.base_pooling == "mean"
    assert plain.config.query_instruction == "Query: "


def test_students_saved_before_the_base_pooling_load_as_they_were(tiny_bert, tmp_path):
    old = student_of(tiny_bert, base_pooling=None)
    directory = old.save_pretrained(tmp_path / "old")
    config = json.loads((directory / "d2llm_config.json").read_text())
    del config["base_pooling"]  # what an older version wrote
    (directory / "d2llm_config.json").write_text(json.dumps(config))
    loaded = D2LLMStudent.from_pretrained(directory, dtype="float32")
    assert loaded.config.base_pooling is None and not hasattr(loaded.pma, "gate")
    assert loaded.fingerprint == config["fingerprint"]
    assert torch.allclose(loaded.encode(TEXTS), old.encode(TEXTS), atol=1e-6)
    # and a new student's base pooling is covered by its fingerprint: editing it is refused
    new = student_of(tiny_bert, base_pooling="mean")
    directory = new.save_pretrained(tmp_path / "new")
    config = json.loads((directory / "d2llm_config.json").read_text())
    config["base_pooling"] = "cls"
    (directory / "d2llm_config.json").write_text(json.dumps(config))
    from llama_index_d2llm.student import CheckpointError

    with pytest.raises(CheckpointError, match="fingerprint"):
        D2LLMStudent.from_pretrained(directory, dtype="float32")


# ---------------------------------------------------------------------------- queries
def test_generated_queries_that_name_no_passage_are_dropped():
    from llama_index_d2llm.trainer.queries import _assemble, clean_generated_query

    # a copied few-shot example, whatever its case and punctuation
    assert clean_generated_query(" How do I reset my router to factory settings?\n") == ""
    assert clean_generated_query("Which organelle makes ATP?") == "Which organelle makes ATP?"
    passages = [Passage(f"p{i}", f"text {i}") for i in range(5)]
    done = {f"p{i}": {"queries": ["What is the purpose of the following code?"]}
            for i in range(3)}
    done["p3"] = {"queries": ["Which river runs through the city?"]}
    done["p4"] = {"queries": ["which river runs through the city"]}  # two passages: kept
    queries = _assemble(passages, done)
    assert [(q.text, q.positives) for q in queries] == [
        ("Which river runs through the city?", ["p3", "p4"])]


def test_generated_dev_queries_are_of_passages_never_trained_on():
    queries = [Query(f"gen:p{i}:0", f"question {i}", [f"p{i}"]) for i in range(20)]
    queries += [Query(f"gen:p{i}:1", f"another question {i}", [f"p{i}"]) for i in range(20)]
    train, dev = split_queries(queries, 0.25, seed=3)
    train_passages = {p for q in train for p in q.positives}
    dev_passages = {p for q in dev for p in q.positives}
    assert dev and train and not train_passages & dev_passages
    assert len(dev_passages) == 5


def test_the_round_trip_keeps_queries_that_find_their_passage(tmp_path):
    from llama_index_d2llm.trainer.round_trip import keep_round_trips, round_trips

    passages = [Passage("river", "the river flows through the old city"),
                Passage("gene", "a gene codes for a protein in the cell"),
                Passage("bread", "bake the bread in a hot oven for an hour"),
                Passage("moon", "the moon orbits the earth every month")]
    queries = [Query("gen:gene:0", "which protein does a gene code", ["gene"]),
               Query("gen:moon:0", "what bread is baked in an oven", ["moon"])]  # names bread
    trips = round_trips(queries, passages, encoder=None)
    assert trips["gen:gene:0"].bm25_rank == 1 and trips["gen:moon:0"].bm25_rank is None
    kept = keep_round_trips(queries, passages, None, depth=1, cache_dir=tmp_path)
    assert [q.id for q in kept] == ["gen:gene:0"]
    # an encoder that finds the moon passage keeps its query too
    by_word = {"moon": 3, "bread": 2, "gene": 1, "river": 0}

    def encoder(texts, kind):
        vectors = torch.full((len(texts), 4), 0.01)
        for row, text in enumerate(texts):
            key = "moon" if kind == "query" and "bread" in text else next(
                (w for w in by_word if w in text), "river")
            vectors[row, by_word[key]] = 1.0
        return vectors

    kept = keep_round_trips(queries, passages, encoder, depth=1, cache_dir=tmp_path,
                            encoder_key="toy")
    assert [q.id for q in kept] == ["gen:gene:0", "gen:moon:0"]
    assert len(list(tmp_path.glob("round-trip-*.json"))) == 2  # one cache per encoder


# ---------------------------------------------------------------------------- the floor
def test_when_distillation_only_loses_on_dev_the_starting_point_is_written(
        tmp_path, tiny_bert, monkeypatch):
    from llama_index_d2llm.trainer import dev_ranking
    from llama_index_d2llm.trainer.config import DistillConfig
    from llama_index_d2llm.trainer.distill import distill
    from tests.distill_fixtures import OverlapTeacher, write_beir

    calls = []

    def worse_after_training(self, student, encoder, chunk=64):
        calls.append(1)
        return {dev_ranking.DEV_METRIC: 0.9 if len(calls) == 1 else 0.5}

    monkeypatch.setattr(dev_ranking.DevRanking, "evaluate", worse_after_training)
    beir = write_beir(tmp_path / "beir")
    config = DistillConfig(
        output=str(tmp_path / "student"), corpus=str(beir / "corpus.jsonl"),
        queries=str(beir / "queries.jsonl"), qrels=str(beir / "qrels" / "train.tsv"),
        student=tiny_bert, pma_heads=4, iem_hidden_size=16, num_negatives=3,
        # the CPU: the floor's choice is checked on exact dev numbers, which CUDA does not keep
        num_easy_negatives=1, batch_size=4, epochs=3, dev_fraction=0.25, device="cpu",
        dtype="float32", show_progress=False, max_passage_length=32, max_query_length=16,
        lr=3e-2, seed=5)
    output = distill(config, teacher=OverlapTeacher())
    summary = json.loads((output / "training_summary.json").read_text())["training"]
    assert summary["kept_start"] and summary["start_metric"] == 0.9
    assert summary["best_step"] == 0 and summary["steps"] > 0 and len(calls) > 1
    student = D2LLMStudent.from_pretrained(output, dtype="float32")
    assert float(student.pma.gate) == 0.0
    assert torch.allclose(student.encode(TEXTS), pooled_backbone(student, TEXTS, "mean"),
                          atol=1e-6)


def test_a_dev_gain_within_noise_does_not_replace_the_starting_point():
    from llama_index_d2llm.trainer.floor import compare_to_start

    start = {f"q{i}": 0.5 for i in range(40)}
    noisy = {q: v + (0.3 if i % 2 else -0.28) for i, (q, v) in enumerate(start.items())}
    clear = {q: v + 0.05 + (0.01 if i % 2 else -0.01) for i, (q, v) in enumerate(start.items())}
    assert sum(noisy.values()) > sum(start.values())  # a higher mean ...
    assert not compare_to_start(start, noisy).clears  # ... but within noise
    check = compare_to_start(start, clear)
    assert check.clears and check.queries == 40 and abs(check.gain - 0.05) < 1e-9
    assert compare_to_start(None, clear) is None and compare_to_start(start, {}) is None


def test_training_keeps_a_state_only_when_its_paired_dev_gain_clears_noise(
        tmp_path, tiny_bert, monkeypatch):
    from llama_index_d2llm.trainer import dev_ranking
    from llama_index_d2llm.trainer.config import DistillConfig
    from llama_index_d2llm.trainer.distill import distill
    from tests.distill_fixtures import OverlapTeacher, write_beir

    calls = []

    def slightly_higher_but_noisy(self, student, encoder, chunk=64):
        calls.append(1)
        if len(calls) == 1:
            per_query = {f"q{i}": 0.5 for i in range(20)}
        else:  # mean +0.01, but half the queries lose 0.2
            per_query = {f"q{i}": 0.5 + (0.22 if i % 2 else -0.2) for i in range(20)}
        mean = sum(per_query.values()) / len(per_query)
        return {dev_ranking.DEV_METRIC: mean, dev_ranking.DEV_PER_QUERY: per_query}

    monkeypatch.setattr(dev_ranking.DevRanking, "evaluate", slightly_higher_but_noisy)
    beir = write_beir(tmp_path / "beir")
    config = DistillConfig(
        output=str(tmp_path / "student"), corpus=str(beir / "corpus.jsonl"),
        queries=str(beir / "queries.jsonl"), qrels=str(beir / "qrels" / "train.tsv"),
        student=tiny_bert, pma_heads=4, iem_hidden_size=16, num_negatives=3,
        # the CPU, as above: exact dev numbers
        num_easy_negatives=1, batch_size=4, epochs=2, dev_fraction=0.25, device="cpu",
        dtype="float32", show_progress=False, max_passage_length=32, max_query_length=16,
        lr=3e-2, seed=5)
    output = distill(config, teacher=OverlapTeacher())
    summary = json.loads((output / "training_summary.json").read_text())["training"]
    assert len(calls) > 1 and summary["kept_start"] and summary["best_step"] == 0
    assert "dev_per_query" not in json.dumps(summary)  # per-query figures stay internal


def test_titles_and_headings_are_queries_of_their_passages(tmp_path):
    from llama_index_d2llm.trainer.corpus import load_corpus
    from llama_index_d2llm.trainer.headings import heading_queries
    from llama_index_d2llm.trainer.queries import is_generated

    beir = tmp_path / "corpus.jsonl"
    beir.write_text(json.dumps({"_id": "d1", "title": "Oceanic Airlines",
                                "text": "A fictional airline used in films."}) + "\n"
                    + json.dumps({"_id": "d2", "title": "", "text": "No title here."}) + "\n")
    queries = heading_queries(load_corpus(beir))
    assert [(q.text, q.positives) for q in queries] == [("Oceanic Airlines", ["d1"])]
    assert all(is_generated(q) for q in queries)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "csv.md").write_text("# The csv module\n\nRead and write CSV files.\n\n"
                                 "## csv.reader(csvfile, dialect='excel') (function)\n\n"
                                 "Return a reader object.\n")
    passages = [Passage("csv.md#0", "intro line without heading\nmore"),
                *load_corpus(docs, max_tokens=400)]
    assert [(q.text, q.positives) for q in heading_queries(passages)] == [
        ("The csv module", ["csv.md#0"])]  # the first heading of the chunk


def test_the_embedding_serves_the_untrained_starting_encoder_by_name(tmp_path, monkeypatch):
    """``D2LLMEmbedding("minilm")`` is the starting encoder as it ships (here a tiny encoder
    under a test alias): its own vectors, and the same fingerprint in every process."""
    import sys
    import types

    from llama_index_d2llm import D2LLMEmbedding
    from llama_index_d2llm.student import backbone

    encoder = str(build_tiny_encoder(tmp_path / "encoder", max_positions=512))
    module = types.ModuleType("tiny_alias_model")
    module.get_model_path = lambda: encoder
    monkeypatch.setitem(sys.modules, "tiny_alias_model", module)
    monkeypatch.setitem(backbone.BACKBONE_ALIASES, "tinyenc", ("tiny-alias", "tiny_alias_model"))
    first = D2LLMEmbedding("tinyenc", dtype="float32")
    second = D2LLMEmbedding("tinyenc", dtype="float32")
    assert first.fingerprint == second.fingerprint
    vectors = torch.tensor(first.get_text_embedding_batch(TEXTS))
    assert torch.allclose(vectors, pooled_backbone(first.student, TEXTS, "mean"), atol=1e-5)
    assert first.student.fusion("hybrid").lexical == 0.5  # the default fusion, no IEM
