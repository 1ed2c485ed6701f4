"""Would exported inference index faster? ONNX Runtime against torch on the student's encoder.

    pip install onnxruntime
    python benchmarks/probes/onnx_encoder.py --student runs/kfold-minilm/students/minilm-fold0 \\
        --output benchmarks/results/onnx-encoder-cpu.json

The student's backbone is exported to ONNX (fp32, dynamic batch and length) and run by ONNX
Runtime, plain and dynamically quantised to int8; PMA pools its token states in torch, as the
student does. On ``--passages`` SciFact passages, tokenised once by the student (the same
batches for every engine), each engine's encoding of all of them is timed, the engines in turn
``--repeats`` times (medians), beside torch in fp32 and in the student's dtype (bf16 where the
CPU has it). Quality: the cosine of each engine's passage vectors with torch fp32's, and how
many of each claim's top 10 passages (over the encoded passages) stay the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/


def export(student, path: Path, sample: dict[str, torch.Tensor]) -> None:
    """The backbone as ONNX: input ids and mask in, last hidden states out."""

    class Body(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids, attention_mask):
            return self.backbone(input_ids=input_ids,
                                 attention_mask=attention_mask).last_hidden_state

    axes = {0: "batch", 1: "tokens"}
    torch.onnx.export(Body(student.backbone).float().eval(),
                      (sample["input_ids"], sample["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["states"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "states": axes},
                      opset_version=17, dynamo=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--claims", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from bench_inference import load_passages
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from llama_index_d2llm import D2LLMStudent

    passages, claims = load_passages(args.passages)
    claims = claims[:args.claims]
    fast = D2LLMStudent.from_pretrained(args.student, dtype="auto")
    exact = D2LLMStudent.from_pretrained(args.student, dtype="float32")
    batches = [exact.tokenize(passages[s:s + args.batch_size], "passage")
               for s in range(0, len(passages), args.batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        plain, int8 = Path(folder) / "body.onnx", Path(folder) / "body-int8.onnx"
        export(exact, plain, batches[0])
        quantize_dynamic(str(plain), str(int8), weight_type=QuantType.QInt8)
        for name, path in (("onnxruntime fp32", plain), ("onnxruntime int8", int8)):
            sessions[name] = ort.InferenceSession(str(path), options,
                                                  providers=["CPUExecutionProvider"])

    def torch_engine(student):
        def encode() -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat([student.embed(b) for b in batches])
        return encode

    def onnx_engine(session):
        def encode() -> torch.Tensor:
            out = []
            for b in batches:
                feed = {k: b[k].numpy() for k in ("input_ids", "attention_mask")}
                states = torch.from_numpy(session.run(None, feed)[0])
                with torch.inference_mode():
                    out.append(exact.pool(states, b["attention_mask"]))
            return torch.cat(out)
        return encode

    engines = {"torch fp32": torch_engine(exact),
               f"torch {str(fast.backbone_dtype).removeprefix('torch.')}": torch_engine(fast),
               **{name: onnx_engine(s) for name, s in sessions.items()}}
    vectors = {name: fn() for name, fn in engines.items()}  # warm-up, and the vectors compared
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, fn in engines.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    queries = exact.encode(claims, kind="query")
    reference = (queries @ vectors["torch fp32"].T).topk(10).indices
    result = {"student": exact.name, "passages": len(passages), "real_tokens": tokens,
              "threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
              "command": "python benchmarks/probes/onnx_encoder.py " + " ".join(argv or []),
              "engines": {}}
    base = statistics.median(times["torch fp32"])
    for name, vecs in vectors.items():
        seconds = statistics.median(times[name])
        top = (queries @ vecs.T).topk(10).indices
        overlap = statistics.fmean(len(set(a.tolist()) & set(b.tolist())) / 10
                                   for a, b in zip(top, reference, strict=True))
        result["engines"][name] = {
            "seconds": round(seconds, 3), "passages_per_s": round(len(passages) / seconds, 1),
            "speed_vs_torch_fp32": round(base / seconds, 2),
            "min_cosine_vs_fp32": round(float((vecs * vectors["torch fp32"]).sum(-1).min()), 5),
            "top10_overlap_vs_fp32": round(overlap, 3)}
        print(name, result["engines"][name], flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
