"""The examples' code paths with tiny random models and a temporary on-disk Qdrant.

Ingest, ask, follow up, sources, reuse without re-embedding, re-ingestion of changed files,
the one-line errors, the terminal front end, and the quickstart (the README's main job) in
its quick form.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from examples.chatbot import core
from examples.chatbot.chat import INTERNAL_TERMS
from examples.chatbot.core import (
    ChatbotError,
    ChatbotOptions,
    StoreLocation,
    build_chatbot,
    open_index,
    open_store,
)
from examples.chatbot.llm import LLMSpecError, TransformersLLM, _cut_at_stop, llm_from_spec

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample_corpus" / "python_stdlib"
FILES = ("csv.md", "json.md", "subprocess.md")


@pytest.fixture()
def docs(tmp_path) -> Path:
    """Three documents of the sample corpus, a hidden file and a binary one no reader takes."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in FILES:
        shutil.copy(SAMPLE / name, folder / name)
    (folder / ".notes.swp").write_bytes(b"\0hidden")
    (folder / "logo.bin").write_bytes(bytes(range(256)) * 4)
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tiny_backbone) -> TransformersLLM:
    return TransformersLLM(tiny_backbone, max_new_tokens=6)


def options(docs: Path, student: str, tmp_path: Path, **kwargs) -> ChatbotOptions:
    return ChatbotOptions(docs=docs, student=Path(student), state_dir=tmp_path / "state",
                          similarity_top_k=20, top_n=3, show_progress=False, **kwargs)


def no_passage_embedding(monkeypatch) -> None:
    """Fail the test if any passage is embedded (reuse must not re-embed)."""
    from llama_index_d2llm import D2LLMEmbedding

    def refuse(self, texts):
        raise AssertionError(f"re-embedded {len(texts)} passages")

    monkeypatch.setattr(D2LLMEmbedding, "_get_text_embeddings", refuse)


# ============================================================================ LLM
def test_cut_at_stop_keeps_text_before_the_marker():
    assert _cut_at_stop("The answer", " is 4.", ["\nuser:"]) == ("The answer is 4.", " is 4.",
                                                                 False)
    assert _cut_at_stop("It is 4.\nus", "er: and", ["\nuser:"]) == ("It is 4.", "", True)
    assert _cut_at_stop("It is", " 4.\nuser: hi", ["\nuser:"]) == ("It is 4.", " 4.", True)


def test_transformers_llm_streams_and_closes_early(tiny_llm):
    pieces = list(tiny_llm.stream_complete("the cat sat on the mat", formatted=True))
    assert pieces, "no stream"
    assert "".join(p.delta for p in pieces) == pieces[-1].text
    assert tiny_llm.complete("the cat sat on the mat", formatted=True).text == \
        pieces[-1].text.strip()
    stream = tiny_llm.stream_complete("a dog runs in the park", formatted=True)
    next(stream)
    stream.close()  # must not hang: the generation thread is stopped and joined
    assert not tiny_llm._lock.locked()


def test_transformers_llm_chat_prompt_without_template(tiny_llm):
    from llama_index.core.base.llms.types import ChatMessage

    prompt = tiny_llm.messages_to_prompt([ChatMessage(role="system", content="Be brief."),
                                          ChatMessage(role="user", content="Hello?")])
    assert prompt == "Be brief.\n\nQuestion: Hello?\nAnswer:"


def test_llm_spec_errors_name_the_fix(monkeypatch):
    with pytest.raises(LLMSpecError, match="unknown --llm 'gpt'"):
        llm_from_spec("gpt")
    with pytest.raises(LLMSpecError, match="ollama:llama3.2"):
        llm_from_spec("ollama:")
    monkeypatch.setitem(sys.modules, "llama_index.llms.ollama", None)  # as if not installed
    with pytest.raises(LLMSpecError, match="pip install llama-index-llms-ollama"):
        llm_from_spec("ollama:llama3.2")
    monkeypatch.setitem(sys.modules, "llama_index.llms.openai_like", None)
    with pytest.raises(LLMSpecError, match="pip install llama-index-llms-openai-like"):
        llm_from_spec("openai-like:http://127.0.0.1:1/v1#model")
    with pytest.raises(LLMSpecError, match="could not load a causal LM"):
        llm_from_spec("hf:/nonexistent/model")


