"""Clocks for the benchmarks that tell the truth on a GPU.

CUDA kernels run asynchronously: ``time.perf_counter()`` right after a call measures the
launch, not the work (issue 25: bench_teacher's and bench_inference's timers read the clock
before the GPU had finished). ``clock()`` waits for the device first.
"""

from __future__ import annotations

import time

import torch


def synchronize() -> None:
    """Wait for every queued CUDA kernel, where CUDA is in use (a no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def clock() -> float:
    """``time.perf_counter()`` once the device is idle: differences are the work's time."""
    synchronize()
    return time.perf_counter()
