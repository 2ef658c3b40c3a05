"""Calibration memory stays flat as the number of samples grows.

Runs edgeq's calibrate stage (pipeline/calibrate.py) on the fp32 artifact of a finished build with
200 and 2,000 samples, for each calibration method, each in a fresh process, and prints peak RSS
(VmHWM) and time. onnxruntime's own histogram calibrators keep every intermediate output until the
end (memory grows with the sample count; users report 100+ GB); edgeq folds each batch into running
min/max or histograms at once.

    .venv/bin/edgeq build                       # makes artifacts/all-MiniLM-L6-v2/x86_64
    .venv/bin/python benchmarks/calib_memory.py artifacts/all-MiniLM-L6-v2/x86_64 [--json out.json]

The 2,000 samples are the bundled calibration sentences joined in pairs (deterministic), so longer
and more varied than the originals.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_samples(n: int, path: Path) -> None:
    from edgeq.calib import default_calibration_path, read_texts

    base = read_texts(default_calibration_path())
    lines = [f"{base[i % len(base)]} {base[(7 * i + 3) % len(base)]}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def child(build_dir: Path, data: Path, n: int, method: str) -> dict:
    """One calibration in this (fresh) process; returns peak memory and time."""
    from transformers import AutoTokenizer

    from edgeq import targets
    from edgeq.config import Benchmark, BuildConfig, Calibration, Evaluation, Fp16Options, Gates
    from edgeq.core import BuildContext, ModelFacts
    from edgeq.pipeline import calibrate

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "model.fp32.onnx").symlink_to((build_dir / "model.fp32.onnx").resolve())
        import onnx

        inputs = [i.name for i in onnx.load(str(build_dir / "model.fp32.onnx"), load_external_data=False).graph.input]
        cfg = BuildConfig(
            model=str(build_dir / "model.fp32.onnx"), model_kind="onnx", family="encoder", name="bench",
            target="x86_64", target_profile="x86_64", modes=("static",), task="feature-extraction", tokenizer=None,
            max_length=128, max_accuracy_drop=None, budget_metric="cosine", fp16=Fp16Options(True, []),
            calibration=Calibration(path=str(data), method=method, samples=n),
            evaluation=Evaluation(path=str(data), samples=None),
            benchmark=Benchmark(batch_size=1, seq_len=128, runs=1, warmup=0, threads=0),
            gates=Gates(None, None, None), out=str(work / "out"))
        ctx = BuildContext(config=cfg, target=targets.load("x86_64"), build_dir=work, log=lambda m: None,
                           tokenizer=AutoTokenizer.from_pretrained(str(build_dir / "tokenizer")),
                           model=ModelFacts(input_names=inputs))
        before = _status_mb("VmRSS")
        t0 = time.perf_counter()
        result = calibrate.run(ctx)
        return {"samples": n, "method": method, "seconds": round(time.perf_counter() - t0, 2),
                "rss_before_mb": round(before, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
                "batches": result.metrics["batches"], "tensors": result.metrics["tensors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir", type=Path)
    ap.add_argument("--samples", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy", "distribution"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("DATA", "N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.build_dir, Path(args.child[0]), int(args.child[1]), args.child[2])))
        return
    if not (args.build_dir / "model.fp32.onnx").is_file():
        sys.exit(f"no model.fp32.onnx in {args.build_dir}: run `edgeq build` first")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "samples.txt"
        make_samples(max(args.samples), data)
        for method in args.methods:
            for n in args.samples:
                proc = subprocess.run([sys.executable, __file__, str(args.build_dir), "--child", str(data), str(n),
                                       method], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if not line:
                    sys.exit(f"calibration failed: {proc.stderr.strip().splitlines()[-1:]}")
                rows.append(json.loads(line[-1]))
                print(f"  {method} {n}: {rows[-1]['peak_rss_mb']} MB", file=sys.stderr)
    print(f"{'method':12s} {'samples':>7s} {'batches':>7s} {'seconds':>8s} {'RSS before':>10s} {'peak RSS':>9s} "
          f"{'peak vs smallest':>16s}")
    for r in rows:
        first = next(x for x in rows if x["method"] == r["method"])
        print(f"{r['method']:12s} {r['samples']:7d} {r['batches']:7d} {r['seconds']:8.1f} {r['rss_before_mb']:10.0f} "
              f"{r['peak_rss_mb']:9.0f} {r['peak_rss_mb'] / first['peak_rss_mb']:15.3f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
