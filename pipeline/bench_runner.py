"""Measures one ONNX model in a fresh process: session load time, latency distribution, peak RSS.

Standalone on purpose (stdlib, numpy and onnxruntime only, no edgeq import): each artifact runs in
its own process so peak RSS belongs to that artifact alone, and the same file can be copied to a
device and run with the device's own onnxruntime.

usage: python bench_runner.py '{"model": ..., "inputs": ..., "provider": ..., "threads": 2,
                                "warmup": 10, "runs": 100}'
prints one JSON object on stdout.
"""
import json
import resource
import sys
import time


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM from /proc: unlike ru_maxrss, VmHWM starts afresh at exec, so the parent's
    memory does not leak into this process's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field == "VmHWM":  # no /proc (macOS): ru_maxrss is bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
    return float("nan")


def main(argv) -> dict:
    spec = json.loads(argv[1])
    import numpy as np
    import onnxruntime as ort

    with np.load(spec["inputs"]) as z:
        feeds = {k: z[k] for k in z.files}
    rss_before = _status_mb("VmRSS")
    so = ort.SessionOptions()
    if spec.get("threads"):
        so.intra_op_num_threads = int(spec["threads"])
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(spec["model"], so, providers=[spec.get("provider", "CPUExecutionProvider")])
    load_ms = (time.perf_counter() - t0) * 1000
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for _ in range(int(spec.get("warmup", 10))):
        sess.run(None, feeds)
    times = []
    deadline = time.perf_counter() + float(spec.get("max_seconds", 60))
    for _ in range(int(spec.get("runs", 100))):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1000)
        if time.perf_counter() > deadline:
            break
    ts = np.asarray(times)
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    return {
        "provider": sess.get_providers()[0],
        "runs": len(times),
        "load_ms": round(load_ms, 3),
        "latency_mean_ms": round(float(ts.mean()), 4),
        "latency_p50_ms": round(float(np.percentile(ts, 50)), 4),
        "latency_p90_ms": round(float(np.percentile(ts, 90)), 4),
        "latency_p99_ms": round(float(np.percentile(ts, 99)), 4),
        "throughput_per_s": round(batch * 1000 / float(ts.mean()), 3),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "rss_before_load_mb": round(rss_before, 1),
        "onnxruntime": ort.__version__,
    }


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv)))
    except Exception as e:  # the parent turns this into a recorded failure, not a crash
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
        sys.exit(1)
