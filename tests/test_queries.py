"""Stage 2: BEIR queries and qrels, sentence pairs, splits, and generated queries."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llama_index_d2llm.trainer.corpus import Passage
from llama_index_d2llm.trainer.pairs import SymmetricPair, load_pairs
from llama_index_d2llm.trainer.queries import (
    Query,
    QueryError,
    clean_generated_query,
    generate_queries,
    load_queries,
    split_queries,
)

QUERIES_JSONL = "".join(json.dumps(row) + "\n" for row in [
    {"_id": "1", "text": "Cells divide."},
    {"_id": "2", "text": "Genes mutate."},
    {"_id": "3", "text": "No judgement for me."},
])
QRELS = "query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t1\n2\td3\t1\n2\td1\t0\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- BEIR
def test_queries_join_qrels_and_queries_without_positives_are_dropped(tmp_path, caplog):
    queries = write(tmp_path / "queries.jsonl", QUERIES_JSONL)
    qrels = write(tmp_path / "qrels" / "train.tsv", QRELS)
    with caplog.at_level(logging.WARNING):
        loaded = load_queries(queries, qrels, {"d1", "d2", "d3"})
    assert loaded == [Query("1", "Cells divide.", ["d1", "d2"]),
                      Query("2", "Genes mutate.", ["d3"])]
    assert "dropping 1 of 3 queries" in caplog.text and "3" in caplog.text
    # the folder form and TREC 4-column qrels give the same
    trec = write(tmp_path / "trec.txt", "1 0 d1 1\n1 0 d2 2\n2 0 d3 1\n")
    assert load_queries(tmp_path, trec, ["d1", "d2", "d3"]) == loaded


def test_no_query_with_a_positive_is_an_error(tmp_path):
    queries = write(tmp_path / "queries.jsonl", QUERIES_JSONL)
    qrels = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\n9\td1\t1\n1\td1\t0\n")
    with pytest.raises(QueryError, match="none of the 3 queries.*qrels file of the same split"):
        load_queries(queries, qrels, {"d1"})


def test_qrels_naming_unknown_documents_is_an_error_naming_them(tmp_path):
    queries = write(tmp_path / "queries.jsonl", QUERIES_JSONL)
    qrels = write(tmp_path / "qrels.tsv", QRELS)
    with pytest.raises(QueryError, match=r"names 2 documents that are not in the corpus \('d2', "
                                         r"'d3'\).*same BEIR data set"):
        load_queries(queries, qrels, {"d1"})


@pytest.mark.parametrize("qrels", ["1\td1\tabc\n2\td3\t1\n", "query-id\tcorpus-id\tscore\n"
                                   "1\td1\t1\n2\td3\tnan\n"])
def test_a_qrels_score_that_is_not_a_number_names_its_line(tmp_path, qrels):
    """Issue 22.10: "abc" on the first line was taken for a header, and the run said that no
    query has a positive; NaN made a query silently irrelevant."""
    queries = write(tmp_path / "queries.jsonl", QUERIES_JSONL)
    path = write(tmp_path / "qrels.tsv", qrels)
    with pytest.raises(QueryError, match=r"qrels\.tsv:[13]: score '(abc|nan)' is not a number"):
        load_queries(queries, path, {"d1", "d2", "d3"})


def test_queries_without_text_are_skipped_with_a_warning(tmp_path, caplog):
    """Issue 22.10: they were dropped without a word."""
    rows = [{"_id": "1", "text": "Cells divide."}, {"_id": "2", "text": " "},
            {"_id": "3", "text": None}]
    queries = write(tmp_path / "queries.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    qrels = write(tmp_path / "qrels.tsv", "1\td1\t1\n2\td2\t1\n3\td3\t1\n")
    with caplog.at_level(logging.WARNING):
        loaded = load_queries(queries, qrels, {"d1", "d2", "d3"})
    assert [q.id for q in loaded] == ["1"]
    assert "skipping 2 queries with no text" in caplog.text and "e.g. 2, 3" in caplog.text


def test_unreadable_or_malformed_query_files(tmp_path):
    qrels = write(tmp_path / "qrels.tsv", QRELS)
    with pytest.raises(QueryError, match="does not exist"):
        load_queries(tmp_path / "missing.jsonl", qrels, {"d1"})
    bad = write(tmp_path / "bad.jsonl", '{"_id": "1", "text": "x"}\nnot json\n')
    with pytest.raises(QueryError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_queries(bad, qrels, {"d1"})
    duplicate = write(tmp_path / "dup.jsonl",
                      '{"_id": "1", "text": "x"}\n{"_id": "1", "text": "y"}\n')
    with pytest.raises(QueryError, match="repeats query id"):
        load_queries(duplicate, qrels, {"d1"})
    bad_qrels = write(tmp_path / "bad_qrels.tsv", "query-id\tcorpus-id\tscore\n1\td1\tlots\n")
    with pytest.raises(QueryError, match="score 'lots' is not a number"):
        load_queries(write(tmp_path / "q.jsonl", QUERIES_JSONL), bad_qrels, {"d1"})


def test_split_is_deterministic_disjoint_and_complete():
    queries = [Query(str(i), f"query {i}", [f"d{i}"]) for i in range(50)]
    train, dev = split_queries(queries, 0.2, seed=7)
    assert len(dev) == 10 and len(train) == 40
    assert {q.id for q in train} | {q.id for q in dev} == {q.id for q in queries}
    assert not {q.id for q in train} & {q.id for q in dev}
    assert split_queries(list(reversed(queries)), 0.2, seed=7)[1] == list(reversed(dev))
    assert split_queries(queries, 0.2, seed=8)[1] != dev
    assert [int(q.id) for q in train] == sorted(int(q.id) for q in train)  # input order kept
    assert split_queries(queries[:2], 0.01, seed=0)[1] != []  # a dev part asked for is never empty
    with pytest.raises(ValueError, match="dev_fraction"):
        split_queries(queries, 1.0, seed=0)


# ---------------------------------------------------------------------------- pairs
def test_stsb_file_unquoted_tab_separated_with_extra_fields(tmp_path):
    path = write(tmp_path / "sts-train.csv",
                 "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane takes off.\tA plane "
                 "is taking off.\n"
                 'main-news\theadlines\t2013\t0002\t1.500\tHe said "no".\tShe left.\textra\tmore\n'
                 "main-news\theadlines\t2013\t0003\t0.000\tCats.\tStocks fell.\n")
    assert load_pairs(path) == [SymmetricPair("A plane takes off.", "A plane is taking off.", 1.0),
                                SymmetricPair('He said "no".', "She left.", 0.3),
                                SymmetricPair("Cats.", "Stocks fell.", 0.0)]


def test_nli_jsonl_and_quoted_tsv_map_labels_to_relevance(tmp_path):
    rows = [{"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0},
            {"premise": "A man sleeps.", "hypothesis": "A man is tired.", "label": 1},
            {"premise": "A man sleeps.", "hypothesis": "A man runs.", "label": 2},
            {"premise": "A man sleeps.", "hypothesis": "Unlabelled.", "label": -1}]
    jsonl = write(tmp_path / "nli.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert [p.score for p in load_pairs(jsonl)] == [1.0, 0.5, 0.0]
    tsv = write(tmp_path / "nli.tsv", 'premise\thypothesis\tlabel\n"He said ""hi""."\tHe spoke.\t'
                                      "entailment\nA.\tB.\tcontradiction\n")
    assert load_pairs(tsv) == [SymmetricPair('He said "hi".', "He spoke.", 1.0),
                               SymmetricPair("A.", "B.", 0.0)]


def test_headed_csv_and_plain_columns(tmp_path):
    headed = write(tmp_path / "pairs.csv", "sentence1,sentence2,score\na b,c d,4\ne,f,2\n")
    assert [p.score for p in load_pairs(headed)] == [0.8, 0.4]  # 0-5 scale detected
    unit = write(tmp_path / "unit.csv", "a,b,0.25\nc,d,1\n")
    assert [p.score for p in load_pairs(unit)] == [0.25, 1.0]
    plain = write(tmp_path / "plain.tsv", "first one\tsecond one\nthird\tfourth\n")
    assert load_pairs(plain) == [SymmetricPair("first one", "second one"),
                                 SymmetricPair("third", "fourth")]


def test_bad_pair_files(tmp_path):
    with pytest.raises(QueryError, match="does not exist"):
        load_pairs(tmp_path / "none.tsv")
    with pytest.raises(QueryError, match="scores range from 0.0 to 9.0"):
        load_pairs(write(tmp_path / "range.csv", "a,b,0\nc,d,9\n"))
    with pytest.raises(QueryError, match="5 columns and no header"):
        load_pairs(write(tmp_path / "wide.csv", "a,b,c,d,e\n"))
    with pytest.raises(QueryError, match="sentence1/sentence2"):
        load_pairs(write(tmp_path / "keys.jsonl", '{"left": "a", "right": "b"}\n'))


# ---------------------------------------------------------------------------- generation
def test_cleaning_keeps_the_first_usable_line():
    assert clean_generated_query(" What is a cell?\nPassage: more") == "What is a cell?"
    assert clean_generated_query('Question: "How do genes mutate?"') == "How do genes mutate?"
    assert clean_generated_query("\n\n") == ""
    assert clean_generated_query(" 12 ") == ""
    assert clean_generated_query(" Which treaty ended the Thirty Years' War?") == ""  # an example


class CountingTeacher:
    """Wraps a real teacher and counts the prompts it generates for."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.prompts = 0

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def generate(self, prompts, **kwargs):
        self.prompts += len(prompts)
        return self.teacher.generate(prompts, **kwargs)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_backbone):
    from llama_index_d2llm.trainer.teacher import Teacher

    return Teacher.from_pretrained(tiny_backbone, dtype="float32", max_length=256, batch_size=2)


