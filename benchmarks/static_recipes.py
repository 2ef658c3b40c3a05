"""Why naive static int8 collapses on a transformer, and what the default recipe changes.

Quantizes the fp32 artifact of a finished build with several static recipes (same calibration
data, same held-out text) and prints cosine vs fp32 and the latency ratio, measured in one run.
With --per-node it also quantizes one MatMul at a time to locate the damage.

    .venv/bin/edgeq build                      # makes artifacts/all-MiniLM-L6-v2/x86_64
    .venv/bin/python benchmarks/static_recipes.py artifacts/all-MiniLM-L6-v2/x86_64 [--per-node]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data
from transformers import AutoTokenizer

from edgeq.calib import TextFeeds, default_calibration_path, default_eval_path, read_texts
from edgeq.measure import measure
from edgeq.pipeline.calibrate import RangeCollector, tensors_to_calibrate
from edgeq.metrics import pooled
from edgeq.pipeline.ops.static_plan import nodes_kept_float

EX = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}


def ranges(model_path: Path, feeds, op_types, method: str, percentile: float = 99.999):
    model = onnx.load(str(model_path))
    names = tensors_to_calibrate(model, set(op_types))
    for n in names:
        model.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    c = RangeCollector(method, percentile=percentile)
    for f in feeds:
        for n, v in zip(names, sess.run(names, f.feeds)):
            c.add(n, v)
    return c.result()


def embed(path: Path, samples) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([pooled(sess.run(None, f)[0], m) for f, m in samples])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir", type=Path)
    ap.add_argument("--per-node", action="store_true", help="also quantize one MatMul at a time")
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    b = args.build_dir
    fp32 = b / "model.fp32.onnx"
    if not fp32.is_file():
        sys.exit(f"no model.fp32.onnx in {b}: run `edgeq build` first")
    tok = AutoTokenizer.from_pretrained(str(b / "tokenizer"))
    inputs = [i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input]
    tf = TextFeeds(tok, inputs)
    calib = list(tf.batches(read_texts(default_calibration_path(), limit=args.calib_samples), 16))
    held_out = [tf([t]) for t in read_texts(default_eval_path(), what="eval")]
    ref = embed(fp32, held_out)
    model = onnx.load(str(fp32), load_external_data=False)
    after_gelu = [k["node"] for k in nodes_kept_float(model, {"MatMul"}, {"Gelu", "BiasGelu", "FastGelu"})]
    all_ops = ["MatMul", "Add", "Mul", "Gather", "EmbedLayerNormalization", "Softmax", "Transpose", "Reshape",
               "Attention", "LayerNormalization", "Concat", "Where"]
    base = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options=EX)
    recipes = [
        ("every op ORT can quantize, MinMax", all_ops, "minmax", {}, []),
        ("MatMuls only, MinMax", ["MatMul"], "minmax", {}, []),
        ("MatMuls only, Percentile 99.999", ["MatMul"], "percentile", {}, []),
        ("MatMuls only, Entropy", ["MatMul"], "entropy", {}, []),
        ("MatMuls except after GELU, MinMax (default)", ["MatMul"], "minmax", {}, after_gelu),
    ]
    if args.per_node:
        for n in (x.name for x in model.graph.node if x.op_type == "MatMul"):
            recipes.append((f"only {n}", ["MatMul"], "minmax", {"nodes_to_quantize": [n]}, []))
    rows, cache = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (label, ops, method, kw, exclude) in enumerate(recipes):
            key = (tuple(ops), method)
            if key not in cache:
                cache[key] = Path(tmp) / f"ranges{len(cache)}.json"
                save_tensors_data(ranges(fp32, calib, ops, method), cache[key])
            out = Path(tmp) / f"r{i}.onnx"
            quantize_static(str(fp32), str(out), None, calibration_cache_path=str(cache[key]),
                            calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax"}.get(method, method.capitalize())),
                            op_types_to_quantize=ops, nodes_to_exclude=exclude, **base, **kw)
            c = cosine(ref, embed(out, held_out))
            rows.append({"recipe": label, "cosine": float(c.mean()), "cosine_min": float(c.min())})
            paths.append(out)
            print(f"  {label}: cosine {c.mean():.4f}", file=sys.stderr)
        if not args.per_node:  # latency of the recipes vs fp32, interleaved in one process
            lat = measure([fp32, *paths], b / "work" / "bench_inputs.npz", "CPUExecutionProvider", 0, 10, 100)
            for r, m in zip(rows, lat[1:]):
                r["speedup_vs_fp32"] = round(lat[0]["latency_p50_ms"] / m["latency_p50_ms"], 3)
    width = max(len(r["recipe"]) for r in rows)
    print(f"{'static recipe':{width}s}  cosine  worst   speedup")
    for r in rows:
        sp = f"{r['speedup_vs_fp32']:.2f}x" if "speedup_vs_fp32" in r else "-"
        print(f"{r['recipe']:{width}s}  {r['cosine']:.4f}  {r['cosine_min']:.4f}  {sp:>7s}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
