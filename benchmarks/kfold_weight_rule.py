"""Which IEM weight each k-fold student's dev ranking chooses, and what it gives held out.

    python benchmarks/kfold_weight_rule.py --work runs/kfold --variant labels

For every student of the variant that ``scifact_kfold.py`` has distilled and evaluated, the
distiller's dev ranking is rebuilt exactly as in its run (same split, same dev corpus, the
student's final weights, its cached token states) and measured with the current
``trainer/dev_ranking.py``; the weight it chooses is looked up in the held-out curve that
``kfold_eval.py`` recorded (nDCG@10 of the held-out fold at every weight). Compares the
weight the student recorded (the rule it was distilled with) with the current rule.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kfold"))
    parser.add_argument("--variant", default="labels")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    from llama_index_d2llm import D2LLMStudent
    from llama_index_d2llm.trainer.config import DistillConfig
    from llama_index_d2llm.trainer.dev_ranking import DevRanking
    from llama_index_d2llm.trainer.distill import prepare_data, resolve_config
    from llama_index_d2llm.trainer.token_states import TokenStateCache

    work = args.work.resolve()
    rows = {}
    for evaluation in sorted((work / "eval").glob(f"{args.variant}-fold*.json")):
        name = evaluation.stem
        held_out = json.loads(evaluation.read_text())
        curve = held_out.get("ndcg@10_by_iem_weight")
        if curve is None:
            continue
        directory = work / "students" / name
        config = resolve_config(DistillConfig.from_json_file(directory / "distill_config.json"))
        config.show_progress = False
        data = prepare_data(config)
        student = D2LLMStudent.from_pretrained(directory, dtype=args.dtype)
        cache = TokenStateCache(student, config.work_path / "token_states",
                                show_progress=False)
        ranking = DevRanking.build(data.dev_items, data.texts, config.seed)
        metrics = ranking.evaluate(student, cache.vectors)
        row = {"dev": metrics, "recorded": held_out["iem_weights"]}
        for stage in ("dense", "hybrid"):
            chosen = metrics[f"iem_weight_{stage}"]
            row[stage] = {"first_stage": curve[stage]["0.0"],
                          "recorded_weight": held_out["iem_weights"][stage],
                          "recorded": curve[stage][f"{held_out['iem_weights'][stage]:.1f}"],
                          "rule_weight": chosen, "rule": curve[stage][f"{chosen:.1f}"]}
        rows[name] = row
        print(name, {s: row[s] for s in ("dense", "hybrid")}, flush=True)
    summary = {}
    for stage in ("dense", "hybrid"):
        summary[stage] = {key: statistics.fmean(r[stage][key] for r in rows.values())
                          for key in ("first_stage", "recorded", "rule")}
    result = {"variant": args.variant, "folds": len(rows), "mean_held_out_ndcg@10": summary,
              "per_student": rows}
    (work / f"weight-rule-{args.variant}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
