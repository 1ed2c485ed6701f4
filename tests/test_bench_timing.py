"""The benchmarks' clock waits for CUDA before it reads the time (issue 25: timers read before
the kernels finished), checked on the CPU with a recorded synchronize."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

TIMING = Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py"


def load_timing():
    spec = importlib.util.spec_from_file_location("bench_timing", TIMING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clock_synchronises_cuda_before_reading_the_time(monkeypatch):
    timing = load_timing()
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("read") or 1.5)
    assert timing.clock() == 1.5
    assert events == ["sync", "read"]


def test_clock_does_not_start_cuda(monkeypatch):
    timing = load_timing()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda *a: (_ for _ in ()).throw(AssertionError("synchronised")))
    first = timing.clock()
    assert timing.clock() >= first


def test_the_benchmarks_time_with_it():
    for name in ("bench_teacher.py", "bench_inference.py", "bench_training.py"):
        text = (TIMING.parent / name).read_text()
        assert "from timing import clock" in text and "perf_counter" not in text, name
