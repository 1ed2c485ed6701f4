"""One page of the benchmark results: held-out quality against query cost, and distillation time.

    python benchmarks/report.py --results benchmarks/results --output benchmarks/results/report

Reads the JSON files the other benchmarks wrote into ``--results`` and writes, under
``--output``, ``quality-vs-cost.png`` (SciFact 5-fold nDCG@10 against the median ms a query
costs, log scale), ``distill-time.png`` (each distillation recipe's stages, stacked) and
``report.md`` (both images, every plotted number with the file it came from and the command
recorded there). Nothing is re-measured here. A file that is not there yet (or a cost that
was never timed) leaves its points out and is listed under "Not measured", so the page can be
regenerated whenever a benchmark lands. Plain json + matplotlib; no torch, no model.

    python benchmarks/report.py --docs          # README's and docs/benchmarks.md's tables
    python benchmarks/report.py --check-docs    # exit 1 if they no longer match the results
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from figures import command, stale_pages  # noqa: E402  (beside this script)

FUSION, DEFAULT, MINILM = ("scifact-kfold-fusion-cpu.json", "scifact-kfold-easy0-cpu.json",
                           "scifact-kfold-minilm-cpu.json")
LATENCY, MINILM_LATENCY = "retriever-latency-cpu.json", "retriever-latency-minilm-cpu.json"
TEACHER, DISTILL = "teacher-rerank-cpu.json", "distill-time-cpu.json"
FIRST_STAGE = ("encode_query", "qdrant_search", "build_nodes")  # a retrieve without rescoring
#: (label, key under the variant's results, retriever-latency section, stages summed for cost)
STUDENT_POINTS = [
    ("Qdrant BM25", "qdrant_bm25", "bm25", ("retrieve",)),
    ("student dense", "dense", "dense", FIRST_STAGE),
    ("dense rescored", "dense_rescored", "dense", ("retrieve",)),
    ("hybrid RRF", "hybrid", "hybrid", FIRST_STAGE),
    ("hybrid + IEM alone", "hybrid_iem_alone", "hybrid", ("retrieve",)),
    ("hybrid rescored", "hybrid_rescored", "hybrid", ("retrieve",)),
]
STYLE = {"bm25": ("tab:gray", "BM25"), "student": ("tab:blue", "Gemma student, judgements only"),
         "teacher": ("tab:red", "Gemma 3 270M teacher reranking BM25's top (its own claims)"),
         "minilm": ("tab:green", "MiniLM student, judgements only")}


@dataclass
class Point:
    label: str
    ndcg: float
    err: float | None  # std over folds, or the teacher's std error over claims
    cost_ms: float | None  # None: quality only, in the table but not on the plot
    queries: str
    source: str
    group: str


class Results:
    """The results folder; remembers the files read (for their commands) and, with what
    they would have given, those asked for that were not there."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.used, self.missing = folder, {}, {}

    def get(self, name: str, gives: str) -> dict | None:
        if name not in self.used and (self.folder / name).is_file():
            self.used[name] = json.loads((self.folder / name).read_text())
        elif name not in self.used:
            self.missing.setdefault(name, gives)
        return self.used.get(name)


def variant(data: dict) -> tuple[str, dict]:
    """The k-fold file's variant: its single (or first) key under ``results``."""
    return next(iter(data["results"].items()))


def held_out(data: dict, name: str) -> str:
    """How many claims the folds held out in all (the per-student counts summed)."""
    counts = [s.get("queries", 0) for key, s in data.get("per_student", {}).items()
              if key.startswith(f"{name}-fold")]
    folds = data["results"][name].get("folds", len(counts))
    return f"{sum(counts)} ({folds} folds)" if sum(counts) else f"{folds} folds"


def stage_ms(latency: dict | None, section: str, stages: tuple[str, ...]) -> float | None:
    """Sum of the stages' medians in a retriever-latency section; None where one is missing."""
    parts = (latency or {}).get(section, {})
    if not all(isinstance(parts.get(s), dict) and "median_ms" in parts[s] for s in stages):
        return None
    return sum(parts[s]["median_ms"] for s in stages)