def test_generated_queries_are_cached_and_resume(tiny_teacher, tmp_path):
    passages = [Passage(f"p{i}", f"The cell and the gene number {i}. " * 5) for i in range(5)]
    teacher = CountingTeacher(tiny_teacher)
    first = generate_queries(passages, teacher, cache_dir=tmp_path, max_passages=3,
                             show_progress=False, max_new_tokens=12)
    assert teacher.prompts == 3
    assert first, "a random tiny model still writes some text"
    for query in first:
        assert query.text.strip() and "\n" not in query.text
        assert query.positives and set(query.positives) <= {p.id for p in passages}
    files = list((tmp_path / "generated-queries").glob("*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(records) == 3 and all("raw" in r and "queries" in r for r in records)
    # a second run reads everything from the cache
    again = generate_queries(passages, teacher, cache_dir=tmp_path, max_passages=3,
                             show_progress=False, max_new_tokens=12)
    assert again == first and teacher.prompts == 3
    # more passages: only the new ones are generated
    generate_queries(passages, teacher, cache_dir=tmp_path, show_progress=False,
                     max_new_tokens=12)
    assert teacher.prompts == 5


def test_several_queries_per_passage_and_dedupe(tiny_teacher, monkeypatch):
    outputs = iter([[" What is a cell?\n", " What is a cell?"], [" what is a CELL?", " Other?"]])
    monkeypatch.setattr(tiny_teacher, "generate", lambda prompts, **kw: next(outputs))
    passages = [Passage("a", "cell"), Passage("b", "cell")]
    queries = generate_queries(passages, tiny_teacher, per_passage=2, show_progress=False)
    assert [(q.text, q.positives) for q in queries] == [("What is a cell?", ["a", "b"]),
                                                        ("Other?", ["b"])]


def test_a_teacher_that_writes_no_usable_query_is_an_error_saying_so(tiny_teacher, tmp_path,
                                                                     monkeypatch):
    """Issue 22.10: the run went on and blamed the dev split ("no training examples")."""
    monkeypatch.setattr(tiny_teacher, "generate", lambda prompts, **kw: ["12 34"] * len(prompts))
    passages = [Passage("a", "The cell divides."), Passage("b", "The gene mutates.")]
    with pytest.raises(QueryError, match=r"no usable query for any of the 2 passages \(what "
                       r"it wrote is in .*generated-queries.*--teacher.*--queries"):
        generate_queries(passages, tiny_teacher, cache_dir=tmp_path, show_progress=False)


def test_generation_prompts_keep_their_few_shot_examples_whole(tiny_backbone, tmp_path):
    """A teacher whose scoring length is shorter than examples + passage: the passage is
    shortened, never the examples (cut, the 270M model copied the one example left)."""
    from llama_index_d2llm.trainer.prompts import GENERATION_EXAMPLES
    from llama_index_d2llm.trainer.teacher import Teacher

    teacher = Teacher.from_pretrained(tiny_backbone, dtype="float32", max_length=64,
                                      batch_size=2)
    seen = []

    class Recording:
        def __getattr__(self, name):
            return getattr(teacher, name)

        def generate(self, prompts, **kwargs):
            for prompt in prompts:
                budget = kwargs["max_prompt_tokens"]
                seen.append((prompt, budget))
            return teacher.generate(prompts, **kwargs)

    long_text = "The cell divides and the gene is expressed in the nucleus. " * 40
    generate_queries([Passage("p0", long_text)], Recording(), max_passage_tokens=48,
                     show_progress=False)
    (prompt, budget), = seen
    assert all(query in prompt for _, query in GENERATION_EXAMPLES)
    assert teacher.count_tokens(prompt) + 1 <= budget  # + BOS: nothing is cut
    assert budget > teacher.max_length