# ============================================================================ ingest and chat
def test_ingest_ask_follow_up_and_reuse(docs, tiny_student_dir, tmp_path, monkeypatch):
    from llama_index.core.llms import MockLLM

    from llama_index_d2llm import D2LLMRetriever

    asked: list[str] = []
    original = D2LLMRetriever._retrieve

    def spy(self, query_bundle):
        asked.append(query_bundle.query_str)
        return original(self, query_bundle)

    monkeypatch.setattr(D2LLMRetriever, "_retrieve", spy)
    chatbot, report = build_chatbot(options(docs, tiny_student_dir, tmp_path), llm=MockLLM())
    try:
        assert sorted(report.added) == sorted(FILES)
        assert [r for r, _ in report.skipped] == ["logo.bin"]
        assert "no reader handles .bin" in report.skipped[0][1]
        assert report.embedded_chunks == report.total_chunks == chatbot.documents.count() > 10

        conversation = chatbot.new_conversation()
        reply = conversation.ask("How do I parse a CSV file?")
        assert len(reply.sources) == 3
        for source in reply.sources:
            assert source.source in FILES
            assert source.retrieval_score is not None and -1.0 <= source.retrieval_score <= 1.0
            assert source.first_stage_rank in (1, 2, 3)
        assert [s.score for s in reply.sources] == sorted((s.score for s in reply.sources),
                                                          reverse=True)
        answer = reply.read()
        assert answer and "How do I parse a CSV file?" in answer  # MockLLM echoes its prompt
        assert reply.sources[0].text[:40] in answer  # the context reached the LLM
        _wait_for_history(conversation, 2)

        follow_up = conversation.ask("And how do I write one?")
        follow_up.read()
        _wait_for_history(conversation, 4)
        # The follow-up was condensed with the history before retrieval.
        assert asked[-1] != "And how do I write one?"
        assert "How do I parse a CSV file?" in asked[-1]

        conversation.reset()
        assert conversation.history == []
        with pytest.raises(ChatbotError, match="empty"):
            conversation.ask("   ")
    finally:
        chatbot.documents.client.close()

    # Second run: same folder, same student -> the index is reused, nothing is embedded.
    no_passage_embedding(monkeypatch)
    index, again = open_index(options(docs, tiny_student_dir, tmp_path))
    try:
        assert again.embedded_chunks == 0 and sorted(again.unchanged) == sorted(FILES)
        assert again.total_chunks == report.total_chunks == index.count()
    finally:
        index.client.close()


def _wait_for_history(conversation, messages: int, timeout: float = 10.0) -> None:
    # The chat engine writes the answer into memory from its own thread.
    deadline = time.monotonic() + timeout
    while len(conversation.history) < messages and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(conversation.history) == messages


def test_changed_touched_removed_and_lost_manifest(docs, tiny_student_dir, tmp_path,
                                                    monkeypatch):
    (docs / "NOTES").write_text("Plain notes without a suffix are read as text.\n")
    opts = options(docs, tiny_student_dir, tmp_path)
    index, first = open_index(opts)
    index.client.close()
    manifest = core.Manifest.load(index.manifest_path)
    csv_ids = set(manifest.files["csv.md"].node_ids)

    (docs / "csv.md").write_text("# csv\n\nUse csv.reader(open(path)) to read rows.\n")
    os.utime(docs / "json.md", ns=(time.time_ns(), time.time_ns()))  # touched, same content
    (docs / "subprocess.md").unlink()
    (docs / "NOTES").write_bytes(b"\0\1\2")  # unreadable now: its passages are kept
    index, second = open_index(opts)
    try:
        assert second.changed == ["csv.md"] and second.removed == ["subprocess.md"]
        assert second.unchanged == ["json.md"] and second.embedded_chunks == 1
        assert "NOTES" in dict(second.skipped)
        manifest = core.Manifest.load(index.manifest_path)
        assert set(manifest.files) == {"csv.md", "json.md", "NOTES"}
        assert not csv_ids & set(manifest.files["csv.md"].node_ids)
        assert index.count() == manifest.chunks == second.total_chunks  # old points are gone
        sources = {p.payload["source"] for p in index.client.scroll(
            opts.collection, limit=1000, with_payload=True)[0]}
        assert sources == {"csv.md", "json.md", "NOTES"}
    finally:
        index.client.close()

    # A lost manifest is rebuilt from the points' payloads, without re-embedding.
    index.manifest_path.unlink()
    no_passage_embedding(monkeypatch)
    index, third = open_index(opts)
    try:
        assert third.embedded_chunks == 0 and sorted(third.unchanged) == ["csv.md", "json.md"]
        assert index.count() == second.total_chunks
    finally:
        index.client.close()


