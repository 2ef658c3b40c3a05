"""fp32 vs fp16 of the cuda target on a real GPU, through edgeq's own benchmark path (measure).

Run on a machine with onnxruntime-gpu and edgeq importable, with the cuda target's artifacts and
batch-1/32/256 inputs in one folder (default /tmp/parts):

    edgeq build --target cuda            # here: model.fp32.onnx, model.fp16.onnx, work/bench_inputs.npz
    python benchmarks/gpu_bench.py       # there (OUT=<dir for the JSON>)

Results of 2026-11-23 on an H100 (onnxruntime-gpu 1.31.1, CUDA 13): benchmarks/results/cuda_h100_minilm.json
"""
import json, os, sys, time
from pathlib import Path
import onnxruntime as ort
from edgeq.measure import measure
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers(), flush=True)
d = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/parts")
models = [d / "model.fp32.onnx", d / "model.fp16.onnx"]
out = {}
for ep in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
    for b, runs in ((1, 300), (32, 200), (256, 60)):
        t = time.time()
        r = measure(models, d / f"in_b{b}.npz", ep, 0, 20, runs)
        out[f"{ep}/b{b}"] = r
        if isinstance(r, str):
            print(ep, b, r, flush=True)
            break
        print(ep, "batch", b, [(m.name, x.get("latency_p50_ms"), x.get("latency_p90_ms"), x.get("peak_rss_mb"),
                                 (x.get("partition") or {}).get("coverage"), x.get("error")) for m, x in zip(models, r)],
              f"fp16 speedup {r[0]['latency_p50_ms'] / r[1]['latency_p50_ms']:.2f}x" if 'latency_p50_ms' in r[1] else "",
              f"({time.time() - t:.0f}s)", flush=True)
# CPU EP on this Xeon, 2 threads, batch 1 (for x86_64-vnni context)
r = measure(models[:1], d / "in_b1.npz", "CPUExecutionProvider", 2, 10, 50, partition=False)
out["CPU/b1/t2"] = r
print("CPU 2 threads fp32 b1", r[0].get("latency_p50_ms"), flush=True)
Path(os.environ.get("OUT", "."), "gpu_bench.json").write_text(json.dumps(out, indent=1))
