"""What a chatbot user reads: never a looping reply, follow-ups that keep their subject.

The offline base model loops ("import uuid2" fifty times) and cannot rewrite a follow-up
into a standalone question (issue 13). These tests use a tiny model built to repeat one
line forever, the repetition guard directly, the condensing without a model, and the
extractive answer over the sample corpus.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from examples.chatbot.answer import (
    SCORERS,
    ExtractiveAnswerer,
    ExtractiveChatEngine,
    is_base_model,
    mode_label,
    needs_llm,
    resolve_modes,
    split_passage,
)
from examples.chatbot.condense import condense_with_history
from examples.chatbot.core import ChatbotError, ChatbotOptions, Source, build_chatbot
from examples.chatbot.extract import (
    Candidate,
    quote_key,
    repeats,
    standardised,
    units_bm25,
    word_runs,
)
from examples.chatbot.repetition import NoRepeatInReply, RepetitionGuard, guard_stream
from tests.tiny_models import LOOPING_LINE as LINE

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample_corpus" / "python_stdlib"


def repeated_lines(text: str, min_chars: int = 12) -> list[str]:
    counts = Counter(" ".join(line.split()) for line in text.splitlines())
    return [line for line, n in counts.items() if n > 1 and len(line) >= min_chars]


# ============================================================================ a looping model
def test_the_looping_model_loops_without_the_controls(looping_lm):
    """The fixture is honest: with every control off, the reply is LINE again and again."""
    from examples.chatbot.llm import TransformersLLM

    llm = TransformersLLM(looping_lm, max_new_tokens=60, repetition_penalty=1.0,
                          no_repeat_ngram_size=0, repetition_guard=False)
    text = "".join(r.delta for r in llm.stream_complete("the cat sat on the mat",
                                                        formatted=True))
    assert text.count(LINE.strip()) >= 5


def test_generation_stops_at_the_first_repeated_line(looping_lm):
    from examples.chatbot.llm import TransformersLLM

    llm = TransformersLLM(looping_lm, max_new_tokens=60)  # the defaults
    pieces = list(llm.stream_complete("the cat sat on the mat", formatted=True))
    text = "".join(p.delta for p in pieces)
    assert text.count(LINE.strip()) == 1 and not repeated_lines(text)
    assert pieces[-1].text == text
    assert llm.complete("the cat sat on the mat", formatted=True).text == text.strip()
    # The n-gram ban alone: the line is never written twice in a row as it was.
    banned = TransformersLLM(looping_lm, max_new_tokens=60, repetition_guard=False,
                             no_repeat_ngram_size=4)
    other = "".join(r.delta for r in banned.stream_complete("hi", formatted=True))
    assert (LINE + LINE).strip() not in other


def test_a_looping_llm_never_reaches_the_user(looping_lm, tmp_path, tiny_student_dir):
    """The whole chatbot, generating with the looping model: one copy of the line at most."""
    from examples.chatbot.llm import TransformersLLM

    llm = TransformersLLM(looping_lm, max_new_tokens=80, repetition_penalty=1.0,
                          no_repeat_ngram_size=0, repetition_guard=False)
    chatbot, _ = build_chatbot(_options(tmp_path, tiny_student_dir, answer="generate"),
                               llm=llm)
    try:
        conversation = chatbot.new_conversation()
        reply = conversation.ask("How do I parse a CSV file?")
        text = reply.read()
        assert reply.mode == f"Written by {Path(looping_lm).name} from your documents"
        assert text.count(LINE.strip()) == 1 and not repeated_lines(text)
        _wait_for(lambda: len(conversation.history) == 2)
        assert conversation.history[1].content.count(LINE.strip()) == 1  # memory: cut too
    finally:
        chatbot.documents.client.close()


def test_a_stream_left_open_does_not_abort_the_exit(looping_lm):
    """A script that stops reading a stream and keeps it exited with SIGABRT ("terminate
    called without an active exception", status 134): the generating thread was still in
    torch when the interpreter tore down."""
    import subprocess
    import sys

    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from examples.chatbot.llm import TransformersLLM\n"
              f"llm = TransformersLLM({looping_lm!r}, max_new_tokens=100_000, "
              "context_window=200_000, repetition_guard=False)\n"
              "stream = llm.stream_complete('the cat', formatted=True)\n"
              "next(stream)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


# ============================================================================ the guard
def _guarded(tokens) -> str:
    return "".join(guard_stream(tokens))


def test_guard_cuts_the_issue_s_loop_before_the_first_repeat():
    tokens = ["The following code creates a new SQLite database.", "\n"]
    tokens += ["import", " uuid2", "\n", "import uuid2ext4", "\n"] * 50
    assert _guarded(tokens) == ("The following code creates a new SQLite database.\n"
                                "import uuid2\nimport uuid2ext4\n")


def test_guard_cuts_repeated_sentences_and_phrase_loops():
    text = "Use csv.reader to read rows. Use csv.reader to read rows. Then close it."
    assert _guarded(list(text)) == "Use csv.reader to read rows. "
    looping = "It returns the rows of the file the rows of the file the rows of the file " * 3
    out = _guarded(re.findall(r"\S+\s*", looping))
    assert out.count("the rows of the file") <= 3 and len(out) < len(looping) // 2
    assert _guarded(["no "] * 40) == "no " * 12
    assert _guarded(["| ", "| ", "| ", "text ", "text ", "text"]) == "| | | text text text"


def test_guard_keeps_text_that_only_looks_like_a_repeat():
    tokens = ["Use csv.writer(f).\n", "}\n", "}\n", "[or]\n", "[or]\n", "Use csv.writer",
              "(g) to write.\n", "Use csv.writer(f) twice"]
    assert _guarded(tokens) == "".join(tokens)  # short lines repeat freely; prefixes diverge
    guard = RepetitionGuard()
    assert guard.feed("line one is here\nline one") == "line one is here\n"  # held back
    assert guard.feed(" is here too") == "line one is here too"
    assert guard.flush() == "" and not guard.stopped


def test_guard_closes_the_source_when_it_cuts():
    closed = []

    def source():
        try:
            while True:
                yield "same line again\n"
        finally:
            closed.append(True)

    assert _guarded(source()) == "same line again\n" and closed == [True]


def test_no_repeat_in_reply_bans_only_the_reply_s_own_ngrams():
    import torch

    prompt = [5, 6, 7, 5, 6]
    reply = [1, 2, 3, 1, 2]
    processor = NoRepeatInReply(3, prompt_length=len(prompt))
    scores = processor(torch.tensor([prompt + reply]), torch.zeros(1, 10))
    assert scores[0, 3] == float("-inf")  # "1 2 3" again
    assert torch.isfinite(scores[0, [0, 1, 2, 4, 5, 6, 7, 8, 9]]).all()  # 7 (prompt) allowed
    with pytest.raises(ValueError, match="at least 2"):
        NoRepeatInReply(1, 0)


# ============================================================================ condensing
def test_history_condensing_keeps_the_subject():
    from llama_index.core.base.llms.types import ChatMessage

    history = [ChatMessage(role="user", content="How do I parse a CSV file?"),
               ChatMessage(role="assistant", content="Use csv.reader.\nimport uuid2")]
    query = condense_with_history(history, "And how do I write one?")
    assert query == "How do I parse a CSV file? And how do I write one?"
    assert condense_with_history([], " How do I parse a CSV file? ") == \
        "How do I parse a CSV file?"
    longer = [*history, ChatMessage(role="user", content="And how do I write one?"),
              ChatMessage(role="assistant", content="...")]
    assert condense_with_history(longer, "With tabs?", turns=2) == \
        "How do I parse a CSV file? And how do I write one? With tabs?"
    assert condense_with_history(longer, "With tabs?", turns=1) == \
        "And how do I write one? With tabs?"


def test_follow_up_with_the_offline_base_model_keeps_its_subject(tmp_path, tiny_student_dir,
                                                                tiny_backbone, monkeypatch):
    """A base LLM (no chat template) is never asked to condense: the retrieval query of the
    follow-up holds the first question, and the answer is quoted from the sources."""
    from examples.chatbot.llm import TransformersLLM
    from llama_index_d2llm import D2LLMRetriever

    asked: list[str] = []
    original = D2LLMRetriever._retrieve
    monkeypatch.setattr(D2LLMRetriever, "_retrieve",
                        lambda self, bundle: asked.append(bundle.query_str) or
                        original(self, bundle))
    base = TransformersLLM(tiny_backbone, max_new_tokens=8)
    assert is_base_model(base)
    chatbot, _ = build_chatbot(_options(tmp_path, tiny_student_dir), llm=base)
    try:
        assert (chatbot.answer, chatbot.condense) == ("extractive", "history")
        conversation = chatbot.new_conversation()
        first = conversation.ask("How do I parse a CSV file?")
        assert first.mode == "Quoted from your documents (offline model)"
        _assert_quoted(first.read(), first.sources)
        follow_up = conversation.ask("And how do I write one?")
        _assert_quoted(follow_up.read(), follow_up.sources)
        assert asked == ["How do I parse a CSV file?",
                         "How do I parse a CSV file? And how do I write one?"]
        assert [m.content for m in conversation.history][::2] == [
            "How do I parse a CSV file?", "And how do I write one?"]
        conversation.reset()
        assert conversation.history == []
    finally:
        chatbot.documents.client.close()


def _options(tmp_path: Path, student: str, **kwargs) -> ChatbotOptions:
    docs = tmp_path / "docs"
    if not docs.exists():
        docs.mkdir()
        for name in ("csv.md", "json.md", "re.md"):
            shutil.copy(SAMPLE / name, docs / name)
    return ChatbotOptions(docs=docs, student=Path(student), state_dir=tmp_path / "state",
                          similarity_top_k=20, top_n=3, show_progress=False, **kwargs)


def _assert_quoted(text: str, sources: list[Source]) -> None:
    """Every line of an extractive answer is from a source or names one; none repeats."""
    assert text.strip() and not repeated_lines(text)
    passages = "\n".join(s.text for s in sources)
    names = {s.source for s in sources}
    for line in text.splitlines():
        if not line.strip():
            continue
        where = re.fullmatch(r"  \[(\S+)(?: · .+)?\]", line)
        if where:
            assert where.group(1) in names
        else:
            assert line.strip() in passages or " ".join(line.split()) in " ".join(
                passages.split()), line


# ============================================================================ modes
def test_modes_follow_the_llm():
    from llama_index.core.llms import MockLLM

    assert resolve_modes("auto", "auto", None, "hf") == ("extractive", "history")
    assert resolve_modes("auto", "auto", MockLLM(), "mock") == ("generate", "llm")
    assert resolve_modes("auto", "auto", None, "ollama:llama3.2") == ("generate", "llm")
    assert resolve_modes("generate", "auto", None, "hf") == ("generate", "history")
    assert not needs_llm("extractive", "history") and needs_llm("extractive", "llm")
    assert mode_label("extractive", None, "hf") == "Quoted from your documents (offline model)"
    assert mode_label("generate", MockLLM(), "mock") == "Written by MockLLM from your documents"
    with pytest.raises(ChatbotError, match="--answer must be one of"):
        resolve_modes("summarise", "auto", None)


def test_offline_default_is_not_even_loaded(tmp_path, tiny_student_dir, monkeypatch):
    """``--llm hf`` with the default modes answers extractively: the 270M model is not loaded."""
    import examples.chatbot.llm as llm_module

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM was loaded")

    monkeypatch.setattr(llm_module, "llm_from_spec", refuse)
    chatbot, _ = build_chatbot(_options(tmp_path, tiny_student_dir))
    try:
        assert chatbot.llm is None
        assert chatbot.mode_label == "Quoted from your documents (offline model)"
        reply = chatbot.new_conversation().ask("What does json.dumps do?")
        _assert_quoted(reply.read(), reply.sources)
    finally:
        chatbot.documents.client.close()


# ============================================================================ extractive
def test_split_passage_keeps_sections_code_and_sentences():
    text = (SAMPLE / "csv.md").read_text()
    units = split_passage(text, "csv.md")
    reader = [u for u in units if u.heading == "csv.reader (function)"]
    assert reader[0].text.startswith("csv_reader = reader(iterable") and "\n" in reader[0].text
    assert "The returned object is an iterator." in [u.text for u in reader]
    assert all(u.source == "csv.md" and u.text == u.text.strip() for u in units)
    assert not any(u.text.startswith("#") for u in units)  # headings name units only
    writer = next(u for u in units if u.heading == "csv.writer (function)")
    assert writer.embed_text.startswith("csv.writer (function): csv_writer = csv.writer(")
    bullets = [u.text for u in units if u.text.startswith("* quotechar")]
    assert bullets == ["* quotechar - specifies a one-character string to use as the "
                       "quoting character."]


def test_extractive_answer_quotes_dedups_and_names_sources(tiny_student_dir):
    from llama_index_d2llm import D2LLMEmbedding

    text = (SAMPLE / "csv.md").read_text()
    half = len(text) // 2
    overlap = text[half - 400: half + 2000]  # two chunks that share sentences
    sources = [Source(1, "a", "csv.md", 2.0, 0.5, 1, text[:half]),
               Source(2, "b", "csv.md", 1.0, 0.4, 2, overlap)]
    embed = D2LLMEmbedding(model_name=tiny_student_dir)
    for scorer in SCORERS:
        answerer = ExtractiveAnswerer(embed, sentences=6, scorer=scorer)
        ranked = answerer.rank("How do I parse a CSV file?", sources)
        keys = [" ".join(u.text.split()) for u in ranked]
        assert len(keys) == len(set(keys))
        assert not any(a != b and a in b for a in keys for b in keys)
        paragraphs = answerer.answer("How do I parse a CSV file?", sources)
        _assert_quoted("\n\n".join(paragraphs), sources)
        quoted = sum(1 for p in paragraphs for line in p.splitlines()
                     if not line.startswith("  ["))
        assert 1 <= quoted <= 6 * 8  # 6 units, code blocks up to 8 lines
    assert ExtractiveAnswerer(embed).answer("anything", []) == [
        "The retrieved passages hold no sentence to quote; see the sources below."]
    with pytest.raises(ValueError, match="scorer must be one of"):
        ExtractiveAnswerer(embed, scorer="bm25")


def test_units_far_below_the_best_are_not_quoted():
    """The quickstart answered the regular-expression question with re's function table, then
    a difflib sentence and a time conversion: weak units are noise, not more of the answer."""
    def unit(text: str, position: int) -> Candidate:
        return Candidate(text=text, heading="", source="re.md", passage=0, position=position)

    best, close, weak = unit("findall finds all.", 0), unit("finditer too.", 1), unit("Epoch.", 2)
    scored = [(best, 2.0), (close, 1.6), (weak, 0.2)]
    assert ExtractiveAnswerer(None, margin=1.0).choose(scored) == [best, close]
    assert ExtractiveAnswerer(None, margin=None).choose(scored) == [best, close, weak]
    assert ExtractiveAnswerer(None, margin=1.0, sentences=1).choose(scored) == [best]
    # the floor follows the best unit not quoted before
    assert ExtractiveAnswerer(None, margin=1.0).choose(scored, {quote_key(best.text)}) == [close]
    assert ExtractiveAnswerer(None, margin=1.5).choose(
        scored, {quote_key(best.text), quote_key(close.text)}) == [weak]
    # passage order has no scores to compare
    assert ExtractiveAnswerer(None, scorer="order", margin=0.0).choose(scored) == [
        best, close, weak]
    with pytest.raises(ValueError, match="margin must be >= 0"):
        ExtractiveAnswerer(None, margin=-1.0)
    assert standardised([1.0, 2.0, 3.0]) == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)
    assert standardised([5.0, 5.0]) == [0.0, 0.0] and standardised([7.0]) == [0.0]


def test_units_cut_differently_from_one_table_are_not_quoted_twice():
    """The quickstart showed "compile Compile a pattern ... purge Clear the regular expression
    cache." and then the same words again with "escape ..." added: neither contains the other."""
    first = quote_key("match Match a pattern. compile Compile a pattern into a Pattern "
                      "object. purge Clear the regular expression cache.")
    again = quote_key("compile Compile a pattern into a Pattern object. purge Clear the "
                      "regular expression cache. escape Backslash all non-alphanumerics.")
    other = quote_key("Return a list of all non-overlapping matches in the string.")
    assert repeats(again, [first], word_runs(first))
    assert not repeats(other, [first], word_runs(first))
    assert repeats(quote_key("purge Clear the regular"), [first], word_runs(first))  # inside
    assert not repeats(quote_key("Pattern objects"), [first], word_runs(first))


def test_units_bm25_weighs_the_words_that_tell_units_apart():
    """IDF over the units: the module's name, in every unit, tells nothing; the follow-up's
    own word does."""
    units = ["csv.reader: Return a reader object that reads CSV rows.",
             "csv.writer: Return a writer object; write rows with writerow.",
             "csv: The module handles tabular CSV data."]
    scores = units_bm25("how do I write rows to a csv file", units)
    assert scores.index(max(scores)) == 1
    assert max(units_bm25("csv", units)) < units_bm25("writerow", units)[1] / 3
    assert units_bm25("zebra", units) == [0.0, 0.0, 0.0]
    # API names: "write" matches csv.writer and csv_writer, "parse" parsing; question words
    # match nothing
    api = ["csv.writer (function): csv_writer = csv.writer(fileobj)", "Parsing rows.", "Other."]
    assert [s > 0 for s in units_bm25("And how do I write one?", api)] == [True, False, False]
    assert [s > 0 for s in units_bm25("how to parse", api)] == [False, True, False]
    assert units_bm25("how do I", api) == [0.0, 0.0, 0.0]


def test_a_follow_up_answer_never_quotes_again_what_the_conversation_quoted(tiny_student_dir):
    """The follow-up retrieves with the first question in its query, so the same units rank
    high again; the engine quotes only new ones, and says so when none is left."""
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_index_d2llm import D2LLMEmbedding

    text = (SAMPLE / "csv.md").read_text()

    node = TextNode(id_="csv-1", text=text[:3000], metadata={"file_name": "csv.md"})

    class FixedRetriever:  # the same passages for every query
        def retrieve(self, query):
            return [NodeWithScore(node=node, score=1.0)]

    answerer = ExtractiveAnswerer(D2LLMEmbedding(model_name=tiny_student_dir), sentences=3)
    engine = ExtractiveChatEngine(FixedRetriever(), answerer)

    def ask(question: str) -> str:
        return "".join(engine.stream_chat(question).response_gen)

    def quoted_lines(answer: str) -> set[str]:
        return {line for line in answer.splitlines() if line and not line.startswith("  [")}

    first = ask("How do I parse a CSV file?")
    second = ask("And how do I write one?")
    assert quoted_lines(first) and quoted_lines(second)
    assert not quoted_lines(first) & quoted_lines(second)
    for _ in range(20):  # until the passage has nothing new left
        last = ask("And how do I write one?")
    assert last == ("The retrieved passages hold nothing beyond what was quoted above; see the "
                    "sources below.")
    engine.reset()  # a new conversation may quote them again
    assert ask("How do I parse a CSV file?") == first


# ============================================================================ sources in words
def test_a_passage_is_labelled_by_the_section_it_sits_under():
    from examples.chatbot.documents import section_at

    text = "# csv\n\nintro\n\n## csv.reader (function)\n\nbody of the reader\n\n## csv.writer\n\nw"
    assert section_at(text, text.index("body"), "body of the reader") == "csv.reader (function)"
    assert section_at(text, text.index("## csv.writer"), "## csv.writer\n\nw") == "csv.writer"
    assert section_at(text, text.index("intro"), "intro") == "csv"
    assert section_at("no heading", None, "x\n## later\n") == "later"  # no offset: its own
    assert section_at("plain text", 0, "plain text") == ""


def test_sources_are_shown_in_words_with_a_bar():
    from examples.chatbot.chat import INTERNAL_TERMS, Source
    from examples.chatbot.terminal import format_sources, score_bar

    assert score_bar(3.0, [3.0, 1.0]) == "█" * 10
    assert score_bar(1.0, [3.0, 1.0]) == "██" + "░" * 8  # the weakest: a quarter, rounded
    assert score_bar(0.5, [0.5]) == "█" * 10
    sources = [Source(1, "a", "csv.md", 2.4, 0.03, 3, "the reader", "csv.reader (function)"),
               Source(2, "b", "re.md", 1.0, None, None, "a pattern")]
    text = format_sources(sources)
    assert "[1] ██████████  csv.md › csv.reader (function)  (plain vector search alone would " \
           "have ranked it #3)" in text
    assert "[2] ██░░░░░░░░  re.md\n" in text
    assert not INTERNAL_TERMS.search(text)
    assert INTERNAL_TERMS.search("D2LLM 0.970 · first stage 0.016 (#4 in the first stage)")
