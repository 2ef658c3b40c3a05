"""Measuring models with the standalone runner (pipeline/runners/bench_runner.py), shared by the
benchmark stage, the hybrid search, `edgeq bench` over ssh and the benchmark scripts. What the
models run on is the build's data source's (calib.source) benchmark inputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


from edgeq.core import run_json
from edgeq.pipeline.runners import BENCH_RUNNER

RUNNER = BENCH_RUNNER
PROFILE_RUNS = 20  # profiled runs per artifact (after 2 warm-up runs) for the per-operator time profile


def run_runner(spec: dict, timeout: float = 900) -> dict:
    return run_json([sys.executable, str(RUNNER), json.dumps(spec)], timeout=timeout)


def measure(models: list[Path], inputs: Path, provider: str, threads: int, warmup: int, runs: int,
            partition: bool = True, runner: Callable[[dict], dict] | None = None,
            new_tokens: int | None = None, torch: dict | None = None) -> list[dict] | str:
    """Latency of all models interleaved in one process; load time, peak RSS, the provider's
    partition of the graph and a per-operator time profile for each in its own. Returns
    'unavailable: <reason>' when the provider cannot run here. `torch` (the runner's torch spec):
    PyTorch's dynamic int8 of the model joins the interleaved rounds; its result comes last."""
    run = runner or run_runner  # runs bench_runner.py: a local process, or on a device (edgeq/commands/remote.py)
    base = {"inputs": str(inputs), "provider": provider, "threads": threads}
    if new_tokens:  # causal LM: each run is a generation (prefill + decode steps with the cache)
        base["new_tokens"] = new_tokens
        partition = False
        warmup, light = min(warmup, 1), {"warmup": 1, "runs": 1}
    else:
        light = {"warmup": 2, "runs": 3, **({"profile_runs": PROFILE_RUNS} if partition else {})}
    lat = run({**base, "models": [str(m) for m in models], "warmup": warmup, "runs": runs,
               **({"torch": torch} if torch else {})})
    if "unavailable" in lat:
        return f"unavailable: {lat['unavailable']}"
    out = []
    for i, m in enumerate(models):
        if "error" in lat:
            out.append({"error": lat["error"]})
            continue
        mem = run({**base, "models": [str(m)], **light, "partition": partition})
        r = dict(lat["results"][i])
        if "error" in mem or "unavailable" in mem:
            r["memory_error"] = mem.get("error") or mem.get("unavailable")
        else:
            r["load_ms"] = mem["results"][0]["load_ms"]
            r["peak_rss_mb"] = mem["peak_rss_mb"]
            if "partition" in mem:
                r["partition"] = mem["partition"]
            if "op_profile" in mem:
                r["op_profile"] = mem["op_profile"]
        out.append(r)
    if torch and "results" in lat and len(lat["results"]) > len(models):
        out.append(dict(lat["results"][len(models)]))
    elif torch and lat.get("torch_error"):
        out.append({"error": lat["torch_error"]})
    return out