def quality_points(res: Results, notes: list[str]) -> list[Point]:
    """Every quality figure, with its cost where one was timed for that student kind."""
    points: list[Point] = []
    fusion = res.get(FUSION, "the judgements-only student's points")
    latency = res.get(LATENCY, "the student's and BM25's query costs")
    if fusion is not None:
        name, scores = variant(fusion)
        for label, key, section, parts in STUDENT_POINTS:
            cost = stage_ms(latency, section, parts)
            if cost is None and latency is not None:
                notes.append(f"{label}'s query cost: no `{section}` "
                             f"{' + '.join(parts)} in `{LATENCY}`; in the table only")
            points.append(Point(label, scores[key]["ndcg@10"]["mean"],
                                scores[key]["ndcg@10"]["std"], cost, held_out(fusion, name),
                                FUSION, "bm25" if "bm25" in key else "student"))
    teacher = res.get(TEACHER, "the teacher reranking BM25's candidates")
    if teacher is not None:
        claims, depth = teacher.get("claims"), teacher.get("depth")
        if "bm25" in teacher:
            points.append(Point(f"BM25 order of the teacher's top-{depth}",
                                teacher["bm25"]["ndcg@10"], None, None, str(claims),
                                TEACHER, "bm25"))
        for run in teacher.get("runs", []):
            points.append(Point(f"teacher, max_length {run['max_length']}",
                                run["ndcg@10"], run.get("ndcg@10_std_err"),
                                run.get("ms_per_query"), str(claims), TEACHER, "teacher"))
    minilm_cost = res.get(MINILM_LATENCY, "MiniLM's SciFact query cost: MiniLM in the table only")
    for file, prefix, latency_of in ((MINILM, "MiniLM", minilm_cost),
                                     (DEFAULT, "default recipe", None)):
        data = res.get(file, f"the {prefix} student's rows")
        if data is None:
            continue
        name, scores = variant(data)
        for label, key, section, parts in (STUDENT_POINTS[1], STUDENT_POINTS[-1]):
            points.append(Point(f"{prefix} {label.removeprefix('student ')}",
                                scores[key]["ndcg@10"]["mean"], scores[key]["ndcg@10"]["std"],
                                stage_ms(latency_of, section, parts), held_out(data, name),
                                file, "minilm" if file == MINILM else "student"))
    return points


def other_costs(res: Results) -> list[list[str]]:
    """Costs timed elsewhere, with no quality beside them: [what, median, source file]."""
    rows: list[list[str]] = []
    for path in sorted(res.folder.glob("index-scale-*.json")):
        data = res.get(path.name, "")
        who = data.get("encoding", {}).get("student", path.stem).removeprefix("D2LLM student on ")
        if "passages_per_s" in data.get("encoding", {}):
            rows.append([f"embed, {who}", f"{data['encoding']['passages_per_s']:.1f} passages/s",
                         f"`{path.name}`"])
        rows += [[f"retrieve over {size['size']:,} synthetic passages, {who}",
                  f"dense {size['dense_retrieve_ms']['median']:,.0f} ms, hybrid "
                  f"{size['hybrid_retrieve_ms']['median']:,.0f} ms", f"`{path.name}`"]
                 for size in data.get("sizes", [])]
    query = (res.get("inference-cpu.json", "D2LLM against a cross-encoder") or {}).get("query", {})
    rows += [[f"{what}, top {query.get('top_k')} of {query.get('collection_size')}",
              f"{1000 * query[key]:,.0f} ms", "`inference-cpu.json`"]
             for key, what in (("d2llm_query_median_s", "D2LLM query"),
                               ("cross_encoder_median_s", "the teacher as a cross-encoder"))
             if key in query]
    modes = (res.get("training-step-cpu.json", "training step times") or {}).get("modes", {})
    rows += [[f"training step, {mode}", f"{m['ms_per_text']:,.0f} ms/text",
              "`training-step-cpu.json`"] for mode, m in modes.items()]
    return rows


