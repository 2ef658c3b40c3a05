"""What it takes for an int8 MiniLM to keep fp32's ranking: 10-recall@10 against fp32 on a retrieval
set, per quantization recipe, beside size and speed measured in one interleaved run.

The build's own artifacts (int8-static, int8-dynamic, int8-qat when built) quantize activations per
tensor, which is what ONNX Runtime's fast int8 kernels take. The other rows quantize the fp32
artifact's MatMuls with block-wise scales: MatMulNBits at 8 bits (onnxruntime.quantization's
MatMulNBitsQuantizer, symmetric), accuracy_level 4, so the activations too are quantized to int8 at
run time per block of the input axis -- activation scales per token and block rather than per
tensor -- with the fused Attention and the embedding tables left float or quantized per tensor by
ORT's dynamic recipe.

    python -m edgeq.calib.gensim_data DATA
    .venv/bin/edgeq build --target x86_64 --mode static --mode dynamic --mode qat \\
        --eval DATA/lee-retrieval.jsonl --no-torch-baseline        # makes artifacts/all-MiniLM-L6-v2/x86_64
    .venv/bin/python benchmarks/retrieval_recipes.py artifacts/all-MiniLM-L6-v2/x86_64 DATA/lee-retrieval.jsonl

Embeds every text of the set one at a time (batch 1, as the evaluate stage does: a dynamic int8
scale depends on what else is in the batch), ranks the corpus by cosine for each query and scores
the ranking against fp32's (edgeq.metrics.retrieval_metrics). Prints a table; writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

from edgeq import targets
from edgeq.calib import read_eval_set
from edgeq.measure import measure
from edgeq.metrics import pooled, retrieval_metrics, row_cosine
from edgeq.pipeline.ops.int4 import _ort_nbits
from edgeq.pipeline.ops.quantizer import quantize_dynamic_recipe


def blockwise(fp32: Path, out: Path, block: int, target: str, per_tensor: tuple[str, ...] = ()) -> Path:
    """MatMulNBits 8-bit (blocks of `block`, accuracy_level 4) on every MatMul; `per_tensor` op types
    (Attention, EmbedLayerNormalization) first get the target's dynamic int8 recipe."""
    src = fp32
    if per_tensor:
        src = out.with_suffix(".dynamic.onnx")
        quantize_dynamic_recipe(fp32, src, replace(targets.load(target).dynamic, op_types=per_tensor))
    _ort_nbits(src, out, 8, block, True, 4)
    return out


def embed(path: Path, tok, texts: list[str], max_length: int) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = []
    for t in texts:
        enc = tok([t], truncation=True, max_length=max_length, return_tensors="np")
        feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        out.append(pooled(sess.run(None, feeds)[0], enc["attention_mask"]))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build_dir", type=Path)
    ap.add_argument("retrieval_set", type=Path)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    b = a.build_dir
    manifest = json.loads((b / "manifest.json").read_text())
    target = manifest["target"]["name"]
    evalset = read_eval_set(a.retrieval_set)
    if evalset.kind != "retrieval":
        sys.exit(f"{a.retrieval_set} is not a retrieval set (query+positive and document lines)")
    tok = AutoTokenizer.from_pretrained(str(b / "tokenizer"))
    rows = {name: b / f"model.{name}.onnx" for name in ("fp32", "int8-static", "int8-dynamic", "int8-qat")
            if (b / f"model.{name}.onnx").is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        fp32 = rows["fp32"]
        rows["blockwise b128, Attention + embeddings per-tensor int8"] = blockwise(
            fp32, t / "b128-pt.onnx", 128, target, ("Attention", "Gather", "EmbedLayerNormalization"))
        rows["blockwise b128, embeddings per-tensor int8"] = blockwise(
            fp32, t / "b128-emb.onnx", 128, target, ("Gather", "EmbedLayerNormalization"))
        rows["blockwise b128, Attention + embeddings float"] = blockwise(fp32, t / "b128.onnx", 128, target)
        rows["blockwise b32, Attention + embeddings float"] = blockwise(fp32, t / "b32.onnx", 32, target)
        emb = {}
        for name, path in rows.items():
            print(f"embedding {len(evalset.texts)} texts: {name}", file=sys.stderr, flush=True)
            emb[name] = embed(path, tok, evalset.texts, a.max_length)
        scores = retrieval_metrics(evalset, emb)
        lat = measure(list(rows.values()), b / "work" / "bench_inputs.npz", "CPUExecutionProvider", 2, 10,
                      a.runs, partition=False)
        if isinstance(lat, str):
            sys.exit(lat)
        sizes = {name: path.stat().st_size for name, path in rows.items()}
    base = lat[0]["latency_p50_ms"]
    table = []
    for (name, _), r in zip(rows.items(), lat):
        s = scores[name]
        table.append({"recipe": name, "size_vs_fp32": sizes[name] / sizes["fp32"],
                      "cosine": float(row_cosine(emb[name], emb["fp32"]).mean()),
                      "recall@1_vs_fp32": s["recall@1_vs_fp32"], "recall@10_vs_fp32": s["recall@10_vs_fp32"],
                      "ndcg@10": s["ndcg@10"], "latency_p50_ms": r["latency_p50_ms"],
                      "speedup": base / r["latency_p50_ms"]})
    print(f"{len(evalset.queries)} queries, {len(evalset.docs)} documents; target {target}; "
          f"{a.runs} interleaved runs, 2 threads, batch 1, {manifest['config']['benchmark']['seq_len']} tokens")
    print("| recipe | size x | cosine | R@1 vs fp32 | R@10 vs fp32 | nDCG@10 | p50 ms | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['recipe']} | {r['size_vs_fp32']:.2f} | {r['cosine']:.4f} | {r['recall@1_vs_fp32']:.3f} | "
              f"{r['recall@10_vs_fp32']:.3f} | {r['ndcg@10']:.3f} | {r['latency_p50_ms']:.2f} | {r['speedup']:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps({"target": target, "machine": manifest.get("run", {}).get("machine"),
                                      "rows": table}, indent=1))


if __name__ == "__main__":
    main()
