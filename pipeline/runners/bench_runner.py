"""Measures ONNX models in a fresh process: session load time, latency distribution, peak RSS.

Standalone on purpose (stdlib, numpy and onnxruntime only, no edgeq import), so the same file can be
copied to a device and run with the device's own onnxruntime.

Two uses, both printing one JSON object on stdout:
  one model   -> load time and peak RSS belong to that model alone (a fresh process each);
  many models -> latency, interleaved: every round runs each model `round_runs` times, so drift of a
                 shared machine (another tenant, frequency changes) falls on every model alike and
                 the ratios between them stay honest.

usage: python bench_runner.py '{"models": [...], "inputs": "x.npz", "provider": "CPUExecutionProvider",
                                "threads": 2, "warmup": 10, "runs": 100, "round_runs": 10}'

"torch": {"dir": HF_DIR, "task": ...} adds PyTorch's dynamic int8 of that model (torch_runtime.py)
as one more model in the interleaved rounds, its result last (host only: it needs torch).
"""
import json
import resource
import sys
import time


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM from /proc. Unlike ru_maxrss, VmHWM starts afresh at exec, so the parent's
    memory does not leak into this process's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field == "VmHWM":  # no /proc (macOS): ru_maxrss is in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
    return float("nan")


def _profile_events(model: str, feeds: dict, provider: str, so_factory, warmup: int, runs: int):
    """ONNX Runtime's own trace of `warmup` + `runs` runs of one session: the events of the last
    `runs` model runs (kernel events inside their time windows) and those runs' durations in us."""
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = so_factory()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(model, so, providers=[provider])
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    start = windows[0][0] if windows else 0
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and e.get("ts", 0) >= start]
    return nodes, [b - a for a, b in windows]


def partition(nodes: list, provider: str) -> dict:
    """Which execution provider runs each node of the graph as ONNX Runtime partitioned it (after
    its graph optimizations), read from a profiled run. `coverage` is the share of nodes the
    requested provider runs itself; the rest fell back (usually to the CPU EP)."""
    placed = {}
    for e in nodes:
        args = e.get("args") or {}
        if "provider" in args:
            placed[e["name"][: -len("_kernel_time")]] = (args["provider"], args.get("op_name", "?"))
    by_provider, fallback_ops = {}, {}
    for prov, op in placed.values():
        by_provider[prov] = by_provider.get(prov, 0) + 1
        if prov != provider:
            fallback_ops[op] = fallback_ops.get(op, 0) + 1
    total = len(placed)
    return {"nodes": total, "by_provider": by_provider,
            "coverage": round(by_provider.get(provider, 0) / total, 4) if total else None,
            "fallback_ops": dict(sorted(fallback_ops.items(), key=lambda kv: -kv[1]))}


def op_profile(nodes: list, run_us: list, top: int = 8) -> dict:
    """Where one run's time goes: kernel time per operator type (and the slowest nodes), averaged
    over the profiled runs, from ONNX Runtime's trace of the graph it actually ran (after its own
    fusions, so the op types are the kernels that ran, e.g. QAttention, not the file's nodes).
    `other_ms` is the run time no kernel accounts for: the executor, memory planning and, with
    threads, the gaps between kernels."""
    runs = max(1, len(run_us))
    ops, per_node = {}, {}
    for e in nodes:
        args = e.get("args") or {}
        op = args.get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        o = ops.setdefault(op, {"op": op, "us": 0.0, "nodes": set(), "provider": args.get("provider")})
        o["us"] += e.get("dur", 0)
        o["nodes"].add(name)
        per_node.setdefault((name, op), 0.0)
        per_node[(name, op)] += e.get("dur", 0)
    run_ms = sum(run_us) / runs / 1000
    kernel_ms = sum(o["us"] for o in ops.values()) / runs / 1000
    rows = [{"op": o["op"], "ms": round(o["us"] / runs / 1000, 4),
             "share": round(o["us"] / runs / 1000 / run_ms, 4) if run_ms else None,
             "nodes": len(o["nodes"]), "provider": o["provider"]}
            for o in sorted(ops.values(), key=lambda o: -o["us"])]
    slow = sorted(per_node.items(), key=lambda kv: -kv[1])[:top]
    return {"runs": len(run_us), "run_ms": round(run_ms, 4), "kernel_ms": round(kernel_ms, 4),
            "other_ms": round(max(0.0, run_ms - kernel_ms), 4), "ops": rows,
            "slowest_nodes": [{"node": n, "op": op, "ms": round(us / runs / 1000, 4)} for (n, op), us in slow]}


