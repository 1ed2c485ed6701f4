"""How long a user's distillation takes, stage by stage, from empty caches.

    python benchmarks/distill_time.py --work runs/distill-time \\
        --recipe 'readme-cpu=--max-passage-length 128 --num-negatives 3' \\
        --recipe 'judgements-only=--max-passage-length 128 --num-negatives 3 --teacher none'

Each ``--recipe NAME=OPTIONS`` runs ``d2llm-rag distill`` as a user would on the shared SciFact
claims (``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``: 809 claims, 5,183
passages) with OPTIONS and nothing else, in a fresh work directory (its teacher scores and
token states are computed again; the converted offline model and the machine's dtype probe
stay cached in ``~/.cache``, as on a user's second run). Recorded per recipe: the wall time
of the whole command, the stages the distiller timed (``training_summary.json``), the dev
ranking it printed, and the exact command. JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def relative(argument: str) -> str:
    """A path argument relative to the working directory, as a user would type it."""
    return os.path.relpath(argument) if os.path.isabs(argument) else argument


def run_recipe(name: str, options: str, data: Path, work: Path) -> dict:
    """One distillation from an empty work directory; its times and dev figures."""
    output, work_dir = work / name / "student", work / name / "work"
    for path in (output, work_dir):
        shutil.rmtree(path, ignore_errors=True)
    command = ["d2llm-rag", "distill", "--corpus", str(data / "corpus.jsonl"),
               "--queries", str(data / "queries.jsonl"),
               "--qrels", str(data / "qrels" / "train.tsv"), "--output", str(output),
               "--work-dir", str(work_dir), "--no-progress", *shlex.split(options)]
    print("$", shlex.join(command), flush=True)
    log = work / name / "distill.log"
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "llama_index_d2llm.trainer.cli", *command[1:]],
                       check=True, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    summary = json.loads((output / "training_summary.json").read_text())
    dev = [line.strip() for line in log.read_text().splitlines()
           if line.strip().startswith(("dense ", "hybrid "))]
    return {"recipe": name, "options": options, "command": shlex.join(map(relative, command)),
            "seconds": round(seconds, 1),
            "stages": {key: round(value, 1) for key, value in summary["timings"].items()},
            "data": summary.get("data", {}), "dev_ranking": dev}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/distill-time"))
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--recipe", action="append", required=True, metavar="NAME=OPTIONS")
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/distill-time-cpu.json"))
    args = parser.parse_args(argv)

    previous = json.loads(args.output.read_text()) if args.output.exists() else {"runs": []}
    runs = {run["recipe"]: run for run in previous["runs"]}
    for recipe in args.recipe:
        name, _, options = recipe.partition("=")
        (args.work / name).mkdir(parents=True, exist_ok=True)
        runs[name] = run_recipe(name, options, args.data.resolve(), args.work.resolve())
        print(json.dumps(runs[name], indent=1), flush=True)
        result = {"about": "d2llm-rag distill from an empty work directory on the shared "
                           "SciFact claims; each recipe's wall time and its stages",
                  "runs": list(runs.values())}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
