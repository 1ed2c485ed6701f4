"""Stage 1: reading document folders and BEIR corpora into passages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_index_d2llm.trainer.corpus import CorpusError, Passage, load_corpus

SENTENCES = " ".join(f"Sentence number {i} talks about the cell and the gene." for i in range(60))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_beir(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def test_folder_of_text_and_markdown_is_read_recursively_with_stable_ids(tmp_path):
    write(tmp_path / "a.txt", "The cat sat on the mat.")
    write(tmp_path / "sub" / "b.md", "# Title\n\nA dog runs in the park.")
    write(tmp_path / ".hidden.txt", "never read")
    write(tmp_path / "empty.txt", "")
    passages = load_corpus(tmp_path)
    assert [p.id for p in passages] == ["a.txt#0", "sub/b.md#0"]
    assert passages[0] == Passage("a.txt#0", "The cat sat on the mat.")
    assert "A dog runs in the park." in passages[1].text
    assert load_corpus(tmp_path) == passages  # same ids, same order, every time


def test_long_documents_are_split_to_max_tokens_of_the_given_tokenizer(tmp_path, tiny_backbone):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    write(tmp_path / "long.txt", SENTENCES)
    passages = load_corpus(tmp_path, max_tokens=64, tokenizer=tokenizer, chunk_overlap=8)
    assert len(passages) > 3
    assert [p.id for p in passages] == [f"long.txt#{i}" for i in range(len(passages))]
    for passage in passages:
        assert len(tokenizer.encode(passage.text, add_special_tokens=False)) <= 64
    assert "Sentence number 0 " in passages[0].text
    assert "Sentence number 59 " in passages[-1].text
    # without a tokenizer words are counted; without max_tokens a document is one passage
    assert len(load_corpus(tmp_path, max_tokens=64)) > 1
    assert len(load_corpus(tmp_path)) == 1


def test_chunk_overlap_must_be_smaller_than_max_tokens(tmp_path):
    write(tmp_path / "a.txt", SENTENCES)
    with pytest.raises(CorpusError, match="chunk_overlap"):
        load_corpus(tmp_path, max_tokens=32, chunk_overlap=32)


def test_beir_corpus_file_and_folder(tmp_path):
    rows = [{"_id": "d1", "title": "Cells", "text": "Cells divide."},
            {"_id": "d2", "title": "", "text": "No title here."},
            {"_id": "d3", "title": "Only a title", "text": ""}]
    corpus = write_beir(tmp_path / "beir" / "corpus.jsonl", rows)
    expected = [Passage("d1", "Cells\nCells divide."), Passage("d2", "No title here."),
                Passage("d3", "Only a title")]
    assert load_corpus(corpus) == expected
    assert load_corpus(tmp_path / "beir") == expected
    # BEIR documents are never split: qrels name whole documents
    assert load_corpus(corpus, max_tokens=8) == expected


def test_missing_path_is_an_error_that_says_what_to_pass(tmp_path):
    with pytest.raises(CorpusError, match="does not exist.*folder of documents"):
        load_corpus(tmp_path / "nowhere")


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no documents found"):
        load_corpus(tmp_path / "empty")
    write(tmp_path / "blank" / "a.txt", "   \n\n ")
    with pytest.raises(CorpusError, match="no passages"):
        load_corpus(tmp_path / "blank")
    write(tmp_path / "corpus.jsonl", "\n")
    with pytest.raises(CorpusError, match="no passages"):
        load_corpus(tmp_path / "corpus.jsonl")


def test_binary_file_of_unknown_type_is_an_error_naming_the_file_and_the_fix(tmp_path):
    write(tmp_path / "a.txt", "Fine text.")
    write(tmp_path / "blob.bin", b"\x00\x01\x02binary")
    with pytest.raises(CorpusError, match=r"blob\.bin.*binary.*exclude=\['\*\.bin'\]"):
        load_corpus(tmp_path)
    assert [p.id for p in load_corpus(tmp_path, exclude=["*.bin"])] == ["a.txt#0"]


def test_images_have_no_text_reader(tmp_path):
    write(tmp_path / "photo.png", b"\x89PNG\r\n\x1a\n")
    with pytest.raises(CorpusError, match=r"no reader turns \.png files into text"):
        load_corpus(tmp_path)


def test_text_that_is_not_utf8_is_an_error_that_leaves_out_that_file_only(tmp_path):
    """Issue 22.10: the fix offered was --exclude '*.txt', every text file."""
    write(tmp_path / "latin.txt", "caf\xe9 au lait".encode("latin-1"))
    write(tmp_path / "fine.txt", "Fine text.")
    with pytest.raises(CorpusError, match=r"latin\.txt' is not UTF-8 text \(byte 0xe9 at "
                       r"position 3\).*--exclude 'latin\.txt'"):
        load_corpus(tmp_path)
    assert [p.id for p in load_corpus(tmp_path, exclude=["latin.txt"])] == ["fine.txt#0"]


def test_a_symbolic_link_loop_is_named_as_such(tmp_path):
    """Issue 22.10: a link loop was called a permissions problem."""
    write(tmp_path / "a.txt", "Fine text.")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    with pytest.raises(CorpusError, match=r"loop1'?: it is a symbolic link that loops back on "
                       r"itself.*--exclude 'loop1'") as error:
        load_corpus(tmp_path)
    assert "permission" not in str(error.value)


def test_a_folder_of_empty_files_says_so(tmp_path):
    """Issue 22.10: it said "No files found"."""
    write(tmp_path / "docs" / "a.txt", "")
    write(tmp_path / "docs" / "sub" / "b.md", "")
    with pytest.raises(CorpusError, match=r"the 2 files under .* are all empty \(a\.txt, "
                       r"sub/b\.md\)"):
        load_corpus(tmp_path / "docs")


@pytest.mark.slow
def test_corrupt_pdf_is_an_error(tmp_path):
    write(tmp_path / "broken.pdf", b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(CorpusError, match=r"broken\.pdf"):
        load_corpus(tmp_path)


def test_duplicate_ids_are_an_error(tmp_path):
    rows = [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}, {"_id": "d1", "text": "x"}]
    with pytest.raises(CorpusError, match="1 duplicate passage ids.*'d1'"):
        load_corpus(write_beir(tmp_path / "corpus.jsonl", rows))


def test_malformed_beir_lines_are_errors_with_line_numbers(tmp_path):
    bad_json = write(tmp_path / "a" / "corpus.jsonl", '{"_id": "1", "text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:2 is not valid JSON"):
        load_corpus(bad_json)
    no_id = write_beir(tmp_path / "b" / "corpus.jsonl", [{"title": "t", "text": "x"}])
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:1 has no '_id'"):
        load_corpus(no_id)