def _quantiles(times_ms) -> list:
    """The 0, 5, ..., 100th percentiles of the run times: enough to draw the distribution (box plots in
    `edgeq report`) without storing every run."""
    import numpy as np

    return [round(float(q), 4) for q in np.percentile(np.asarray(times_ms, dtype=float), list(range(0, 101, 5)))]


def main(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    with np.load(spec["inputs"]) as z:
        feeds_all = {k: z[k] for k in z.files}
    rss_before = _status_mb("VmRSS")

    def session_options():
        so = ort.SessionOptions()
        if spec.get("threads"):
            so.intra_op_num_threads = int(spec["threads"])
        so.inter_op_num_threads = 1
        if spec.get("no_spin"):  # off by default: apps run ORT's defaults (measured: no effect on ratios here)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    provider = spec.get("provider", "CPUExecutionProvider")
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") and hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN from the nvidia-* pip packages (as PyTorch installs them), when present
            ort.preload_dlls()
        except Exception:
            pass
    if provider not in ort.get_available_providers():
        return {"unavailable": f"not in this onnxruntime build ({', '.join(ort.get_available_providers())})"}
    sessions, feeds, load_ms = [], [], []
    for m in spec["models"]:
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(m, session_options(), providers=[provider])
        except Exception as e:
            # The provider's fault (e.g. TensorRT listed by the build but its libraries absent) if
            # the CPU EP loads the same model; otherwise the model's, and that is an error.
            if sessions or provider == "CPUExecutionProvider":
                raise
            ort.InferenceSession(m, session_options(), providers=["CPUExecutionProvider"])
            return {"unavailable": f"{provider} failed to create a session: {str(e).splitlines()[0][:300]}"}
        if sess.get_providers()[0] != provider:
            # ORT falls back to the CPU EP silently when a listed provider cannot initialise
            return {"unavailable": f"{provider} could not be initialised (session fell back to "
                                   f"{sess.get_providers()[0]}): missing libraries or device?"}
        load_ms.append((time.perf_counter() - t0) * 1000)
        names = {i.name for i in sess.get_inputs()}
        sessions.append(sess)
        feeds.append({k: v for k, v in feeds_all.items() if k in names})
    if spec.get("new_tokens"):
        out = _generation(spec, sessions, feeds_all, load_ms)
        out["rss_before_load_mb"] = round(rss_before, 1)
        if len(sessions) == 1:
            out["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
        return out
    fns = [(lambda s=sess, f=f: s.run(None, f)) for sess, f in zip(sessions, feeds)]
    providers = [sess.get_providers()[0] for sess in sessions]
    torch_error = None
    if spec.get("torch"):  # the PyTorch baseline, interleaved with the sessions like one of them
        try:
            fn, ms, label = _torch_model(spec["torch"], feeds_all, spec.get("threads"))
            fn()  # a model PyTorch cannot run on these inputs fails here, not in the timed rounds
            fns.append(fn)
            load_ms.append(ms)
            providers.append(label)
        except Exception as e:  # the baseline's failure is recorded; the artifacts are still measured
            torch_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    for fn in fns:
        for _ in range(int(spec.get("warmup", 10))):
            fn()
    runs = int(spec.get("runs", 100))
    per_round = max(1, min(int(spec.get("round_runs", 10)), runs))
    settle = int(spec.get("settle_runs", 2)) if len(fns) > 1 else 0
    times = [[] for _ in fns]
    deadline = time.perf_counter() + float(spec.get("max_seconds", 120))
    while len(times[0]) < runs and time.perf_counter() < deadline:
        for fn, ts in zip(fns, times):
            # Untimed runs after each switch: the previous session's idle worker threads keep
            # spinning for a while and, on a small machine, would be charged to this session.
            for _ in range(settle):
                fn()
            for _ in range(min(per_round, runs - len(ts))):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1000)
    batch = int(next(iter(feeds_all.values())).shape[0]) if feeds_all else 1
    results = []
    for prov, ts, lm in zip(providers, times, load_ms):
        a = np.asarray(ts)
        results.append({
            "provider": prov,
            "runs": len(ts),
            "load_ms": round(lm, 3),
            "latency_mean_ms": round(float(a.mean()), 4),
            "latency_p50_ms": round(float(np.percentile(a, 50)), 4),
            "latency_p90_ms": round(float(np.percentile(a, 90)), 4),
            "latency_p99_ms": round(float(np.percentile(a, 99)), 4),
            "latency_min_ms": round(float(a.min()), 4),
            "latency_quantiles_ms": _quantiles(a),
            "throughput_per_s": round(batch * 1000 / float(a.mean()), 3),
        })
    out = {"results": results, "onnxruntime": ort.__version__, "rss_before_load_mb": round(rss_before, 1),
           **({"torch_error": torch_error} if torch_error else {})}
    if len(sessions) == 1:
        out["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
        if spec.get("partition") or spec.get("profile_runs"):
            prof_runs = int(spec.get("profile_runs") or 1)
            nodes, run_us = _profile_events(spec["models"][0], feeds[0], provider, session_options,
                                            warmup=2 if spec.get("profile_runs") else 0, runs=prof_runs)
            if spec.get("partition"):
                out["partition"] = partition(nodes, provider)
            if spec.get("profile_runs"):
                out["op_profile"] = op_profile(nodes, run_us)
    return out


def _torch_model(spec: dict, feeds_all: dict, threads):
    """(run, load ms, label) of the PyTorch dynamic-int8 baseline (torch_runtime.py, this file's
    sibling) on the same inputs, with torch's intra-op threads set to the sessions' count."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import torch_runtime

    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    model = torch_runtime.load_dynamic_int8(spec["dir"], spec.get("task") or "feature-extraction",
                                            bool(spec.get("trust_remote_code")))
    ms = (time.perf_counter() - t0) * 1000
    run = torch_runtime.forward_fn(model, spec.get("task") or "feature-extraction")
    return (lambda: run(feeds_all)), ms, f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads"


def _generation(spec: dict, sessions, feeds_all: dict, load_ms: list) -> dict:
    """Causal LMs: each run is one greedy generation with the key/value cache -- the prompt
    (`input_ids` of the inputs file) in one prefill call, then `new_tokens` - 1 one-token steps.
    Reports prefill latency and decode speed (the median step), models interleaved run by run."""
    import numpy as np
    import onnxruntime as ort

    import os

    # its sibling, found by path whether this file runs as a script, on a device or is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import lm_runtime

    ids = feeds_all["input_ids"]
    new = int(spec["new_tokens"])
    models = [lm_runtime.KVModel(s) for s in sessions]
    for lm in models:
        for _ in range(max(1, int(spec.get("warmup", 1)))):
            lm.generate(ids, new)
    prefill = [[] for _ in models]
    steps = [[] for _ in models]
    runs = int(spec.get("runs", 5))
    deadline = time.perf_counter() + float(spec.get("max_seconds", 300))
    settle = int(spec.get("settle_runs", 2)) if len(models) > 1 else 0
    while len(prefill[0]) < runs and time.perf_counter() < deadline:
        for i, lm in enumerate(models):
            # untimed prefills after each switch, as for the other models: the previous session's
            # idle threads keep spinning for a while and would slow the first timed run of the next
            # model (measured in the README, "Causal language models")
            for _ in range(settle):
                lm.forward(ids, lm.empty_past(ids.shape[0]), 0)
            _, p, st = lm.generate(ids, new)
            prefill[i].append(p * 1000)
            steps[i].extend(x * 1000 for x in st)
    results = []
    for s, p, st, lm_ms in zip(sessions, prefill, steps, load_ms):
        p50, p90, p99 = (round(float(np.percentile(p, q)), 4) for q in (50, 90, 99))
        step_ms = float(np.percentile(st, 50)) if st else float("nan")
        tokens_per_s = round(int(ids.shape[0]) * 1000 / step_ms, 3) if st else None
        results.append({
            "provider": s.get_providers()[0], "runs": len(p), "load_ms": round(lm_ms, 3),
            "prompt_tokens": int(ids.shape[1]), "new_tokens": new, "batch": int(ids.shape[0]),
            "prefill_p50_ms": p50, "prefill_p90_ms": p90,
            "decode_ms_per_token_p50": round(step_ms, 4),
            "decode_ms_per_token_p90": round(float(np.percentile(st, 90)), 4) if st else None,
            "decode_tokens_per_s": tokens_per_s,
            # the stage's common columns: latency = prefill, throughput = generated tokens/s
            "latency_p50_ms": p50, "latency_p90_ms": p90, "latency_p99_ms": p99, "throughput_per_s": tokens_per_s,
            "latency_quantiles_ms": _quantiles(p),
        })
    return {"results": results, "onnxruntime": ort.__version__}


if __name__ == "__main__":
    try:
        print(json.dumps(main(json.loads(sys.argv[1]))))
    except Exception as e:  # the parent records this as a failed measurement, not a crash
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
        sys.exit(1)
