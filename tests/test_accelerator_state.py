"""One process can train on one device, then on another (issue 25): Accelerate keeps its
state process-wide and refused a CPU run after a CUDA one. These run on the CPU by faking the
device an earlier run left in Accelerate's shared state."""

from __future__ import annotations

import pytest
import torch

from llama_index_d2llm.trainer.config import DistillConfig
from llama_index_d2llm.trainer.optimization import make_accelerator


def config(device: str | None) -> DistillConfig:
    return DistillConfig(corpus="c.jsonl", queries="q.jsonl", qrels="q.tsv", device=device)


@pytest.fixture(autouse=True)
def clean_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pretend_last_run_was_on(device: str) -> None:
    from accelerate.state import PartialState

    PartialState._shared_state["device"] = torch.device(device)


def test_a_cpu_run_after_a_cuda_run_gets_the_cpu():
    make_accelerator(config("cpu"))
    pretend_last_run_was_on("cuda")
    # Accelerate itself raises "AcceleratorState has already been initialized ... cpu=True"
    assert make_accelerator(config("cpu")).device.type == "cpu"


def test_a_default_run_after_a_cpu_run_gets_the_best_device():
    make_accelerator(config("cpu"))
    pretend_last_run_was_on("meta")  # any other device than the one wanted now
    wanted = "cuda" if torch.cuda.is_available() else "cpu"
    assert make_accelerator(config(None)).device.type == wanted


def test_the_same_device_keeps_the_state():
    from accelerate.state import PartialState

    make_accelerator(config("cpu"))
    before = id(PartialState._shared_state.get("device"))
    make_accelerator(config("cpu"))
    assert id(PartialState._shared_state.get("device")) == before
