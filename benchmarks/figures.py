"""The figures README.md and docs/benchmarks.md quote, each read from a result file.

``python benchmarks/report.py --docs`` rewrites the generated tables (between
``<!-- figures: NAME -->`` and ``<!-- /figures -->``) from these lists and the JSON files under
``benchmarks/results/``; ``--check-docs`` fails when a page no longer says what they give. To
add a figure, add a ``Row`` (or a result file cited in docs/benchmarks.md) and run ``--docs``.
Plain json and git; no torch, no model.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: a step into a JSON value: a key, a list index, or (key, value) picking the list item with it
Step = str | int | tuple[str, str]


@dataclass(frozen=True)
class Figure:
    """One number of a result file: ``path`` walks the JSON; ``scale`` converts units."""

    file: str
    path: tuple[Step, ...]
    fmt: str = "{:.3f}"
    scale: float = 1.0
    spread: tuple[Step, ...] | None = None  # the ± (std over folds), beside the value

    def value(self, results: Path = RESULTS) -> float:
        return self.scale * walk(read(results / self.file), self.path)

    def text(self, results: Path = RESULTS) -> str:
        shown = self.fmt.format(self.value(results))
        if self.spread is not None:
            err = self.scale * walk(read(results / self.file), self.spread)
            shown += " ± " + self.fmt.format(err)
        return shown


@dataclass(frozen=True)
class Row:
    """A line of the headline table: what a user compares, and its measured figures (None:
    not measured yet, shown as ``pending``)."""

    what: str
    quality: Figure | None
    cost: Figure | None
    setup: str
    pending: str = "being measured (issue 24)"


def _kfold(variant: str, key: str) -> Figure:
    file = {"fusion": "scifact-kfold-fusion-cpu.json", "minilm": "scifact-kfold-minilm-cpu.json"}
    base = ("results", variant, key, "ndcg@10")
    return Figure(file[variant], (*base, "mean"), spread=(*base, "std"))


def _latency(section: str) -> Figure:
    """A median ``retrieve`` on the embedded store (Qdrant Edge), MiniLM, over SciFact."""
    if section == "bm25":
        return Figure("retriever-latency-minilm-edge-cpu.json", ("bm25", "retrieve", "median_ms"),
                      "{:,.0f}")
    return Figure("hybrid-latency-minilm-edge-cpu.json", ("retrieve", section, "median_ms"),
                  "{:,.0f}")


MINILM_DISTILL = Figure("distill-time-cpu.json", ("runs", ("recipe", "minilm-judgements-only"),
                                                  "seconds"), "{:.1f}", scale=1 / 60)

#: README.md's table: the alternatives a user would consider, quality against cost. A row
#: without figures shows ``pending``; to fill one (issue 24: documents-only distillation on the
#: quickstart's questions), give it its Figures, then run ``--docs``. A
#: result file's date is its last commit's, so commit the JSON before running ``--docs``.
HEADLINE = [
    Row("BM25 (Qdrant's sparse vectors, no model)", _kfold("fusion", "qdrant_bm25"),
        _latency("bm25"), "none"),
    Row("untrained encoder (all-MiniLM-L6-v2 as it ships), vector + keyword search ³",
        Figure("docs-only-untrained-minilm-cpu.json",
               ("scifact", "untrained", "hybrid_default", "ndcg@10")),
        _latency("hybrid"), "none"),
    Row("the teacher (Gemma 3 270M) reordering BM25's top 10 ¹",
        Figure("teacher-rerank-cpu.json", ("runs", ("max_length", "128"), "ndcg@10")),
        Figure("teacher-rerank-cpu.json", ("runs", ("max_length", "128"), "ms_per_query"),
               "{:,.0f}"), "none (an LLM per query and passage)"),
    Row("**this package**, vector search (MiniLM student)", _kfold("minilm", "dense_rescored"),
        _latency("dense"), "distil: {distill} min ²"),
    Row("**this package**, vector + keyword search, reordered (MiniLM student)",
        _kfold("minilm", "hybrid_rescored"), _latency("hybrid"), "distil: {distill} min ²"),
    Row("this package, distilled from your documents alone (the quickstart's own questions)",
        None, None, ""),
]
HEADLINE_NOTES = (
    "nDCG@10: SciFact's 809 claims, each searched by a student distilled on the other four "
    "folds of five (mean ± std over folds); ms: median `retrieve` over {queries} claims on a "
    "2-core CPU with the embedded Qdrant (Qdrant Edge, one torch thread). "
    "¹ On {claims} claims (BM25 ranks those at {teacher_bm25}); its cost is scoring "
    "{depth} passages per query. ² From SciFact's judged claims (`--teacher none`), on a "
    "2-core CPU. ³ Nothing trained, so all 809 claims are held out; candidates reordered by "
    "cosine + 0.5 BM25 (the default).")
NOTE_FIGURES = {
    "queries": Figure("hybrid-latency-minilm-edge-cpu.json", ("queries_timed",), "{:.0f}"),
    "claims": Figure("teacher-rerank-cpu.json", ("claims",), "{:.0f}"),
    "depth": Figure("teacher-rerank-cpu.json", ("depth",), "{:.0f}"),
    "teacher_bm25": Figure("teacher-rerank-cpu.json", ("bm25", "ndcg@10")),
}


def command(data: dict) -> str:
    """The command a result file recorded (``command`` or ``commands``), as markdown."""
    found = data.get("command") or data.get("commands") or []
    if not found and any("command" in run for run in data.get("runs", [])):
        return "each run's, in its table"
    if isinstance(found, dict):  # named steps
        found = [f"{name}: {step}" for name, step in found.items()]
    found = "; ".join([found] if isinstance(found, str) else found)
    return f"`{found}`".replace("|", "\\|") if found else "—"  # | would end a table cell


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def walk(data: object, path: tuple[Step, ...]) -> float:
    """The value at ``path``; a (key, value) step picks the list item whose key has that value."""
    for step in path:
        if isinstance(step, tuple):
            key, wanted = step
            data = next(item for item in data if str(item.get(key)) == wanted)
        else:
            data = data[step]
    return float(data)


def dated(file: str, repo: Path = REPO) -> str:
    """The date of the last commit that changed a result file ('uncommitted' if none)."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%as", "--", f"benchmarks/results/{file}"],
            cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return out.strip() or "uncommitted"