def pyplot():
    """matplotlib, headless; imported here so that importing this module does not need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(points: list[Point], path: Path) -> None:
    """nDCG@10 against log query cost, each point labelled where its label hides nothing."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for p in points:
        ax.errorbar(p.cost_ms, p.ndcg, yerr=p.err, fmt="o", capsize=3, markersize=6,
                    color=STYLE[p.group][0], label=STYLE[p.group][1])
    ax.set_xscale("log")
    costs = [p.cost_ms for p in points]
    wide = max(costs) / min(costs) > 100  # over two decades, 3 and 30 crowd their neighbours
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if wide else (1, 2, 3, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("median query cost, ms (log scale; 2-core CPU, sources in report.md)")
    ax.set_ylabel("nDCG@10 on SciFact (k-fold mean ± std; teacher ± std err)")
    ax.set_title("Retrieval quality against query cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlim(min(costs) / 2.5, max(costs) * 5)  # room right of the costliest for its label
    ax.margins(y=0.12)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    ax.legend(handles.values(), handles.keys(), loc="lower right", fontsize=8)
    fig.tight_layout()
    place_labels(ax, points)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def place_labels(ax, points: list[Point]) -> None:
    """Each label at the offset around its point that stays inside the axes and overlaps the
    fewest markers, error bars, labels placed before it and the legend (costs close together
    are common: dense and rescored dense differ by one rescoring pass)."""
    from matplotlib.transforms import Bbox

    renderer, frame = ax.figure.canvas.get_renderer(), ax.bbox.padded(-2)
    taken = [ax.get_legend().get_window_extent(renderer)]
    for p in points:  # each marker and its error bar
        (x, low), (_, high) = ax.transData.transform([(p.cost_ms, p.ndcg - (p.err or 0)),
                                                      (p.cost_ms, p.ndcg + (p.err or 0))])
        taken += [Bbox([[x - 6, (low + high) / 2 - 6], [x + 6, (low + high) / 2 + 6]]),
                  Bbox([[x - 4, low], [x + 4, high]])]
    for p in points:
        tries = []
        for dx, dy in ((8, 4), (-8, 4), (8, -4), (-8, -4), (8, 22), (-8, 22), (8, -22), (-8, -22)):
            label = ax.annotate(f"{p.label}\n{p.ndcg:.3f}, {p.cost_ms:,.0f} ms",
                                (p.cost_ms, p.ndcg), xytext=(dx, dy), fontsize=8,
                                textcoords="offset points", ha="left" if dx > 0 else "right",
                                va="bottom" if dy > 0 else "top")
            box = label.get_window_extent(renderer)
            outside = not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1))
            tries.append((outside, sum(box.overlaps(other) for other in taken), len(tries),
                          label, box))
            if tries[-1][:2] == (False, 0):
                break
        *_, best, box = min(tries)  # the first of the least bad
        for *_, label, _ in tries:
            if label is not best:
                label.remove()
        taken.append(box)


def stages(runs: list[dict]) -> list[str]:
    """The ``*_s`` stage keys over all runs, in the order they first appear."""
    return list(dict.fromkeys(k for r in runs for k in r.get("stages", {}) if k.endswith("_s")))


