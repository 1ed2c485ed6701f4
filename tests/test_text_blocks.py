"""Long documents reach the sentence splitter in blocks (issue 22.8): a 50 MB document on one
line took 83 s and 7.4 GB, then failed in NLTK with a message that named no file."""

from __future__ import annotations

import logging

import pytest

from llama_index_d2llm.text_blocks import MAX_BLOCK_CHARS, text_blocks

SENTENCE = "The cat sat on the mat and a dog runs in the park. "


def test_a_short_text_is_one_block():
    assert list(text_blocks("one line\n\nand another", max_chars=100)) == [
        "one line\n\nand another"]
    assert list(text_blocks("")) == [""]


def test_blocks_end_at_the_best_break_and_keep_every_character():
    text = ("word " * 30 + "end of sentence. " + "word " * 10 + "\n") * 20
    blocks = list(text_blocks(text, max_chars=400))
    assert "".join(blocks) == text and len(blocks) > 1
    assert all(len(block) <= 400 for block in blocks)
    assert all(block.endswith("\n") for block in blocks[:-1])  # a line, not a word
    no_lines = SENTENCE * 40
    assert all(block.endswith(". ") for block in list(text_blocks(no_lines, max_chars=300))[:-1])


def test_a_text_without_breaks_is_cut_where_it_falls_and_named(caplog):
    with caplog.at_level(logging.WARNING):
        blocks = list(text_blocks("x" * 1000, "blob.txt", max_chars=300))
    assert [len(b) for b in blocks] == [300, 300, 300, 100]
    assert "blob.txt" in caplog.text and caplog.text.count("without a space") == 1


def _record_split_sizes(monkeypatch) -> list[int]:
    from llama_index.core.node_parser import SentenceSplitter

    sizes: list[int] = []
    split_text = SentenceSplitter.split_text

    def recording(self, text):
        sizes.append(len(text))
        return split_text(self, text)

    monkeypatch.setattr(SentenceSplitter, "split_text", recording)
    return sizes


def test_the_trainer_splits_a_one_line_document_in_blocks(tmp_path, monkeypatch):
    from llama_index_d2llm.trainer.corpus import load_corpus

    (tmp_path / "docs").mkdir()
    text = SENTENCE * (3 * MAX_BLOCK_CHARS // len(SENTENCE))  # 300 KB, no line break
    (tmp_path / "docs" / "one-line.txt").write_text(text)
    sizes = _record_split_sizes(monkeypatch)
    passages = load_corpus(tmp_path / "docs", max_tokens=64, chunk_overlap=0)
    assert max(sizes) <= MAX_BLOCK_CHARS and len(sizes) >= 3
    assert " ".join(p.text for p in passages).count("cat") == text.count("cat")


def test_the_chatbot_reads_a_one_line_document_in_blocks(tmp_path):
    from examples.chatbot.documents import load_file

    text = SENTENCE * (3 * MAX_BLOCK_CHARS // len(SENTENCE))
    path = tmp_path / "one-line.txt"
    path.write_text(text)
    documents = load_file(path, "one-line.txt", "sha")
    assert len(documents) >= 3 and "".join(d.text for d in documents) == text
    assert all(len(d.text) <= MAX_BLOCK_CHARS for d in documents)
    assert [d.id_ for d in documents[:2]] == ["one-line.txt#0", "one-line.txt#1"]
    assert {d.metadata["source"] for d in documents} == {"one-line.txt"}


@pytest.mark.parametrize("max_chars", [0, 1])
def test_a_block_size_below_two_is_refused(max_chars):
    with pytest.raises(ValueError, match="at least 2"):
        list(text_blocks("abc", max_chars=max_chars))
