"""The wheel installs the trainer as llama_index_d2llm.trainer, never as a bare `trainer`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("llama_index_d2llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert "trainer" not in top_level
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
    for module in ("student/model.py", "student/pma.py", "student/iem.py", "embedding.py",
                   "postprocessor.py", "retriever.py", "trainer/cli.py", "trainer/teacher.py",
                   "trainer/losses/__init__.py"):
        assert f"llama_index_d2llm/{module}" in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "d2llm-rag = llama_index_d2llm.trainer.cli:main" in text


def test_importing_the_package_is_light():
    """`import llama_index_d2llm` must not pull in torch or llama-index (lazy exports)."""
    code = ("import sys, llama_index_d2llm; "
            "print(sorted(m for m in ('torch', 'llama_index.core', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"
