"""Stage 6, benchmark: every artifact on the execution providers of the target that the installed
onnxruntime offers, each in a fresh process (bench_runner.py) with the same inputs and threads.

Ratios (speedup, size) are against the fp32 artifact measured in the same build; absolute times
on a shared machine drift, ratios taken minutes apart on the same machine much less.
"""
from __future__ import annotations

import os
import platform
import tempfile


from edgeq.calib.source import for_build
from edgeq.core import BuildContext, EdgeqError, Files, StageResult, model_size_bytes
from edgeq.measure import measure


def run(ctx: BuildContext) -> StageResult:
    cfg = ctx.config.benchmark
    inputs = for_build(ctx).bench_file(ctx.path(Files.BENCH_INPUTS))
    threads = cfg.threads or os.cpu_count() or 1
    models = [ctx.path(a.path) for a in ctx.artifacts]
    eps: dict[str, str] = {}
    results: dict[str, dict[str, dict]] = {}
    notes = []
    candidates = list(ctx.target.execution_providers)
    torch_spec = ({"dir": str(ctx.model_path), "task": ctx.model.task or "feature-extraction",
                   "trust_remote_code": ctx.config.trust_remote_code} if cfg.torch_baseline else None)
    baseline_result = None
    for ep in candidates + ["CPUExecutionProvider"]:
        if ep in eps or (ep == "CPUExecutionProvider" and ep not in candidates and
                         any(v == "measured" for v in eps.values())):
            continue
        with_torch = torch_spec if ep == "CPUExecutionProvider" and not baseline_result else None
        ctx.log(f"  {ep}: {', '.join(a.name for a in ctx.artifacts)}{' and ' + BASELINE if with_torch else ''} "
                f"interleaved, {cfg.runs} runs each")
        rs = measure(models, inputs, ep, threads, cfg.warmup, cfg.runs, new_tokens=cfg.new_tokens, torch=with_torch)
        if with_torch and not isinstance(rs, str) and len(rs) > len(models):
            baseline_result = rs.pop()
        if isinstance(rs, str):
            eps[ep] = rs
            ctx.log(f"  {ep}: {rs}")
            continue
        if ep not in candidates:
            eps[ep] = "measured (fallback: none of the target's providers is available here)"
            notes.append(f"none of {candidates} is available here; measured on {ep} for reference only")
        else:
            eps[ep] = "measured"
        for a, r in zip(ctx.artifacts, rs):
            results.setdefault(a.name, {})[ep] = r
    measured = [ep for ep, st in eps.items() if st.startswith("measured")]
    if not measured:
        raise RuntimeError(f"no execution provider could run the artifacts: {eps}")
    primary = measured[0]
    host = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    if ctx.target.arch not in ("any", host):
        notes.append(f"measured on this {host} host, not on {ctx.target.arch} hardware: "
                     "latencies and speedups say nothing about the device")
    fp32 = results["fp32"][primary]
    if "error" in fp32:
        raise EdgeqError(f"the fp32 model cannot run the benchmark input ({cfg.batch_size} x {cfg.seq_len}): "
                         f"{fp32['error']}")
    fp32_size = model_size_bytes(ctx.path(Files.FP32))
    for a in ctx.artifacts:
        r = results[a.name][primary]
        size = model_size_bytes(ctx.path(a.path))
        a.metrics["size_bytes"] = size
        a.metrics["size_vs_fp32"] = round(size / fp32_size, 4)
        a.metrics["benchmark"] = results[a.name]
        if "error" in r:
            a.metrics["benchmark_error"] = r["error"]
            notes.append(f"{a.name} could not be benchmarked on {primary}: {r['error']}")
            continue
        for k in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_per_s", "load_ms", "peak_rss_mb",
                  "prefill_p50_ms", "decode_ms_per_token_p50", "decode_tokens_per_s"):
            if k in r:
                a.metrics[k] = r[k]
        if "partition" in r:
            a.metrics["ep_coverage"] = r["partition"]["coverage"]
        if "op_profile" in r:
            a.metrics["op_profile"] = r["op_profile"]
        if "decode_tokens_per_s" in r:  # causal LM: generation speed is what a user waits on
            a.metrics["speedup_vs_fp32"] = round(r["decode_tokens_per_s"] / fp32["decode_tokens_per_s"], 3)
            a.metrics["prefill_speedup_vs_fp32"] = round(fp32["prefill_p50_ms"] / r["prefill_p50_ms"], 3)
        else:
            a.metrics["speedup_vs_fp32"] = round(fp32["latency_p50_ms"] / r["latency_p50_ms"], 3)
    baselines = []
    if torch_spec:
        baselines.append(_torch_baseline(ctx, torch_spec, baseline_result, results["fp32"].get("CPUExecutionProvider"),
                                         fp32_size, threads))
    return StageResult(
        settings={"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "threads": threads,
                  **({"new_tokens": cfg.new_tokens, "speedup": "decode tokens/s vs fp32 (prefill: "
                      "prefill_speedup_vs_fp32)"} if cfg.new_tokens else {}),
                  "warmup": cfg.warmup, "runs": cfg.runs,
                  "method": "latency: artifacts interleaved in rounds of 10 runs in one process; "
                            "load time and peak RSS: a fresh process per artifact",
                  "primary_provider": primary, "host_machine": host},
        metrics={"execution_providers": eps, "notes": notes, **({"baselines": baselines} if baselines else {})},
    )