def plot_distill(runs: list[dict], path: Path) -> None:
    """One stacked horizontal bar per recipe: its stages, in minutes."""
    plt, keys = pyplot(), stages(runs)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.8 * len(runs)))
    labels = [r["recipe"] for r in runs]
    left = [0.0] * len(runs)
    for key in keys:
        widths = [r.get("stages", {}).get(key, 0.0) / 60 for r in runs]
        ax.barh(labels, widths, left=left, label=key.removesuffix("_s"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, run in enumerate(runs):
        ax.text(left[y], y, f" {run.get('seconds', left[y] * 60) / 60:.1f} min", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("minutes")
    ax.set_title("Distillation time by stage")
    ax.margins(x=0.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False,
              ncols=min(len(keys), 6))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines, then a blank one."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(points: list[Point], runs: list[dict], res: Results, images: list[str],
             notes: list[str]) -> str:
    """The page: images, the numbers behind them, their sources, what is still missing."""
    folder = res.folder.resolve()
    shown = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
    lines = ["# Benchmark report", "", f"Written by `python benchmarks/report.py` from "
             f"`{shown}`.", "", *(f"![{name}]({name})" for name in images), "",
             "## Quality against query cost", ""]
    lines += table(["Point", "nDCG@10", "±", "ms/query", "Claims", "Source"], [
        [p.label, f"{p.ndcg:.3f}", "—" if p.err is None else f"{p.err:.3f}",
         "—" if p.cost_ms is None else f"{p.cost_ms:,.0f}", p.queries, f"`{p.source}`"]
        for p in points])
    lines += ["± is the std over folds (the teacher's: the std error over its claims). "
              f"Costs are `{LATENCY}` (MiniLM: `{MINILM_LATENCY}`) medians (first stages: "
              f"{' + '.join(FIRST_STAGE)}; the others: a whole `retrieve`) and the teacher's "
              "`ms_per_query`. A dash: quality "
              "only, not plotted. The teacher is scored on its own claims: compare it with the "
              "BM25 row from its file, not with the k-fold rows.", ""]
    if "about" in res.used.get(LATENCY, {}):
        lines += [f"About the costs (`{LATENCY}`): {res.used[LATENCY]['about']}", ""]
    if runs:
        keys = stages(runs)
        lines += ["## Distillation time (minutes)", ""] + table(
            ["Recipe", "total", *keys, "Command"],
            [[r["recipe"], f"{r.get('seconds', 0) / 60:.1f}",
              *(f"{r['stages'][k] / 60:.1f}" if k in r.get("stages", {}) else "—" for k in keys),
              command(r)] for r in runs])
    costs = other_costs(res)
    if costs:
        lines += ["## Other measured costs", ""] + table(["What", "Median", "Source"], costs)
    sources = [[f"`{name}`", command(data)] for name, data in sorted(res.used.items())]
    lines += ["## Sources", ""] + table(["File", "Command"], sources)
    lines += ["## Not measured", ""]
    missing = [f"`{name}`: {gives}" for name, gives in res.missing.items()]
    lines += [f"- {item}" for item in [*missing, *notes]] or ["- nothing"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "report")
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument("--docs", action="store_true",
                       help="rewrite the generated tables of README.md and docs/benchmarks.md "
                            "(benchmarks/figures.py) from the results, and nothing else")
    pages.add_argument("--check-docs", action="store_true",
                       help="exit 1 when those tables differ from what the results give")
    args = parser.parse_args(argv)
    if args.docs or args.check_docs:
        stale = stale_pages(args.results, write=args.docs)
        verb = "rewrote" if args.docs else "out of date (run `python benchmarks/report.py --docs`)"
        for name in stale:
            print(f"{name}: {verb}")
        if args.check_docs and stale:
            raise SystemExit(1)
        return [HERE.parent / name for name in stale]

    res, notes = Results(args.results), []
    points = quality_points(res, notes)
    runs = (res.get(DISTILL, "the distillation time plot") or {}).get("runs", [])
    args.output.mkdir(parents=True, exist_ok=True)
    images = []
    plotted = [p for p in points if p.cost_ms is not None]
    if plotted:
        plot_quality(plotted, args.output / "quality-vs-cost.png")
        images.append("quality-vs-cost.png")
    if runs:
        plot_distill(runs, args.output / "distill-time.png")
        images.append("distill-time.png")
    (args.output / "report.md").write_text(markdown(points, runs, res, images, notes))
    written = [args.output / name for name in [*images, "report.md"]]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
