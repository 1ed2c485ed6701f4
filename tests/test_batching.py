"""Batch sizes from free memory and length buckets (issue 25), checked on the CPU: the CUDA
sizing is fed a free-memory figure, as torch.cuda.mem_get_info would give it."""

from __future__ import annotations

import pytest
import torch

from llama_index_d2llm.student import batching
from llama_index_d2llm.student.batching import (
    auto_batch_size,
    in_input_order,
    length_batches,
)

GIB = 1 << 30


def test_the_cpu_keeps_its_fixed_size():
    assert auto_batch_size("cpu", 512, bytes_per_token=20_000, cpu_size=8) == 8


@pytest.mark.parametrize("seq_len", [1, 16, 128, 512, 4096])
def test_cuda_sizes_stay_within_memory_tokens_and_count(seq_len):
    per_token = 20_000
    size = auto_batch_size("cuda", seq_len, bytes_per_token=per_token, cpu_size=8,
                           free_bytes=100 * GIB)
    assert 1 <= size <= batching.MAX_BATCH_SIZE
    assert size * seq_len <= max(seq_len, batching.MAX_BATCH_TOKENS)
    assert size * seq_len * per_token <= batching.MEMORY_FRACTION * 100 * GIB


def test_less_memory_or_longer_sequences_give_smaller_batches():
    def size(seq_len: int, free: int) -> int:
        return auto_batch_size("cuda", seq_len, bytes_per_token=20_000, cpu_size=8,
                               free_bytes=free)

    assert size(512, GIB // 4) < size(512, 2 * GIB)
    assert size(512, GIB // 4) > size(2048, GIB // 4)
    assert size(512, 1024) == 1  # never zero, even with no memory to spare


def test_length_batches_cover_every_index_once_longest_first():
    lengths = [5, 300, 17, 300, 2, 90, 91, 64]
    batches = length_batches(lengths, lambda width: 3 if width > 64 else 2)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert [len(b) for b in batches] == [3, 3, 2]  # widths 300, 90, then 17 and below
    assert length_batches(lengths, 16) == [flat]


def test_results_come_back_in_input_order():
    lengths = [3, 9, 1, 7, 5]
    batches = length_batches(lengths, 2)
    results = [torch.tensor([[float(lengths[i])] for i in batch]) for batch in batches]
    assert in_input_order(batches, results).squeeze(1).tolist() == [3, 9, 1, 7, 5]


@pytest.fixture(scope="module")
def student(tiny_student_dir, device):
    from llama_index_d2llm import D2LLMStudent

    return D2LLMStudent.from_pretrained(tiny_student_dir, dtype="float32", device=device)


TEXTS = ["water", "the history of music and the city", "a dog runs in the park . " * 6,
         "cell", "quantum physics and chemistry of the sun and the moon", "gene"]


def test_encode_sizes_batches_from_memory_and_keeps_input_order(student, monkeypatch):
    one_by_one = student.encode(TEXTS, batch_size=1)
    torch.testing.assert_close(student.encode(TEXTS), one_by_one, atol=1e-5, rtol=1e-5)
    widths = []

    def free_memory(device):  # the tiny model's activations: ~2 short texts a batch
        return 12 * 1024

    monkeypatch.setattr(batching, "free_memory", free_memory)
    original = batching.auto_batch_size

    def recording(*args, **kwargs):
        size = original(*args, **kwargs)
        widths.append((args[1], size))
        return size

    monkeypatch.setattr("llama_index_d2llm.student.model.auto_batch_size", recording)
    torch.testing.assert_close(student.encode(TEXTS), one_by_one, atol=1e-5, rtol=1e-5)
    assert len(widths) > 1 and widths[0][1] <= widths[-1][1]  # longest first, smallest batch


def test_teacher_auto_batches_from_memory_and_scores_the_same(tiny_backbone, device,
                                                             monkeypatch):
    from llama_index_d2llm.trainer.teacher import CPU_BATCH_SIZE, Teacher

    teacher = Teacher.from_pretrained(tiny_backbone, dtype="float32", device=device,
                                      mode="query-likelihood")
    assert teacher.batch_size is None  # automatic: generation then uses GENERATION_BATCH_SIZE
    queries = [f"{q} {n}" for n in ("one", "two", "three")
               for q in ("the cat sat", "which gene in cancer cells", "a dog", "water energy")]
    passages = ["on the mat", "protein cell gene " * 5, "runs in the park", "sun"] * 3
    single = Teacher.from_pretrained(tiny_backbone, dtype="float32", device=device,
                                     mode="query-likelihood", batch_size=1)
    expected = single.score(queries, passages).logits
    if device.type == "cpu":
        assert teacher._batch_size_for(100) == CPU_BATCH_SIZE
    sizes = []
    monkeypatch.setattr(batching, "free_memory", lambda device: 2 * 1024 * 1024)
    forward = teacher._forward
    monkeypatch.setattr(teacher, "_forward", lambda batch: (sizes.append(len(batch)),
                                                            forward(batch))[1])
    torch.testing.assert_close(teacher.score(queries, passages).logits, expected,
                               atol=1e-4, rtol=1e-4)
    assert sum(sizes) == len(queries) and len(set(sizes)) > 1 and sizes[0] < max(sizes)


def test_generation_keeps_fixed_batches_when_scoring_batches_are_automatic():
    """Generated text depends on its padding batch: an automatic (None) teacher batch size
    must not make generation follow the free memory."""
    from llama_index_d2llm.trainer.corpus import Passage
    from llama_index_d2llm.trainer.queries import GENERATION_BATCH_SIZE, generate_queries

    class Writer:
        fingerprint, max_length = "writer", 256

        def __init__(self, batch_size):
            self.batch_size, self.sizes = batch_size, []

        def count_tokens(self, text):
            return len(text.split())

        def truncate(self, text, max_tokens):
            return text

        def generate(self, prompts, **kwargs):
            self.sizes.append(len(prompts))
            return [f"which gene {len(self.sizes)} {i}" for i in range(len(prompts))]

    passages = [Passage(f"p{i}", f"the cell and the gene {i}") for i in range(11)]
    auto, set_ = Writer(None), Writer(3)
    generate_queries(passages, auto, show_progress=False)
    generate_queries(passages, set_, show_progress=False)
    assert auto.sizes == [GENERATION_BATCH_SIZE, 11 - GENERATION_BATCH_SIZE]
    assert set_.sizes == [3, 3, 3, 2]
