"""Where a training step's time goes: frozen heads vs LoRA on the top blocks vs full LoRA.

    python benchmarks/bench_training.py                      # the offline Gemma 3 270M, CPU
    python benchmarks/bench_training.py --random-weights --device cuda   # a GPU, no weights

For each mode, one optimizer step's forward + backward over ``--texts`` texts of
``--tokens`` tokens, as the trainer runs it:
  * ``frozen``: PMA + IEM on cached final states (the backbone never runs);
  * ``top-K``: LoRA on the top K blocks, run on cached states of the blocks below;
  * ``full``: LoRA on every block, the whole backbone forward and backward (gradient
    checkpointing on, as the trainer does).
Plus the one-off cost per text of caching the states (a forward without gradients). Medians
of ``--repeats`` runs after a warm-up; ratios against ``full`` in the same process. Writes
JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import clock  # noqa: E402


def build_student(args, lora_layers: list[int] | None, lora: bool):
    from llama_index_d2llm.student import D2LLMStudent, LoraSettings

    settings = LoraSettings(layers=lora_layers) if lora else None
    if not args.random_weights:
        return D2LLMStudent.from_backbone(args.backbone, lora=settings, device=args.device,
                                          dtype=args.dtype, seed=0,
                                          backbone_layers=args.backbone_layers)
    # the real shape from its config, random weights (speed does not depend on weights)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from llama_index_d2llm.student import backbone as bb
    from llama_index_d2llm.student.model import D2LLMConfig, wrap_lora

    path = bb.resolve_backbone(args.backbone)
    device = bb.resolve_device(args.device)
    dtype = bb.resolve_dtype(args.dtype, device)
    body = AutoModel.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    body = bb.truncate_layers(body, args.backbone_layers)
    config = D2LLMConfig(hidden_size=body.config.hidden_size, lora=settings)
    if settings is not None:
        body = wrap_lora(body, settings)
    return D2LLMStudent(config, body, AutoTokenizer.from_pretrained(path), device, dtype)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--backbone-layers", type=int, default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--top", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from llama_index_d2llm.student.backbone import decoder_layers, layer_slice

    result: dict = {"command": "python benchmarks/bench_training.py " + " ".join(argv or
                                                                                 sys.argv[1:]),
                    "texts": args.texts, "tokens": args.tokens, "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "modes": {}}
    student = build_student(args, None, lora=True)
    blocks = len(decoder_layers(student.body))
    embedding = student.body.get_input_embeddings().weight
    params = sum(p.numel() for p in student.body.parameters() if p is not embedding)
    result.update(device=str(student.device), dtype=str(student.backbone_dtype), blocks=blocks,
                  non_embedding_params=params)
    vocab = student.body.config.vocab_size
    ids = torch.randint(10, min(vocab, 30000), (args.texts, args.tokens), device=student.device)
    mask = torch.ones_like(ids)

    def step(module_forward):
        def run():
            vectors = student.pool(module_forward(), mask)
            loss = student.iem(vectors[:1], vectors[1:]).sum() + vectors.sum()
            loss.backward()
            student.zero_grad(set_to_none=True)
        return run

    student.backbone.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    result["modes"]["full"] = {"seconds": timed(step(lambda: student.body(
        input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()),
        args.repeats)}
    del student
    for top in args.top:
        if not 0 < top < blocks:
            continue
        student = build_student(args, list(range(blocks - top, blocks)), lora=True)
        student.train()
        with torch.no_grad():
            cached = layer_slice(student.body, 0, blocks - top, False)(
                input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        upper = layer_slice(student.body, blocks - top, blocks, True)
        result["modes"][f"top-{top}"] = {"seconds": timed(step(lambda u=upper, c=cached: u(
            inputs_embeds=c, attention_mask=mask).last_hidden_state.float()), args.repeats)}
        del student
    student = build_student(args, None, lora=False)
    # caching: one forward of the whole frozen backbone without gradients
    with torch.inference_mode():
        seconds = timed(lambda: student.body(input_ids=ids, attention_mask=mask,
                                             use_cache=False), args.repeats)
    result["modes"]["cache_forward"] = {"seconds": seconds}
    student.train()
    states = torch.randn(args.texts, args.tokens, student.dimension, device=student.device)
    result["modes"]["frozen"] = {"seconds": timed(step(lambda: states), args.repeats)}
    full = result["modes"]["full"]["seconds"]
    for name, mode in result["modes"].items():
        mode["ms_per_text"] = 1000 * mode["seconds"] / args.texts
        mode["vs_full"] = mode["seconds"] / full
        print(f"{name:14s} {mode['seconds']:8.3f} s/step  {mode['ms_per_text']:8.1f} ms/text  "
              f"{mode['vs_full']:.3f}x full", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
