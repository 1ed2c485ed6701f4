"""Numbers read from files a stranger can edit, and flags (issue 22's sweep): NaN, Infinity
and words where a number belongs are refused, saying where, never trained or scored on.
Python's json and float() both read "NaN" and "Infinity", which checks written as
``value < 0`` let through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_index_d2llm.trainer import cli
from llama_index_d2llm.trainer.beir import read_qrels
from llama_index_d2llm.trainer.config import ConfigError, DistillConfig
from llama_index_d2llm.trainer.pairs import load_pairs
from llama_index_d2llm.trainer.queries import QueryError
from llama_index_d2llm.trainer.runs import EvaluationError, read_run


@pytest.mark.parametrize(("name", "value"), [
    ("lr", "Infinity"), ("weight_decay", "NaN"), ("max_grad_norm", "NaN"),
    ("pair_min_score", "NaN"), ("lora_dropout", "-Infinity"), ("seed", '"x"'),
])
def test_a_saved_distill_config_with_a_number_that_is_not_one_is_refused(tmp_path, capsys, name,
                                                                         value):
    config = DistillConfig(corpus=str(tmp_path), output=str(tmp_path / "s")).to_dict()
    config[name] = "@"
    path = tmp_path / "distill_config.json"
    path.write_text(json.dumps(config).replace('"@"', value))
    assert cli.main(["distill", "--config", str(path)]) == cli.EXIT_USAGE
    flag = "--" + name.replace("_", "-")
    err = capsys.readouterr().err
    assert err.startswith(f"d2llm-rag: error: {flag} must be") and err.count("\n") == 1


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--vector-loss-weight", "nan"],
                                   ["--temperature-ci", "nan"]])
def test_flags_that_are_not_finite_are_refused(tmp_path, capsys, flags):
    argv = ["distill", "--corpus", str(tmp_path), "--output", str(tmp_path / "s"), *flags]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "must be a finite number" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--lr must be a finite number"):
        DistillConfig(corpus="c", lr=float("inf"))


def test_pair_scores_and_eval_files_that_are_not_finite_name_their_line(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\na cat\ta dog\t0.5\nthe sun\tthe moon\tnan\n")
    with pytest.raises(QueryError, match=r"pairs\.tsv:3: score 'nan' is not a finite number"):
        load_pairs(pairs)
    qrels = tmp_path / "qrels.tsv"
    for text, line in [("q1\td1\tabc\n", 1), ("query-id\tcorpus-id\tscore\nq1\td1\tinf\n", 2)]:
        qrels.write_text(text)
        with pytest.raises(EvaluationError, match=rf"qrels\.tsv:{line}: score .* is not a num"):
            read_qrels(qrels)
    run = tmp_path / "run.json"
    run.write_text('{"q1": {"d1": 1.5, "d2": NaN}}')
    with pytest.raises(EvaluationError, match=r"run\.json: query 'q1', document 'd2': score "
                       r"nan is not a finite number"):
        read_run(run)
    trec = Path(tmp_path / "run.trec")
    trec.write_text("q1 Q0 d1 1 2.5 bm25\nq1 Q0 d2 2 abc bm25\nq1 Q0 d3\n")
    with pytest.raises(EvaluationError, match=r"run\.trec:2: score 'abc' is not a finite"):
        read_run(trec)
    trec.write_text("q1 Q0 d3\n")
    with pytest.raises(EvaluationError, match="this one has 3"):
        read_run(trec)