def headline_table(results: Path = RESULTS) -> list[str]:
    """The headline table's markdown lines, then its notes."""
    distill = MINILM_DISTILL.text(results)
    lines = ["| | nDCG@10, SciFact held out | ms per query | one-time cost | result files |",
             "|---|---|---|---|---|"]
    for row in HEADLINE:
        if row.quality is None:
            lines.append(f"| {row.what} | {row.pending} | | {row.setup} | |")
            continue
        files = dict.fromkeys(f.file for f in (row.quality, row.cost) if f is not None)
        if "{distill}" in row.setup:
            files[MINILM_DISTILL.file] = None
        cost = row.cost.text(results) if row.cost else "—"
        links = ", ".join(f"[`{f}`](benchmarks/results/{f})" for f in files)
        lines.append(f"| {row.what} | {row.quality.text(results)} | {cost} | "
                     f"{row.setup.format(distill=distill)} | {links} |")
    notes = HEADLINE_NOTES.format(**{k: f.text(results) for k, f in NOTE_FIGURES.items()})
    return [*lines, "", notes]


RESULT_NAME = re.compile(r"`?([\w.-]+\.json)`?")


def sources_table(page: str, results: Path = RESULTS) -> list[str]:
    """Every result file a page names (outside the generated tables), with its date and the
    command it recorded."""
    names = sorted({m for m in RESULT_NAME.findall(strip_generated(page))
                    if (results / m).is_file()})
    rows = ["| result file | last changed | command |", "|---|---|---|"]
    for name in names:
        rows.append(f"| [`{name}`](../benchmarks/results/{name}) | {dated(name)} | "
                    f"{command(read(results / name))} |")
    return rows


BLOCK = re.compile(r"(<!-- figures: (\w+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def strip_generated(page: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + m.group(4), page)


def render(page: str, results: Path = RESULTS, links_from: str = "") -> str:
    """The page with each generated block rewritten: ``headline`` or ``sources``."""

    def block(match: re.Match) -> str:
        name = match.group(2)
        if name == "headline":
            lines = headline_table(results)
            if links_from:
                lines = [line.replace("](benchmarks/", f"]({links_from}benchmarks/")
                         for line in lines]
        elif name == "sources":
            lines = sources_table(page, results)
        else:
            raise ValueError(f"unknown generated block {name!r}")
        return match.group(1) + "\n".join(lines) + "\n" + match.group(4)

    return BLOCK.sub(block, page)


#: the pages with generated blocks, and how their links reach the repository root
PAGES = {"README.md": "", "docs/benchmarks.md": "../"}


def stale_pages(results: Path = RESULTS, repo: Path = REPO, write: bool = False) -> list[str]:
    """The pages whose generated blocks differ from the results (rewritten when ``write``)."""
    stale = []
    for name, links_from in PAGES.items():
        path = repo / name
        page = path.read_text()
        fresh = render(page, results, links_from)
        if fresh != page:
            stale.append(name)
            if write:
                path.write_text(fresh)
    return stale