BASELINE = "torch-dynamic-int8"
BASELINE_SAMPLES = 64  # evaluation samples its fidelity is measured on (PyTorch runs eagerly: slow)


def _torch_baseline(ctx: BuildContext, spec: dict, result: dict | None, fp32: dict | None, fp32_size: int,
                    threads: int) -> dict:
    """The seeds' recipe (pipeline/runners/torch_runtime.py) as a row beside the artifacts: its
    latency from the interleaved rounds (`result`), its size as torch.save writes it, and the cosine
    of its pooled output against the fp32 artifact's on the first evaluation samples. Not an
    artifact: nothing of it is packaged."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeq.metrics import pooled, row_cosine
    from edgeq.pipeline.runners import torch_runtime

    row = {"name": BASELINE, "precision": "int8 (PyTorch)",
           "recipe": "torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), PyTorch eager",
           "torch": torch.__version__, "threads": threads}
    if result is None or fp32 is None or "latency_p50_ms" not in result:
        row["error"] = ("not measured: " + result["error"] if result and "error" in result else
                        "not measured: the CPU execution provider did not run here")
        ctx.log(f"  {BASELINE}: {row['error']}")
        return row
    torch.set_num_threads(threads)
    samples = for_build(ctx).evaluation()[0][:BASELINE_SAMPLES]
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(str(ctx.path(Files.FP32)), so, providers=["CPUExecutionProvider"])
    wanted = [ctx.model.primary_output] if ctx.model.primary_output else None
    ref = np.concatenate([pooled(sess.run(wanted, f)[0].astype(np.float32), m) for f, m in samples])
    try:  # it ran in the benchmark; a failure here is the baseline's, recorded, never the build's
        model = torch_runtime.load_dynamic_int8(spec["dir"], spec["task"], spec["trust_remote_code"])
        with tempfile.TemporaryDirectory() as tmp:
            size = torch_runtime.state_dict_bytes(model, os.path.join(tmp, "torch-dynamic-int8.pt"))
        run = torch_runtime.forward_fn(model, spec["task"])
        got = np.concatenate([pooled(run(f).astype(np.float32), m) for f, m in samples])
    except Exception as e:
        row["error"] = f"not measured: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        ctx.log(f"  {BASELINE}: {row['error']}")
        return row
    cos = row_cosine(ref, got)
    row.update({"size_bytes": size, "size_vs_fp32": round(size / fp32_size, 4),
                "cosine": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
                "eval_samples": len(samples), "load_ms": result.get("load_ms"),
                **{k: result[k] for k in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "throughput_per_s")
                   if k in result},
                "speedup_vs_fp32": round(fp32["latency_p50_ms"] / result["latency_p50_ms"], 3),
                "provider": result.get("provider")})
    return row
