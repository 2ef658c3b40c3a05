"""Measuring models with the standalone runner (bench_runner.py), shared by the benchmark stage, the
hybrid search, `edgeq bench` over ssh and the benchmark scripts."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.core import BuildContext, Files, run_json
from edgeq.pipeline.runners import BENCH_RUNNER

RUNNER = BENCH_RUNNER
PROFILE_RUNS = 20  # profiled runs per artifact (after 2 warm-up runs) for the per-operator time profile


def run_runner(spec: dict, timeout: float = 900) -> dict:
    return run_json([sys.executable, str(RUNNER), json.dumps(spec)], timeout=timeout)


def measure(models: list[Path], inputs: Path, provider: str, threads: int, warmup: int, runs: int,
            partition: bool = True, runner: Callable[[dict], dict] | None = None,
            new_tokens: int | None = None) -> list[dict] | str:
    """Latency of all models interleaved in one process; load time, peak RSS, the provider's
    partition of the graph and a per-operator time profile for each in its own. Returns
    'unavailable: <reason>' when the provider cannot run here."""
    run = runner or run_runner  # runs bench_runner.py: a local process, or on a device (pipeline/remote.py)
    base = {"inputs": str(inputs), "provider": provider, "threads": threads}
    if new_tokens:  # causal LM: each run is a generation (prefill + decode steps with the cache)
        base["new_tokens"] = new_tokens
        partition = False
        warmup, light = min(warmup, 1), {"warmup": 1, "runs": 1}
    else:
        light = {"warmup": 2, "runs": 3, **({"profile_runs": PROFILE_RUNS} if partition else {})}
    lat = run({**base, "models": [str(m) for m in models], "warmup": warmup, "runs": runs})
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
    return out


def bench_inputs(ctx: BuildContext, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """A batch of `seq_len` real tokens (held-out text, concatenated), so no position is padding."""
    from edgeq.calib import TextFeeds, model_feeds, read_eval_set, read_npz

    eval_path = Path(ctx.config["evaluation"]["path"])
    if ctx.config.get("family") == "vision":
        from edgeq.calib.images import EVAL_VIEWS, image_arrays

        arrays, _, _ = image_arrays(eval_path, ctx.facts["preprocess"], ctx.facts["input_names"][0], 1, EVAL_VIEWS,
                                    "evaluation")
        return {k: np.repeat(v, batch, axis=0) for k, v in arrays.items()}
    if eval_path.suffix.lower() == ".npz":
        arrays = read_npz(eval_path, ctx.facts["input_names"], what="evaluation", specs=ctx.facts.get("input_specs"))
        return {k: np.repeat(v[:1], batch, axis=0) for k, v in arrays.items()}
    text = " ".join(read_eval_set(eval_path, limit=200, text_field=ctx.config["calibration"]["text_field"]).texts)
    if ctx.config.get("family") == "causal-lm":  # the prompt: seq_len real tokens; the runner makes the rest
        ids = ctx.facts["tokenizer"](text, truncation=True, max_length=seq_len, return_tensors="np")["input_ids"]
        return {"input_ids": np.repeat(ids.astype(np.int64), batch, axis=0)}
    feeds = model_feeds(TextFeeds(ctx.facts["tokenizer"], ctx.facts["input_names"], seq_len)([text], pad_to=seq_len))
    return {k: np.repeat(v, batch, axis=0) for k, v in feeds.items()}


def ensure_bench_inputs(ctx: BuildContext) -> Path:
    """work/bench_inputs.npz, written once per build (the benchmark stage, the hybrid search and the
    mobile .ort check all run the same inputs)."""
    path = ctx.path(Files.BENCH_INPUTS)
    if not path.is_file():
        cfg = ctx.config["benchmark"]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **bench_inputs(ctx, cfg["batch_size"], cfg["seq_len"]))
    return path
