"""README.md as a newcomer uses it: short, its links resolve, its test command is CI's, and its
commands and Python block run (with tiny random models in place of the offline defaults)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.distill_fixtures import write_beir
from tests.tiny_models import build_tiny_encoder

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SAMPLE = REPO / "examples" / "sample_corpus" / "python_stdlib"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")),
         REPO / "benchmarks" / "probes" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_is_a_five_minute_read() -> None:
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page: Path) -> None:
    """Every relative link names a file or folder of the repository, and every #anchor a
    heading of its page."""
    checked = 0
    for target in (a or b for a, b in LINK.findall(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: no heading for {target}"
        checked += 1
    assert checked, f"{page.name} has no relative link"


def test_the_test_command_is_what_ci_runs() -> None:
    setup = blocks(README.read_text(), "bash")[0].splitlines()
    step = setup.index(next(line for line in setup if line.startswith("# 2.")))
    readme_command = setup[step + 1].split("&&")[-1].strip()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert readme_command == ci[-1] == "python -m pytest"


def test_the_main_job_command_installs_and_runs_the_quickstart() -> None:
    setup = blocks(README.read_text(), "bash")[0]
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && python examples/quickstart.py' \
        in setup
    assert (REPO / "examples" / "quickstart.py").is_file()


def test_readme_chat_commands_parse() -> None:
    from examples.chatbot.__main__ import parser_for

    commands = [shlex.split(line) for block in blocks(README.read_text(), "bash")
                for line in block.splitlines() if line.startswith("python -m examples.chatbot")]
    assert len(commands) == 2
    for command in commands:
        parser_for(command[3]).parse_args(command[4:])


#: Options that shrink the README's distillations to seconds with tiny models.
TINY = ["--max-steps", "2", "--batch-size", "4", "--round-trip-depth", "0",
        "--max-generated-passages", "8", "--pma-heads", "4", "--iem-hidden-size", "16",
        "--dev-fraction", "0", "--no-progress"]


@pytest.fixture()
def tiny_defaults(tiny_gemma_backbone, tmp_path, monkeypatch):
    """The offline Gemma and MiniLM replaced by tiny random models of the same kinds."""
    from llama_index_d2llm.student import backbone

    bert = str(build_tiny_encoder(tmp_path / "tiny-minilm", max_positions=512))
    monkeypatch.setattr(backbone, "default_backbone_path", lambda: Path(tiny_gemma_backbone))
    monkeypatch.setattr(backbone, "shipped_model_path", lambda alias: bert)


def user_folder(folder: Path) -> None:
    """What the README's commands name: ./my_docs, BEIR files, ./beir_dataset."""
    docs = folder / "my_docs"
    docs.mkdir()
    for name in ("csv.md", "subprocess.md", "json.md", "re.md"):
        (docs / name).write_text((SAMPLE / name).read_text())
    beir = write_beir(folder / "beir_dataset", split="test")
    for name in ("corpus.jsonl", "queries.jsonl"):
        (folder / name).write_text((beir / name).read_text())
    (folder / "qrels.tsv").write_text((beir / "qrels" / "test.tsv").read_text())


def test_readme_runs(tiny_defaults, tmp_path, monkeypatch, capsys) -> None:
    """The distil and eval commands, then the Python block, in a user's folder."""
    from llama_index.core import Settings
    from llama_index.core.llms import MockLLM

    from llama_index_d2llm.trainer.cli import main

    text = README.read_text()
    user_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line) for block in blocks(text, "bash")
                for line in block.splitlines() if line.startswith("d2llm-rag ")]
    assert [c[1] for c in commands] == ["distill", "distill", "eval"]
    for command in commands:
        extra = TINY if command[1] == "distill" else ["--no-progress"]
        assert main([*command[1:], *extra]) == 0, command
    assert (tmp_path / "student" / "d2llm_config.json").is_file()

    (code,) = blocks(text, "python")
    monkeypatch.setattr(Settings, "_llm", MockLLM(max_tokens=8))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"^-?\d\.\d{3}  (csv|subprocess|json|re)\.md$", out, re.M), out[-2000:]