def test_collection_of_another_student_is_refused_and_kept(docs, tiny_student_dir,
                                                           tiny_backbone, tmp_path):
    from llama_index_d2llm import D2LLMStudent

    other = D2LLMStudent.from_backbone(tiny_backbone, pma_heads=4, iem_hidden_size=16,
                                       dtype="float32", seed=1)
    other_dir = other.save_pretrained(tmp_path / "other-student")
    index, report = open_index(options(docs, tiny_student_dir, tmp_path))
    index.client.close()

    with pytest.raises(ChatbotError, match="--rebuild") as error:
        open_index(options(docs, str(other_dir), tmp_path))
    assert "\n" not in str(error.value)
    index, kept = open_index(options(docs, tiny_student_dir, tmp_path))
    try:
        assert kept.embedded_chunks == 0 and index.count() == report.total_chunks
    finally:
        index.client.close()

    index, rebuilt = open_index(options(docs, str(other_dir), tmp_path, rebuild=True))
    try:
        assert rebuilt.embedded_chunks == rebuilt.total_chunks == index.count()
    finally:
        index.client.close()


def test_bad_folders_give_one_line_errors(tmp_path):
    with pytest.raises(ChatbotError, match="does not exist"):
        core.scan_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChatbotError, match="no documents to index"):
        core.scan_folder(empty)
    (empty / "image.bin").write_bytes(b"\x89PNG\0\0")
    with pytest.raises(ChatbotError, match=r"found only: image\.bin"):
        core.scan_folder(empty)
    (empty / "notes.txt").write_text("   \n")
    (empty / "README").write_text("A file without suffix is read as text.\n")
    usable, skipped = core.scan_folder(empty)
    assert sorted(usable) == ["README", "notes.txt"] and [s for s, _ in skipped] == ["image.bin"]
    with pytest.raises(ChatbotError, match="is a file, not a folder"):
        core.scan_folder(empty / "README")


@pytest.mark.slow
def test_locked_qdrant_folder_names_the_process(tmp_path):
    path = tmp_path / "qdrant"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from llama_index_d2llm.edge import EdgeClient
            client = EdgeClient.open({str(path)!r})
            print("ready", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ChatbotError, match="is in use by process") as error:
            open_store(StoreLocation(path=path))
        message = str(error.value)
        assert str(holder.pid) in message and str(path) in message and "--qdrant-url" in message
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    open_store(StoreLocation(path=path)).close()  # free again once the holder is gone


def test_unreachable_qdrant_server(tmp_path):
    with pytest.raises(ChatbotError, match=r"no Qdrant server answers at http://127\.0\.0\.1:9"):
        open_store(StoreLocation(url="http://127.0.0.1:9"), timeout=3)


def test_missing_student_and_one_line_exit(tmp_path, capsys, docs):
    from examples.chatbot.cli import EXIT_USER_ERROR, run_safely

    def run():
        open_index(options(docs, str(tmp_path / "nope"), tmp_path))

    assert run_safely(run) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: no student at") and err.count("\n") == 1
    assert "d2llm-rag distill" in err


# ============================================================================ front ends
def test_terminal_chat_loop(docs, tiny_student_dir, tiny_llm, tmp_path):
    from examples.chatbot.terminal import chat_loop

    chatbot, _ = build_chatbot(options(docs, tiny_student_dir, tmp_path), llm=tiny_llm)
    try:
        stdin = io.StringIO("How do I parse a CSV file?\n\n/sources\nand write it?\n/reset\n"
                            "/quit\nnever asked\n")
        stdout = io.StringIO()
        assert chat_loop(chatbot, stdin, stdout) == 2
    finally:
        chatbot.documents.client.close()
    text = stdout.getvalue()
    assert text.count("bot> ") == 2 and "(sources hidden)" in text
    assert text.count("where this answer comes from, best match first:") == 1
    assert re.search(r"\[1\] [█░]{10}  \S+\.md( › [^\n]+)?  \(plain vector search alone would "
                     r"have ranked it #\d\)\n", text)
    assert not INTERNAL_TERMS.search(text)
    assert "(new conversation)" in text and "never asked" not in text


