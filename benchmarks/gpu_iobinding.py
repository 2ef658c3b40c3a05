"""The cuda target's fp32 and fp16 artifacts on a real GPU, with the outputs copied back to the host
per run (what `edgeq build --target cuda` measures: numpy in, numpy out) and with I/O binding
(inputs and outputs left on the GPU, as an app that feeds another GPU stage runs them), beside
PyTorch eager on the same architecture, same shapes (BertModel from the model's config.json,
random weights: speed does not depend on their values; sdpa attention).

At batch 256 x 128 tokens the fp32 output alone is 50 MB: copied to the host every run, it is a
large share of a GPU run's time, and PyTorch eager, whose output stays on the GPU, is not timed
with it. I/O binding is the like-for-like comparison.

Run where onnxruntime-gpu and torch with CUDA are importable, with the artifacts and inputs in one
folder (default /tmp/parts): model.fp32.onnx, model.fp16.onnx, in_b1.npz, in_b32.npz,
in_b256.npz, config.json. Writes gpu_iobinding.json to $OUT (or the current folder).

    python benchmarks/gpu_iobinding.py /tmp/parts

Status: written on 2026-12-04 and checked only for syntax and on CPU pieces; not yet run on a GPU
(the session that wrote it was lent none). No numbers from it are in the README.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def p50(fn, warmup: int, runs: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def ort_rows(d: Path, batches, runs) -> dict:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* pip packages, as bench_runner does
        ort.preload_dlls()
    out = {}
    for name in ("fp32", "fp16"):
        so = ort.SessionOptions()
        sess = ort.InferenceSession(str(d / f"model.{name}.onnx"), so, providers=["CUDAExecutionProvider"])
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            return {"error": f"CUDA EP did not load: {sess.get_providers()}"}
        for b in batches:
            feeds = dict(np.load(d / f"in_b{b}.npz"))
            feeds = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
            host = p50(lambda: sess.run(None, feeds), 10, runs, lambda: None)
            io = sess.io_binding()
            for k, v in feeds.items():
                io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
            for o in sess.get_outputs():
                io.bind_output(o.name, "cuda", 0)
            bound = p50(lambda: sess.run_with_iobinding(io), 10, runs, io.synchronize_outputs)
            out[f"ort-{name}/b{b}"] = {"host_copies_ms": host, "iobinding_ms": bound}
            print(f"ORT CUDA {name} batch {b}: numpy in/out {host:.2f} ms, I/O binding {bound:.2f} ms", flush=True)
    return out


def torch_rows(d: Path, batches, runs) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig.from_dict({**json.loads((d / "config.json").read_text()), "attn_implementation": "sdpa"})
    out = {}
    for dtype in (torch.float32, torch.float16):
        model = BertModel(cfg, add_pooling_layer=False).eval().to("cuda", dtype)
        for b in batches:
            feeds = {k: torch.from_numpy(v).cuda() for k, v in np.load(d / f"in_b{b}.npz").items()}
            with torch.inference_mode():
                ms = p50(lambda: model(**feeds), 10, runs, torch.cuda.synchronize)
            key = "fp16" if dtype == torch.float16 else "fp32"
            out[f"torch-{key}/b{b}"] = {"eager_ms": ms}
            print(f"PyTorch eager {key} batch {b}: {ms:.2f} ms", flush=True)
    return out


def main() -> None:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/parts")
    batches, runs = (1, 32, 256), int(os.environ.get("RUNS", "100"))
    import onnxruntime as ort
    import torch

    res = {"onnxruntime": ort.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(res, flush=True)
    res.update(ort_rows(d, batches, runs))
    res.update(torch_rows(d, batches, runs))
    for b in batches:
        r = {k: res.get(f"{k}/b{b}", {}) for k in ("ort-fp32", "ort-fp16", "torch-fp16")}
        if r["ort-fp16"] and r["ort-fp32"] and r["torch-fp16"]:
            print(f"batch {b}: ORT fp16 vs ORT fp32 {r['ort-fp32']['host_copies_ms'] / r['ort-fp16']['host_copies_ms']:.2f}x "
                  f"(numpy), {r['ort-fp32']['iobinding_ms'] / r['ort-fp16']['iobinding_ms']:.2f}x (I/O binding); "
                  f"ORT fp16 I/O binding vs PyTorch eager fp16 "
                  f"{r['torch-fp16']['eager_ms'] / r['ort-fp16']['iobinding_ms']:.2f}x", flush=True)
    Path(os.environ.get("OUT", "."), "gpu_iobinding.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
