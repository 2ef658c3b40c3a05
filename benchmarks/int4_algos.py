"""onnxruntime's weight-only int4 algorithms side by side on a causal LM build's fp32 artifact: RTN
(symmetric and asymmetric), HQQ, k-quant and GPTQ through `MatMulNBitsQuantizer`, MatMul weights
only, blocks of --block-size. Each quantized model's perplexity and top-1 next-token agreement with
fp32 on the bundled held-out text (edgeq.causal_lm.evaluate, as the evaluate stage measures), its
size and its quantization time, MatMul weights only (the LM head too, no embeddings: the build's
artifacts keep the head at 8 bits and quantize the embeddings, see benchmarks/lm_methods.py). What it
is for: onnxruntime's GPTQ ("gptq-ort") beside edgeq's own GPTQ and AWQ (pipeline/ops/weight_only.py),
which is why edgeq does not use ORT's.

    .venv/bin/edgeq build path/to/SmolLM2-135M-Instruct.Q4_1.gguf --mode int4 --out /tmp/lm
    .venv/bin/python benchmarks/int4_algos.py /tmp/lm/SmolLM2-135M-Instruct.Q4_1/x86_64 [--algos rtn,hqq]

GPTQ runs the model on --calib-samples calibration texts (each a prompt on an empty cache).
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

ALGOS = ("rtn", "rtn-asym", "hqq", "kquant", "gptq-ort", "gptq", "gptq-asym", "awq", "awq-asym")
OWN = ("gptq", "gptq-asym", "awq", "awq-asym")  # edgeq.pipeline.ops.weight_only


def main() -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from transformers import AutoTokenizer

    from edgeq import causal_lm
    from edgeq.calib import default_calibration_path, default_eval_path, read_texts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build_dir", type=Path, help="a finished causal-LM build (model.fp32.onnx, tokenizer/)")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    tok = AutoTokenizer.from_pretrained(str(a.build_dir / "tokenizer"))

    def rows(path, n):
        out = []
        for t in read_texts(path, limit=n, what="data"):
            ids = tok(t, truncation=True, max_length=a.max_length, return_tensors="np")["input_ids"].astype(np.int64)
            if ids.shape[1] >= 2:
                out.append(ids)
        return out

    ev, cal = rows(default_eval_path(), a.eval_samples), rows(default_calibration_path(), a.calib_samples)
    src = onnx.load(str(a.build_dir / "model.fp32.onnx"))
    inputs = {i.name: i for i in src.graph.input}

    class Reader(CalibrationDataReader):
        """A prompt per calibration text, on an empty key/value cache."""

        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(cal):
                return None
            ids = cal[self.i]
            self.i += 1
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "position_ids" in inputs:
                feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            for name, vi in inputs.items():
                if name.startswith("past_key_values"):
                    dims = [d.dim_value if d.dim_value else 0 for d in vi.type.tensor_type.shape.dim]
                    feeds[name] = np.zeros([1, dims[1], 0, dims[3]], np.float32)
            return feeds

        def __deepcopy__(self, memo):  # the quantizer deep-copies its reader before each pass
            return Reader()

    bs = a.block_size
    configs = {
        "rtn": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=bs, is_symmetric=True, accuracy_level=4),
        "rtn-asym": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=bs, is_symmetric=False, accuracy_level=4),
        "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=bs, bits=4),
        "kquant": lambda: mnq.KQuantWeightOnlyQuantConfig(),
        "gptq-ort": lambda: mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=128),
    }
    work = Path(tempfile.mkdtemp(prefix="edgeq-int4-"))
    paths, built = {"fp32": a.build_dir / "model.fp32.onnx"}, {}
    for name in a.algos.split(","):
        if name in OWN:
            from edgeq.pipeline.ops.weight_only import quantize_calibrated

            t = time.perf_counter()
            p = work / f"{name}.onnx"
            info = quantize_calibrated(a.build_dir / "model.fp32.onnx", p, name.split("-")[0], cal, bs,
                                       symmetric=not name.endswith("-asym"), accuracy_level=4)
            paths[name] = p
            built[name] = (time.perf_counter() - t, p.stat().st_size / 1e6)
            print(name, info, flush=True)
            continue
        if name not in configs:
            raise SystemExit(f"unknown algorithm {name!r} (choose from {', '.join(ALGOS)})")
        t = time.perf_counter()
        try:
            q = mnq.MatMulNBitsQuantizer(copy.deepcopy(src), bits=4, block_size=bs, is_symmetric=True,
                                         accuracy_level=4, algo_config=configs[name]())
            q.process()
            p = work / f"{name}.onnx"
            q.model.save_model_to_file(str(p), use_external_data_format=False)
        except Exception as e:  # an algorithm this onnxruntime cannot run on the model: its row says so
            built[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        paths[name] = p
        built[name] = (time.perf_counter() - t, p.stat().st_size / 1e6)
    res = causal_lm.evaluate(paths, ev)
    ref = res["fp32"]["perplexity"]
    print(f"{a.build_dir}: {len(ev)} held-out texts, block {bs}, {len(cal)} calibration texts for GPTQ")
    print(f"{'algorithm':10s} {'size MB':>8s} {'seconds':>8s} {'perplexity':>11s} {'change':>8s} {'top-1 agree':>11s}")
    print(f"{'fp32':10s} {paths['fp32'].stat().st_size / 1e6:8.0f} {'-':>8s} {ref:11.3f} {'':>8s} {1:11.3f}")
    for name, b in built.items():
        if isinstance(b, str):
            print(f"{name:10s} {b}")
            continue
        r = res[name]
        print(f"{name:10s} {b[1]:8.0f} {b[0]:8.0f} {r['perplexity']:11.3f} {r['perplexity'] / ref - 1:+8.1%} "
              f"{r['top1_agreement']:11.3f}")


if __name__ == "__main__":
    main()