class _EchoConversation:
    """Answers with the question it was asked: the terminal's reading, without models."""

    def ask(self, question: str):
        from examples.chatbot.chat import Reply

        return Reply(question=question, sources=[], tokens=iter([f"you asked: {question}"]))


def test_terminal_chat_survives_input_that_is_not_utf8():
    """Issue 22.6: `printf 'flu \\xff\\xfe fever\\n' | ... terminal` ended with a traceback."""
    from types import SimpleNamespace

    from examples.chatbot.terminal import chat_loop

    chatbot = SimpleNamespace(new_conversation=_EchoConversation)
    for errors in ("strict", "surrogateescape"):  # a terminal's, and a pipe's in POSIX locale
        stdin = io.TextIOWrapper(io.BytesIO(b"flu \xff\xfe fever\nand cough\n"),
                                 encoding="utf-8", errors=errors)
        stdout = io.StringIO()
        assert chat_loop(chatbot, stdin, stdout) == 2
        text = stdout.getvalue()
        assert "not UTF-8" in text and "you asked: flu \ufffd\ufffd fever" in text
        assert "you asked: and cough" in text
    stdout = io.StringIO()
    assert chat_loop(chatbot, io.StringIO("lone \udc80 surrogate\n"), stdout) == 1
    assert "you asked: lone \ufffd surrogate" in stdout.getvalue()


def test_ctrl_c_in_the_terminal_stops_the_answer_not_the_chat():
    """Ctrl-C while searching went out of the chat (exit 130); mid-answer it left the reply
    open, and with it the LLM's generation."""
    from types import SimpleNamespace

    from examples.chatbot.chat import Reply
    from examples.chatbot.terminal import chat_loop

    closed = []

    def interrupted_tokens():
        try:
            yield "the first words"
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    class Conversation:
        asked = 0

        def ask(self, question):
            self.asked += 1
            if self.asked == 1:
                raise KeyboardInterrupt  # while the passages are retrieved
            tokens = interrupted_tokens() if self.asked == 2 else iter(["fine"])
            return Reply(question=question, sources=[], tokens=tokens)

    stdout = io.StringIO()
    chatbot = SimpleNamespace(new_conversation=Conversation)
    assert chat_loop(chatbot, io.StringIO("one\ntwo\nthree\n"), stdout) == 2
    text = stdout.getvalue()
    assert text.count("[stopped]") == 2 and "the first words [stopped]" in text
    assert closed == [True] and text.rstrip().endswith("you>")


def test_a_question_too_long_for_the_llm_is_refused_saying_how_long_it_may_be():
    """Issue 22.10: a 60 KB web message gave LlamaIndex's "Calculated available context size
    -11605 was not non-negative."."""
    from examples.chatbot.chat import MAX_QUESTION_CHARS, Conversation

    class Overflowing:
        def stream_chat(self, question):
            raise ValueError("Calculated available context size -17 was not non-negative.")

    conversation = Conversation(Overflowing())
    with pytest.raises(ChatbotError, match="the question is 60,000 characters long: ask in at "
                       f"most {MAX_QUESTION_CHARS:,}"):
        conversation.ask("How do I parse a CSV file? " * 2222 + "How do")
    with pytest.raises(ChatbotError, match="do not fit the LLM's context window.*--top-n"):
        conversation.ask("How do I parse a CSV file?")


def test_terminal_and_ingest_commands(docs, tiny_student_dir, tiny_backbone, tmp_path,
                                      monkeypatch, capsys):
    from examples.chatbot.__main__ import main

    common = ["--docs", str(docs), "--student", tiny_student_dir, "--state-dir",
              str(tmp_path / "state"), "--top-k", "10", "--top-n", "2"]
    assert main(["ingest", *common]) == 0
    assert "3 new" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("What does json.dumps do?\n"))
    assert main(["terminal", *common, "--llm", f"hf:{tiny_backbone}", "--max-new-tokens",
                 "4"]) == 0
    out = capsys.readouterr().out
    assert "3 unchanged; embedded 0 chunks" in out and "bot> " in out and "\n  [2] " in out
    assert main([]) == 2
    assert main(["terminal", *common, "--top-n", "20"]) == 2
    assert "larger than --top-k" in capsys.readouterr().err


