"""docs/: the generated pages are up to date, and the errors docs/troubleshooting.md quotes are
still what the code says."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: where the quoted messages live: this package, its trainer and examples, and qdrant-client
#: (whose "already accessed" message users meet from their own code)
SOURCES = ("llama_index_d2llm", "trainer", "examples")


def string_literals(files: list[Path]) -> list[str]:
    """Every string constant in these files, f-strings' constant parts included."""
    found = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
    return found


def quoted_messages(page: str) -> list[str]:
    """The ``> `` lines of a page: each a message, ``…`` where it varies."""
    return [line[2:].strip() for line in page.splitlines() if line.startswith("> ")]


def test_troubleshooting_quotes_what_the_code_says() -> None:
    import qdrant_client

    files = [f for name in SOURCES for f in (REPO / name).rglob("*.py")]
    files += list(Path(qdrant_client.__file__).parent.joinpath("local").glob("*.py"))
    literals = string_literals(files)
    quotes = quoted_messages((DOCS / "troubleshooting.md").read_text())
    assert len(quotes) >= 20
    missing = [piece for quote in quotes for piece in quote.split("…")
               if not any(piece.strip() in text for text in literals)]
    assert not missing, f"no longer in the code: {missing}"


def test_quoted_messages_reads_only_quote_lines() -> None:
    page = "text\n> one … two\n>not a quote\n> three\n"
    assert quoted_messages(page) == ["one … two", "three"]


def test_cli_page_is_generated_from_the_parser() -> None:
    result = subprocess.run([sys.executable, str(DOCS / "generate_cli.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = (DOCS / "cli.md").read_text()
    assert "## `d2llm-rag distill`" in page and "--teacher TEACHER" in page


def test_benchmark_tables_match_the_results() -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"),
                             "--check-docs"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    readme = (REPO / "README.md").read_text()
    assert re.search(r"<!-- figures: headline -->\n\| .*\n", readme)
