"""The ``d2llm-rag`` command line: help, distill (BEIR and documents only), eval, errors."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.trainer import cli
from llama_index_d2llm.trainer.config import DISTILL_CONFIG_NAME, DistillConfig
from tests.distill_fixtures import TOPICS, OverlapTeacher, write_beir

# the CPU, pinned: the CLI's tests compare metrics across runs, which CUDA does not keep exact
TINY = ["--pma-heads", "4", "--iem-hidden-size", "16", "--num-negatives", "3",
        "--num-easy-negatives", "2", "--batch-size", "4", "--device", "cpu", "--dtype",
        "float32", "--max-passage-length", "32", "--max-query-length", "16", "--no-progress"]


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir"))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "distill" in capsys.readouterr().out
    commands = _subparsers(cli.build_parser())
    assert set(commands) == {"distill", "eval", "copy-collection"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and len(action.help) > 10, (name, action.option_strings)
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    text = capsys.readouterr().out
    for flag in ("--frozen-backbone", "--vector-loss-weight", "--resume", "--teacher-mode",
                 "--work-dir", "--checkpoint-every", "--max-steps"):
        assert flag in text


def test_distill_beir_with_a_real_teacher_then_eval(tmp_path, beir, tiny_backbone, capsys):
    output = tmp_path / "student"
    code = cli.main(["distill", "--corpus", str(beir / "corpus.jsonl"),
                     "--queries", str(beir / "queries.jsonl"),
                     "--qrels", str(beir / "qrels" / "train.tsv"),
                     "--teacher", tiny_backbone, "--student", tiny_backbone,
                     "--output", str(output), "--max-steps", "3", "--seed", "3", *TINY])
    assert code == 0, capsys.readouterr().err
    student = D2LLMStudent.from_pretrained(output, dtype="float32")
    assert student.dimension == 32
    saved = DistillConfig.from_json_file(output / DISTILL_CONFIG_NAME)
    assert saved.teacher == tiny_backbone and saved.seed == 3 and saved.max_steps == 3
    assert saved.frozen_backbone is True  # resolved: this machine runs on CPU
    timings = json.loads((output / "training_summary.json").read_text())["timings"]
    assert {"load_s", "mining_s", "teacher_s", "token_states_s", "training_s"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values())
    assert "time by stage (min): " in capsys.readouterr().out

    metrics_file = tmp_path / "metrics.json"
    code = cli.main(["eval", str(output), "--data", str(beir), "--split", "train", "--bm25",
                     "--output", str(metrics_file), "--top-k", "10", "--rerank-k", "5",
                     "--device", "cpu", "--dtype", "float32", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(metrics_file.read_text())
    assert printed["data"]["queries"] == 12 and printed["data"]["corpus"] == 24
    for section in ("first_stage", "reranked"):
        assert set(printed["student"][section]) == {"ndcg@10", "recall@100", "mrr@10"}
        assert 0 <= printed["student"][section]["ndcg@10"] <= 1
    assert printed["bm25"]["ndcg@10"] > 0.8  # the fixture's queries share words with positives


def test_distill_documents_only_generates_queries(tmp_path, tiny_backbone, monkeypatch):
    from llama_index_d2llm.trainer import teacher as teacher_module

    monkeypatch.setattr(teacher_module.Teacher, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: OverlapTeacher()))
    docs = tmp_path / "docs"
    docs.mkdir()
    for number, (a, b) in enumerate(TOPICS):
        (docs / f"doc{number}.txt").write_text(f"The {a} and the {b}. A {a} near a {b}.\n")
    output = tmp_path / "student"
    assert cli.main(["distill", "--corpus", str(docs), "--output", str(output),
                     "--student", tiny_backbone, "--max-steps", "2", *TINY]) == 0
    generated = list((tmp_path / "student.work" / "queries").rglob("*.jsonl"))
    assert generated and "cat mat" in generated[0].read_text()
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["data"]["train_queries"] + summary["data"]["dev_queries"] == len(TOPICS)
    assert D2LLMStudent.from_pretrained(output, dtype="float32").dimension == 32


def test_resume_through_the_cli(tmp_path, beir, tiny_backbone, monkeypatch):
    from llama_index_d2llm.trainer import teacher as teacher_module

    monkeypatch.setattr(teacher_module.Teacher, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: OverlapTeacher()))
    common = ["distill", "--corpus", str(beir / "corpus.jsonl"),
              "--queries", str(beir / "queries.jsonl"), "--qrels", str(beir / "qrels/train.tsv"),
              "--student", tiny_backbone, "--output", str(tmp_path / "s"),
              "--checkpoint-every", "1", *TINY]
    assert cli.main([*common, "--max-steps", "2"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([*common, "--max-steps", "4", "--resume"]) == 0
    summary = json.loads((tmp_path / "s" / "training_summary.json").read_text())["training"]
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    # issue 22.10: replaying the scheduler printed PyTorch's step-order warning
    assert not [w for w in caught if "lr_scheduler.step" in str(w.message)]


def test_ctrl_c_prints_how_to_resume(tmp_path, beir, tiny_backbone, monkeypatch, capsys):
    from llama_index_d2llm.trainer import distill as distill_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "prepare_data", interrupted)
    code = cli.main(["distill", "--corpus", str(beir), "--output", str(tmp_path / "s"),
                     "--student", tiny_backbone, *TINY])
    assert code == cli.EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing corpus", "unknown qrels doc", "queries without qrels",
                                  "empty folder", "too many negatives", "eval missing split"])
def test_bad_input_is_a_one_line_error_with_exit_status_2(case, tmp_path, beir, tiny_backbone,
                                                          capsys):
    corpus = str(beir / "corpus.jsonl")
    queries = ["--queries", str(beir / "queries.jsonl")]
    if case == "missing corpus":
        argv = ["distill", "--corpus", str(tmp_path / "nowhere"), "--output", str(tmp_path / "s")]
    elif case == "unknown qrels doc":
        qrels = tmp_path / "qrels.tsv"
        qrels.write_text("query-id\tcorpus-id\tscore\nq0\tdoc-that-is-not-there\t1\n")
        argv = ["distill", "--corpus", corpus, *queries, "--qrels", str(qrels),
                "--output", str(tmp_path / "s")]
    elif case == "queries without qrels":
        argv = ["distill", "--corpus", corpus, *queries, "--output", str(tmp_path / "s")]
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        argv = ["distill", "--corpus", str(tmp_path / "empty"), "--output", str(tmp_path / "s")]
    elif case == "too many negatives":
        argv = ["distill", "--corpus", corpus, "--output", str(tmp_path / "s"),
                "--num-negatives", "50"]
    else:
        argv = ["eval", "--bm25", "--data", str(beir), "--split", "test"]
    if argv[0] == "distill":
        argv += ["--student", tiny_backbone, "--teacher", tiny_backbone, "--no-progress"]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("d2llm-rag: error: ")]
    assert len(errors) == 1 and err.endswith(errors[0]), err  # log lines may come before
    assert "Traceback" not in err