# ============================================================================ quickstart
def test_quickstart_quick_with_tiny_models(docs, tiny_backbone, tmp_path, capsys):
    """The README's main job, quick form: distil, index into Qdrant on disk, answer."""
    from examples.quickstart import main

    (docs / "logo.bin").unlink()  # the sample corpus is text only
    argv = ["--quick", "--workdir", str(tmp_path / "run"), "--corpus", str(docs),
            "--teacher", tiny_backbone, "--backbone", tiny_backbone,
            "--distill-args", "--pma-heads 4 --iem-hidden-size 16",
            "--llm", f"hf:{tiny_backbone}", "--top-k", "10", "--top-n", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/3] distilling a student:  d2llm-rag distill --corpus" in out
    assert (tmp_path / "run" / "student" / "d2llm_config.json").exists()
    # the table compares what a user compares, in words: plain vector search and this package
    assert re.search(r"  #  plain vector search +this package\n", out)
    assert re.search(r"this package: vector \+ keyword search, its best 10( reordered by "
                     r"meaning(, keywords)?( and (keywords|the tuned model's judgement))?)?\n", out)
    table = [line for line in out.splitlines() if re.match(r"\s+[123]  \S", line)]
    assert len(table) == 3
    assert all(re.search(r"\((same|was #\d+|new: not in its top 10)\)$", line) for line in table)
    assert not INTERNAL_TERMS.search(out.split("\n[2/3]")[-1].split("\nA: ")[0])
    assert "\nA: " in out
    assert main(argv) == 0  # second run: student and index are reused
    out = capsys.readouterr().out
    assert "reusing the student" in out and "embedded 0 chunks" in out


def _readme_commands() -> list[list[str]]:
    commands = []
    for readme in (REPO / "examples").rglob("README.md"):
        for line in readme.read_text().splitlines():
            line = line.strip()
            if line.startswith(("python examples/quickstart.py", "python -m examples.chatbot")):
                commands.append(shlex.split(line.split("  #")[0]))
    return commands


def test_readme_commands_parse():
    """Every example command shown in the examples' READMEs is accepted by its parser."""
    from examples import quickstart
    from examples.chatbot.__main__ import COMMANDS, parser_for

    commands = _readme_commands()
    assert len(commands) >= 4
    for command in commands:
        if command[1] == "examples/quickstart.py":
            quickstart.parse_args(command[2:])
            continue
        module, args = command[2], command[3:]
        if module == "examples.chatbot":
            assert args and args[0] in COMMANDS, command
            parser_for(args[0]).parse_args(args[1:])
        else:
            assert module in ("examples.chatbot.terminal", "examples.chatbot.web"), command
            parser_for(module.rsplit(".", 1)[1]).parse_args(args)


# ============================================================================ sample corpus
@pytest.mark.slow
def test_sample_corpus_is_small_licensed_and_reproducible(tmp_path):
    files = sorted(SAMPLE.glob("*.md"))
    assert len(files) >= 40
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (SAMPLE.parent / "LICENSE-PSF.txt").read_text()
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the shipped corpus was extracted from Python 3.11's docstrings")
    from examples.build_sample_corpus import MODULES, build

    assert sorted(f"{m}.md" for m in MODULES) == [f.name for f in files]
    some = ("csv", "dataclasses", "json", "pathlib")  # all 41 take ~20 s on 2 busy cores
    rebuilt = build(tmp_path / "python_stdlib", max_chars=8_000, modules=some)
    for new in rebuilt:
        assert new.read_text() == (SAMPLE / new.name).read_text(), new.name


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["examples/quickstart.py", "--help"],  # as the README runs it: a script, not a module
    ["-m", "examples.chatbot", "web", "--help"],
])
def test_entry_points_start_from_the_repository_root(command):
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--" in result.stdout and "usage:" in result.stdout
