"""edgeq against Optimum's ONNX Runtime quantizer presets: same model, same data, same inputs, same
threads, measured in one run.

1. edgeq: `edgeq build --json` (static, dynamic, and hybrid through --max-accuracy-drop), or a
   finished build with --build-dir.
2. Optimum, as its user would: its own ONNX export of the same model
   (ORTModelFor<task>.from_pretrained(dir, export=True)), then ORTQuantizer with its preset
   configs, AutoQuantizationConfig.<arch>(is_static, per_channel); static presets calibrated by
   ORTQuantizer.fit with AutoCalibrationConfig.minmax (or .percentiles) on the calibration texts
   edgeq uses (the first --calib-samples of them, tokenized by the model's tokenizer, truncated
   at 128 tokens, one sample per batch as in Optimum's examples). Each preset's build time is
   timed.
3. Every artifact, both tools' fp32 included, against one fp32 reference: fidelity on the same
   held-out text (mean-pooled outputs, cosine, mean and worst; samples that are also calibration
   samples dropped, as the build does), latency with edgeq's runner (pipeline/runners/bench_runner.py):
   all models interleaved in one process, batch 1, 128 real tokens, the same thread count.
   Speedups are against edgeq's fp32 artifact from that same interleaved run.
4. A table, the best artifact of each tool at cosine >= 0.995 and >= 0.99 with the latency ratio
   between them, and where issue 7's goals stand; --json-out writes all of it.

    .venv/bin/python benchmarks/vs_optimum.py                      # builds the default model
    .venv/bin/python benchmarks/vs_optimum.py --build-dir artifacts/all-MiniLM-L6-v2/x86_64 --runs 50

Presets are named ARCH-MODE[-pc][-percentile]: ARCH arm64, avx2, avx512 or avx512_vnni, MODE
dynamic or static, -pc per-channel weights, -percentile (static only) percentile calibration
instead of minmax. Default: avx2 and arm64, dynamic and static, per-channel off and on (8).
Percentile presets are not in the default: onnxruntime's histogram calibrator keeps every
activation of every sample in memory and needs equal lengths (the samples are padded to 128 for
it), which is many GB on a transformer; and with onnxruntime 1.32 it fails on BERT graphs anyway
("Too many bins for data range", seen on MiniLM with 16 and 32 samples and on the test's tiny BERT),
which the preset's row then reports.

`datasets` is not a dependency of edgeq: the calibration samples reach ORTQuantizer.fit and
AutoCalibrationConfig in a small stand-in (CalibrationSet) with the attributes they read from a
datasets.Dataset (iteration over feature dicts, num_rows, info, split); the calibration itself is
Optimum's code path unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np

ARCHS = ("arm64", "avx2", "avx512", "avx512_vnni")
PRESET_RE = re.compile(r"(?P<arch>arm64|avx2|avx512_vnni|avx512)-(?P<mode>dynamic|static)(?P<pc>-pc)?"
                       r"(?P<pct>-percentile)?")
DEFAULT_PRESETS = tuple(f"{a}-{m}{pc}" for a in ("avx2", "arm64") for m in ("dynamic", "static") for pc in ("", "-pc"))
THRESHOLDS = (0.995, 0.99)
DEFAULT_CALIB_SAMPLES, DEFAULT_EVAL_SAMPLES = 256, 120  # edgeq build's defaults
GOAL_SPEEDUP, GOAL_VS_OPTIMUM, GOAL_COSINE, GOAL_HYBRID_COSINE = 2.2, 1.4, 0.995, 0.99


class BenchError(Exception):
    """A failure this script reports in one line (exit status 1)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def quiet():
    """Silence the libraries' warnings and prints (the quantizer logs one line per tensor)."""
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("optimum")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def parse_preset(name: str) -> dict:
    m = PRESET_RE.fullmatch(name)
    if not m:
        raise BenchError(f"unknown preset '{name}': expected ARCH-MODE[-pc][-percentile], ARCH one of "
                         f"{', '.join(ARCHS)}, MODE dynamic or static (e.g. avx2-static-pc)")
    static = m["mode"] == "static"
    if m["pct"] and not static:
        raise BenchError(f"preset '{name}': -percentile is a calibration method, for static presets only")
    return {"arch": m["arch"], "static": static, "per_channel": bool(m["pc"]),
            "calibration": ("percentiles" if m["pct"] else "minmax") if static else None}


# --- edgeq ------------------------------------------------------------------------------------

def edgeq_build(model: Path, args, out: Path) -> tuple[Path, float]:
    """`edgeq build --json` in a subprocess; (build directory, wall seconds)."""
    cmd = [sys.executable, "-m", "edgeq", "build", "--json", str(model), "--target", args.target,
           "--mode", "static", "--mode", "dynamic", "--max-accuracy-drop", str(args.max_accuracy_drop),
           "--out", str(out), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--calib-samples", str(args.calib_samples or DEFAULT_CALIB_SAMPLES),
           "--eval-samples", str(args.eval_samples or DEFAULT_EVAL_SAMPLES)]
    log(f"edgeq: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError("edgeq build timed out after 3600 s") from None
    seconds = time.perf_counter() - t0
    # exit 3: built, but no artifact met the gate that --max-accuracy-drop also sets; the build is complete
    if proc.returncode not in (0, 3):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"edgeq build failed (exit {proc.returncode}): {last}")
    try:  # stdout is the --json summary alone (indented); the logs went to stderr
        summary = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        summary = None
    if not isinstance(summary, dict) or "build_dir" not in summary:
        raise BenchError("edgeq build printed no JSON summary")
    return Path(summary["build_dir"]), seconds


def edgeq_rows(build_dir: Path, wall_seconds: float | None) -> tuple[list[dict], dict]:
    from edgeq.core import EdgeqError, load_manifest, model_size_bytes

    try:
        manifest = load_manifest(build_dir)
    except EdgeqError as e:
        raise BenchError(str(e)) from None
    names = [a["name"] for a in manifest["artifacts"]]
    if "fp32" not in names:
        raise BenchError(f"{build_dir}: the build has no fp32 artifact (the reference)")
    seconds = wall_seconds if wall_seconds is not None else manifest.get("build_seconds")
    rows = []
    for a in manifest["artifacts"]:
        if a["name"] not in ("fp32", "int8-static", "int8-dynamic", "int8-hybrid"):
            continue
        path = build_dir / a["path"]
        rows.append({"name": f"edgeq {a['name']}", "tool": "edgeq", "artifact": a["name"], "path": str(path),
                     "precision": a["precision"],
                     "static": a["name"] in ("int8-static", "int8-hybrid"), "int8": a["name"] != "fp32",
                     "build_seconds": round(seconds, 2) if seconds is not None else None,
                     "size_bytes": model_size_bytes(path)})
    info = {"build_dir": str(build_dir), "reused": wall_seconds is None, "build_seconds": seconds,
            "build_seconds_meaning": "one `edgeq build` for all its artifacts (export, optimize, calibrate, "
                                     "quantize, hybrid search, its own evaluation and benchmark)",
            "stage_seconds": {s["stage"]: s.get("seconds") for s in manifest.get("stages", [])},
            "calibration": manifest["config"].get("calibration", {}),
            "evaluation": manifest["config"].get("evaluation", {}),
            "max_length": manifest["config"].get("max_length") or 128,
            "target": manifest["target"]["name"], "task": manifest["model"].get("task"),
            "modes": manifest["config"].get("modes"),
            "model": manifest["config"].get("model"), "versions": manifest.get("versions", {}),
            "hybrid": next(({k: a["recipe"].get(k) for k in ("max_accuracy_drop", "chosen_step")}
                            for a in manifest["artifacts"] if a["name"] == "int8-hybrid"), None)}
    return rows, info


# --- Optimum ----------------------------------------------------------------------------------

class CalibrationSet:
    """What ORTQuantizer.fit and AutoCalibrationConfig read from a datasets.Dataset: iteration over
    feature dicts (one sample each), num_rows, info.builder_name/config_name and split."""

    def __init__(self, rows: list[dict], name: str):
        self.rows = rows
        self.num_rows = len(rows)
        self.split = "calibration"
        self.info = types.SimpleNamespace(builder_name=name, config_name=None)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return self.num_rows


def optimum_export(model_dir: Path, task: str, out: Path) -> float:
    """Optimum's own fp32 export, as its user makes it; returns seconds."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification

    cls = ORTModelForSequenceClassification if task == "text-classification" else ORTModelForFeatureExtraction
    t0 = time.perf_counter()
    with quiet():
        model = cls.from_pretrained(str(model_dir), export=True)
        model.save_pretrained(str(out))
    return time.perf_counter() - t0


def qconfig_summary(q) -> dict:
    def s(v):
        return getattr(v, "name", None) or str(v)
    return {"format": s(q.format), "mode": s(q.mode), "activations_dtype": s(q.activations_dtype),
            "weights_dtype": s(q.weights_dtype), "per_channel": q.per_channel, "reduce_range": q.reduce_range,
            "activations_symmetric": q.activations_symmetric, "weights_symmetric": q.weights_symmetric,
            "operators_to_quantize": [s(o) if not isinstance(o, str) else o for o in q.operators_to_quantize]}


def optimum_preset(name: str, export_dir: Path, out: Path, calib: dict[str, CalibrationSet]) -> dict:
    """One Optimum preset: (calibrate and) quantize Optimum's export. A row, with `error` on failure."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig

    from edgeq.core import model_size_bytes

    p = parse_preset(name)
    preset = {"config": f"AutoQuantizationConfig.{p['arch']}(is_static={p['static']}, per_channel={p['per_channel']})",
              "calibration": p["calibration"] and f"AutoCalibrationConfig.{p['calibration']}"}
    row = {"name": f"optimum {name}", "tool": "optimum", "artifact": name, "static": p["static"], "int8": True,
           "precision": "int8", "preset": preset}
    t0 = time.perf_counter()
    try:
        with quiet(), tempfile.TemporaryDirectory() as tmp:
            quantizer = ORTQuantizer.from_pretrained(export_dir)
            qconfig = getattr(AutoQuantizationConfig, p["arch"])(is_static=p["static"], per_channel=p["per_channel"])
            row["preset"]["resolved"] = qconfig_summary(qconfig)
            ranges = None
            if p["static"]:
                ds = calib[p["calibration"]]
                cconfig = getattr(AutoCalibrationConfig, p["calibration"])(ds)
                ranges = quantizer.fit(dataset=ds, calibration_config=cconfig,
                                       operators_to_quantize=qconfig.operators_to_quantize,
                                       onnx_augmented_model_name=str(Path(tmp) / "augmented_model.onnx"))
            quantizer.quantize(quantization_config=qconfig, save_dir=out, calibration_tensors_range=ranges)
        path = out / f"{export_dir.joinpath('model.onnx').stem}_quantized.onnx"
        if not path.is_file():
            found = sorted(out.glob("*.onnx"))
            if not found:
                raise RuntimeError(f"no .onnx written in {out}")
            path = found[0]
    except Exception as e:  # a preset Optimum or onnxruntime cannot apply to this model: its row says why
        row["error"] = first_line(e)
        row["build_seconds"] = round(time.perf_counter() - t0, 2)
        return row
    row.update(path=str(path), build_seconds=round(time.perf_counter() - t0, 2), size_bytes=model_size_bytes(path))
    return row


# --- measurement ------------------------------------------------------------------------------

def eval_samples(tok, calib_texts: list[str], eval_path: Path, n: int, input_names: list[str], text_field: str,
                 max_length: int):
    """The held-out samples the build evaluates on: calibration texts dropped, the first n, one at a time."""
    from edgeq.calib import TextFeeds, read_eval_set

    evalset = read_eval_set(eval_path, limit=n + len(calib_texts), text_field=text_field).without(set(calib_texts))
    texts = evalset.texts[:n]
    if not texts:
        raise BenchError(f"evaluation file {eval_path} has no samples that are not calibration samples")
    tf = TextFeeds(tok, input_names, max_length)
    return [tf([t]) for t in texts]


def embed(path: str, samples) -> np.ndarray:
    import onnxruntime as ort

    from edgeq.metrics import pooled

    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    out = "last_hidden_state" if "last_hidden_state" in outs else "logits" if "logits" in outs else outs[0]
    return np.concatenate([pooled(sess.run([out], {k: v for k, v in f.items() if k in names})[0].astype(np.float32), m)
                           for f, m in samples])


def torch_reference(model_dir: Path, task: str, samples, input_names: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from edgeq.metrics import pooled

    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    with quiet():
        model = cls.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.no_grad():
        for f, m in samples:
            r = model(**{k: torch.from_numpy(v) for k, v in f.items() if k in input_names})
            r = r.logits if task == "text-classification" else r.last_hidden_state
            out.append(pooled(r.numpy().astype(np.float32), m))
    return np.concatenate(out)


def bench_inputs(tok, eval_path: Path, seq_len: int, path: Path, text_field: str) -> Path:
    """What the build benchmarks on (calib/source.py, TextData.bench_inputs): seq_len real tokens of held-out
    text, batch 1, with every input either tool's models take."""
    from edgeq.calib import TextFeeds, read_eval_set

    text = " ".join(read_eval_set(eval_path, limit=200, text_field=text_field).texts)
    tf = TextFeeds(tok, ["input_ids", "attention_mask", "token_type_ids"], seq_len)
    feeds = tf([text], pad_to=seq_len).feeds
    np.savez(path, **feeds)
    return path


def measure_latency(rows: list[dict], inputs: Path, args) -> None:
    """Every row that has a model, interleaved in one process with edgeq's runner; speedups vs the first."""
    from edgeq.measure import measure, run_runner

    live = [r for r in rows if "error" not in r]
    # the runner's default 120 s cap would cut a long comparison short; the cap here only guards a hang
    budget = max(600.0, 0.2 * args.runs * len(live))

    def runner(spec):
        return run_runner({**spec, "max_seconds": budget}, timeout=budget + 600)

    log(f"latency: {len(live)} models interleaved, {args.runs} runs each, {args.threads} threads")
    res = measure([Path(r["path"]) for r in live], inputs, "CPUExecutionProvider", args.threads, args.warmup,
                  args.runs, partition=False, runner=runner)
    if isinstance(res, str):
        raise BenchError(f"latency: {res}")
    for r, m in zip(live, res):
        if "error" in m:
            r["error"] = f"benchmark: {m['error']}"
            continue
        for k in ("latency_p50_ms", "latency_p90_ms", "latency_mean_ms", "runs", "load_ms", "peak_rss_mb"):
            if k in m:
                r[k] = m[k]
    ref = live[0]
    if "latency_p50_ms" not in ref:
        raise BenchError(f"the fp32 reference could not be benchmarked: {ref.get('error')}")
    for r in live:
        if "latency_p50_ms" in r:
            r["speedup_vs_fp32"] = round(ref["latency_p50_ms"] / r["latency_p50_ms"], 3)


# --- comparison -------------------------------------------------------------------------------

def best(rows: list[dict], tool: str, floor: float | None = None, static: bool | None = None) -> dict | None:
    """The fastest int8 artifact of `tool` (at cosine >= floor; static presets only if asked)."""
    ok = [r for r in rows if r["tool"] == tool and r.get("int8") and "latency_p50_ms" in r and "cosine" in r
          and (floor is None or r["cosine"] >= floor) and (static is None or r["static"] == static)]
    return min(ok, key=lambda r: r["latency_p50_ms"]) if ok else None


def summarize(rows: list[dict]) -> dict:
    out = {"by_cosine_floor": {}}
    for floor in THRESHOLDS:
        e, o = best(rows, "edgeq", floor), best(rows, "optimum", floor)
        out["by_cosine_floor"][str(floor)] = {
            "edgeq": e and e["name"], "optimum": o and o["name"],
            "edgeq_speedup_vs_fp32": e and e["speedup_vs_fp32"], "optimum_speedup_vs_fp32": o and o["speedup_vs_fp32"],
            "edgeq_vs_optimum": round(o["latency_p50_ms"] / e["latency_p50_ms"], 3) if e and o else None}
    fast = best(rows, "optimum")
    out["optimum_fastest_any_cosine"] = fast and {"name": fast["name"], "cosine": fast["cosine"],
                                                  "speedup_vs_fp32": fast["speedup_vs_fp32"]}
    fast_static = best(rows, "optimum", static=True)
    out["optimum_fastest_static_any_cosine"] = fast_static and {"name": fast_static["name"],
                                                                "cosine": fast_static["cosine"],
                                                                "latency_p50_ms": fast_static["latency_p50_ms"]}
    out["goals"] = goals(rows)
    return out


def goals(rows: list[dict]) -> list[dict]:
    """Issue 7's targets, each met / not met with the numbers it was judged on."""
    floor = GOAL_COSINE
    e = best(rows, "edgeq", floor)
    res = []
    if e is None:
        res.append({"goal": f"edgeq int8 >= {GOAL_SPEEDUP}x fp32 (cosine >= {floor})", "met": False,
                    "detail": f"no edgeq int8 artifact reaches cosine {floor}"})
    else:
        res.append({"goal": f"edgeq int8 >= {GOAL_SPEEDUP}x fp32 (cosine >= {floor})",
                    "met": e["speedup_vs_fp32"] >= GOAL_SPEEDUP,
                    "detail": f"{e['name']}: {e['speedup_vs_fp32']:.2f}x fp32 at cosine {e['cosine']:.4f}"})
    o = best(rows, "optimum", floor)
    how = f"Optimum's fastest at cosine >= {floor}"
    if o is None:  # generous to Optimum: its fastest at the looser floor, then at any cosine
        o, how = best(rows, "optimum", GOAL_HYBRID_COSINE), (f"no Optimum preset reaches cosine {floor}; its "
                                                            f"fastest at cosine >= {GOAL_HYBRID_COSINE}")
    if o is None:
        o, how = best(rows, "optimum"), f"no Optimum preset reaches cosine {GOAL_HYBRID_COSINE}; its fastest at any cosine"
    g = f"edgeq int8 >= {GOAL_VS_OPTIMUM}x Optimum's best (cosine >= {floor})"
    if e is None or o is None:
        res.append({"goal": g, "met": False, "detail": "nothing to compare: " +
                    ("no edgeq int8 artifact at the floor" if e is None else "no Optimum preset was measured")})
    else:
        ratio = o["latency_p50_ms"] / e["latency_p50_ms"]
        res.append({"goal": g, "met": ratio >= GOAL_VS_OPTIMUM,
                    "detail": f"{e['name']} {e['latency_p50_ms']:.2f} ms vs {how}, {o['name']} "
                              f"{o['latency_p50_ms']:.2f} ms (cosine {o['cosine']:.4f}): {ratio:.2f}x"})
    # the static artifact with precision mixed in: int8-hybrid when the build searched for one, else
    # int8-static, which on CPU targets carries the dynamic-int8 fallback (targets/x86_64.toml)
    h = next((r for r in rows if r["tool"] == "edgeq" and r["artifact"] == "int8-hybrid"), None) or \
        next((r for r in rows if r["tool"] == "edgeq" and r["artifact"] == "int8-static"), None)
    s = best(rows, "optimum", static=True)
    g = f"edgeq static hybrid cosine >= {GOAL_HYBRID_COSINE} and faster than Optimum's fastest static preset"
    if h is None or "latency_p50_ms" not in h or "cosine" not in h:
        res.append({"goal": g, "met": False, "detail": "no int8-hybrid or int8-static artifact measured"
                    + (f" ({h['error']})" if h and "error" in h else "")})
    elif s is None:
        res.append({"goal": g, "met": False, "detail": "no Optimum static preset measured"})
    else:
        met = h["cosine"] >= GOAL_HYBRID_COSINE and h["latency_p50_ms"] < s["latency_p50_ms"]
        res.append({"goal": g, "met": met,
                    "detail": f"{h['artifact']} cosine {h['cosine']:.4f}, {h['latency_p50_ms']:.2f} ms vs {s['name']} "
                              f"{s['latency_p50_ms']:.2f} ms (cosine {s['cosine']:.4f}): hybrid at "
                              f"{s['latency_p50_ms'] / h['latency_p50_ms']:.2f}x its speed"})
    return res


def _cell(r: dict, k: str, fmt: str, suffix: str = "") -> str:
    v = r.get(k)
    return format(v, fmt) + suffix if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def table(rows: list[dict]) -> str:
    head = ("artifact", "build s", "size MB", "cosine", "worst", "p50 ms", "p90 ms", "speedup", "runs")
    lines = []
    for r in rows:
        cells = (r["name"], _cell(r, "build_seconds", ".1f"),
                 f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else "-",
                 _cell(r, "cosine", ".4f"), _cell(r, "cosine_min", ".4f"), _cell(r, "latency_p50_ms", ".2f"),
                 _cell(r, "latency_p90_ms", ".2f"), _cell(r, "speedup_vs_fp32", ".2f", "x"), _cell(r, "runs", "d"))
        lines.append((cells, r.get("error")))
    widths = [max(len(head[i]), *(len(c[i]) for c, _ in lines)) for i in range(len(head))]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    out = [fmt(head), rule]
    for cells, err in lines:
        out.append(fmt(cells) + (f" error: {err}" if err else ""))
    return "\n".join(out)


def report(result: dict) -> str:
    s = result["summary"]
    lines = [table(result["rows"]), ""]
    for floor, b in s["by_cosine_floor"].items():
        if b["edgeq"] and b["optimum"]:
            lines.append(f"cosine >= {floor}: edgeq best {b['edgeq']} ({b['edgeq_speedup_vs_fp32']:.2f}x fp32), "
                         f"Optimum best {b['optimum']} ({b['optimum_speedup_vs_fp32']:.2f}x fp32): "
                         f"edgeq {b['edgeq_vs_optimum']:.2f}x Optimum")
        else:
            lines.append(f"cosine >= {floor}: edgeq best {b['edgeq'] or 'none'}, Optimum best {b['optimum'] or 'none'}")
    if s["optimum_fastest_any_cosine"]:
        f = s["optimum_fastest_any_cosine"]
        lines.append(f"Optimum's fastest at any cosine: {f['name']} ({f['speedup_vs_fp32']:.2f}x fp32, "
                     f"cosine {f['cosine']:.4f})")
    lines.append("")
    for g in s["goals"]:
        lines.append(f"goal {'MET    ' if g['met'] else 'NOT MET'}  {g['goal']}: {g['detail']}")
    st = result["settings"]
    lines += ["", (f"({st['machine']}, onnxruntime {st['onnxruntime']}, batch 1, {st['seq_len']} tokens, "
                   f"{st['threads']} threads, {st['runs']} runs interleaved; speedup vs {result['rows'][0]['name']}; "
                   f"cosine vs {st['reference']} on {st['eval_samples']} held-out texts; build s: edgeq, the whole "
                   f"`edgeq build`; Optimum, its export (fp32 row) or calibrate + quantize (presets))")]
    return "\n".join(lines)


def compare(args) -> dict:
    """The whole comparison; returns the result (rows, summary, settings)."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from edgeq.intake import default_model_dir
    from edgeq.calib import default_calibration_path, default_eval_path, read_texts
    from edgeq.core import EdgeqError, load_manifest, model_size_bytes, read_json_object

    presets = list(dict.fromkeys(args.presets))
    for p in presets:
        parse_preset(p)
    args.threads = args.threads or os.cpu_count() or 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.build_dir:
            build_dir, wall = Path(args.build_dir).resolve(), None
            cfg_model = load_manifest(build_dir)["config"].get("model")
            model = Path(args.model).resolve() if args.model else Path(cfg_model)
            if args.model and cfg_model and Path(cfg_model).resolve() != model:
                raise BenchError(f"--model {model} is not the model of --build-dir ({cfg_model})")
        else:
            model = Path(args.model).resolve() if args.model else default_model_dir()
            if not (model / "config.json").is_file():
                raise BenchError(f"{model} is not a Hugging Face model directory (no config.json)")
            build_dir, wall = edgeq_build(model, args, Path(args.out) if args.out else work / "edgeq")
        if not (model / "config.json").is_file():
            raise BenchError(f"the model of the build, {model}, is not a Hugging Face model directory here")
        rows, edgeq_info = edgeq_rows(build_dir, wall)
        from edgeq.pipeline.export import infer_task

        task = edgeq_info.get("task") or infer_task(read_json_object(model / "config.json"))
        tok = AutoTokenizer.from_pretrained(str(model))
    except EdgeqError as e:
        raise BenchError(str(e)) from None

    # the calibration and held-out texts the build used (its manifest), so both tools see the same
    cal, ev = edgeq_info["calibration"], edgeq_info["evaluation"]
    calib_path = Path(cal.get("path") or default_calibration_path())
    eval_path = Path(ev.get("path") or default_eval_path())
    for p, what in ((calib_path, "calibration"), (eval_path, "evaluation")):
        if p.suffix.lower() == ".npz":
            raise BenchError(f"the build's {what} data is .npz ({p}); this comparison needs text")
    n_calib = cal.get("samples") or args.calib_samples or DEFAULT_CALIB_SAMPLES
    n_eval = ev.get("samples") or args.eval_samples or DEFAULT_EVAL_SAMPLES
    for given, used, flag in ((args.calib_samples, n_calib, "--calib-samples"),
                              (args.eval_samples, n_eval, "--eval-samples")):
        if given and given != used:
            log(f"note: {flag} {given} ignored: the build used {used}, and so does the comparison")
    text_field = cal.get("text_field") or "text"
    max_len = edgeq_info["max_length"]
    try:
        calib_texts = read_texts(calib_path, limit=n_calib, text_field=text_field)
    except EdgeqError as e:
        raise BenchError(str(e)) from None
    rows.sort(key=lambda r: r["artifact"] != "fp32")  # the reference first

    # Optimum: its export, then each preset
    opt_dir = work / "optimum"
    export_dir = opt_dir / "export"
    optimum_info = {"export": "ORTModelFor{FeatureExtraction|SequenceClassification}.from_pretrained(model, "
                              "export=True).save_pretrained(dir)", "task": task,
                    "calibration": {"texts": str(calib_path), "samples": len(calib_texts),
                                    "tokenization": f"model's tokenizer, truncation at {max_len}, one sample per batch "
                                                    f"(fit batch_size=1); unpadded for minmax, padded to {max_len} for "
                                                    "percentiles (onnxruntime's histogram needs equal shapes)",
                                    "dataset": "CalibrationSet (datasets is not installed; see the docstring)"}}
    import importlib

    try:
        importlib.import_module("optimum.onnxruntime")
    except Exception as e:  # an incompatible optimum/transformers pair raises more than ImportError
        optimum_error = f"optimum.onnxruntime cannot be imported: {first_line(e)}"
    else:
        optimum_error = None
    if optimum_error is None:
        log(f"optimum: exporting {model.name}")
        shutil.rmtree(export_dir, ignore_errors=True)
        try:
            export_seconds = optimum_export(model, task, export_dir)
        except Exception as e:  # whatever the exporter raises: every Optimum row reports it
            optimum_error = f"export: {first_line(e)}"
    if optimum_error is not None:
        rows.append({"name": "optimum fp32", "tool": "optimum", "artifact": "fp32", "static": False, "int8": False,
                     "error": optimum_error})
        rows += [{"name": f"optimum {p}", "tool": "optimum", "artifact": p, "static": parse_preset(p)["static"],
                  "int8": True, "error": optimum_error} for p in presets]
    else:
        export_model = export_dir / "model.onnx"
        rows.append({"name": "optimum fp32", "tool": "optimum", "artifact": "fp32", "path": str(export_model),
                     "static": False, "int8": False, "precision": "fp32", "build_seconds": round(export_seconds, 2),
                     "size_bytes": model_size_bytes(export_model)})
        optimum_info["export_seconds"] = round(export_seconds, 2)
        optimum_info["export_opset"] = next((o.version for o in onnx.load(str(export_model), load_external_data=False)
                                             .opset_import if o.domain in ("", "ai.onnx")), None)
        calib = {}
        if any(parse_preset(p)["calibration"] == "minmax" for p in presets):
            calib["minmax"] = CalibrationSet([dict(tok(t, truncation=True, max_length=max_len)) for t in calib_texts],
                                             "edgeq-calibration")
        if any(parse_preset(p)["calibration"] == "percentiles" for p in presets):
            calib["percentiles"] = CalibrationSet(
                [dict(tok(t, truncation=True, max_length=max_len, padding="max_length")) for t in calib_texts],
                "edgeq-calibration-padded")
        for p in presets:
            log(f"optimum: {p}")
            out = opt_dir / p
            shutil.rmtree(out, ignore_errors=True)
            r = optimum_preset(p, export_dir, out, calib)
            if "error" in r:
                log(f"  {p}: {r['error']}")
            rows.append(r)

    # fidelity: every model on the same held-out samples against one fp32 reference
    input_names = ["input_ids", "attention_mask", "token_type_ids"]
    samples = eval_samples(tok, calib_texts, eval_path, n_eval, input_names, text_field, max_len)
    log(f"fidelity: {len(samples)} held-out texts, reference: {args.reference}")
    if args.reference == "pytorch":
        ref = torch_reference(model, task, samples, list(tok.model_input_names))
    else:
        ref = None
    from edgeq.metrics import row_cosine

    for r in rows:
        if "error" in r:
            continue
        try:
            got = embed(r["path"], samples)
        except Exception as e:  # onnxruntime cannot load or run it: reported in its row
            r["error"] = f"inference: {first_line(e)}"
            continue
        if ref is None:  # edgeq's fp32 artifact, the first row
            ref = got
        c = row_cosine(ref.astype(np.float64), got.astype(np.float64))
        r["cosine"], r["cosine_min"] = float(c.mean()), float(c.min())
    if "error" in rows[0]:
        raise BenchError(f"edgeq's fp32 artifact does not run: {rows[0]['error']}")

    inputs = bench_inputs(tok, eval_path, 128, work / "bench_inputs.npz", text_field)
    measure_latency(rows, inputs, args)
    settings = {"model": str(model), "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
                "batch_size": 1, "seq_len": 128, "provider": "CPUExecutionProvider", "onnxruntime": ort.__version__,
                "reference": "edgeq fp32 artifact" if args.reference == "edgeq-fp32" else "PyTorch fp32 model",
                "latency_reference": rows[0]["name"], "eval_samples": len(samples), "calib_samples": len(calib_texts),
                "method": "latency: every model interleaved in rounds of 10 runs in one process "
                          "(edgeq's pipeline/runners/bench_runner.py); fidelity: mean-pooled output per held-out text, "
                          "one text at a time, cosine vs the reference",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores", "presets": presets,
                "work": str(work) + (" (temporary, deleted)" if getattr(args, "work_is_temp", False) else "")}
    try:
        from edgeq.core import library_versions, machine_info

        settings["versions"] = library_versions()
        settings["machine_info"] = machine_info()
        settings["machine"] = f"{settings['machine_info'].get('cpu') or platform.machine()}, {os.cpu_count()} cores"
    except (OSError, ImportError):  # the machine description is a nicety
        pass
    for r in rows:
        for k in ("cosine", "cosine_min"):
            if k in r:
                r[k] = round(r[k], 6)
    return {"schema": "edgeq.vs-optimum/1", "settings": settings, "edgeq": edgeq_info, "optimum": optimum_info,
            "rows": rows, "summary": summarize(rows)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face model directory (default: the embedded all-MiniLM-L6-v2, or the "
                                    "model of --build-dir)")
    ap.add_argument("--build-dir", help="reuse this finished edgeq build instead of running `edgeq build`")
    ap.add_argument("--out", help="where `edgeq build` writes (--out of edgeq build; default: inside --work)")
    ap.add_argument("--work", help="keep Optimum's export and presets here (default: a temporary directory)")
    ap.add_argument("--target", default="x86_64", help="edgeq target profile (default: x86_64)")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                    help="comma-separated Optimum presets, ARCH-MODE[-pc][-percentile] (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model (default: 200)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per model first (default: 10)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: os.cpu_count())")
    ap.add_argument("--calib-samples", type=int,
                    help=f"calibration texts, both tools (default: {DEFAULT_CALIB_SAMPLES}; with --build-dir: what "
                         "the build used)")
    ap.add_argument("--eval-samples", type=int, help=f"held-out texts for fidelity (default: {DEFAULT_EVAL_SAMPLES}; "
                                                     "with --build-dir: what the build used)")
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01,
                    help="edgeq's hybrid budget (--max-accuracy-drop of edgeq build; default: 0.01)")
    ap.add_argument("--reference", choices=("edgeq-fp32", "pytorch"), default="edgeq-fp32",
                    help="fp32 reference of the cosine (default: edgeq's fp32 artifact)")
    ap.add_argument("--json-out", help="write the result here as JSON")
    args = ap.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for k in ("runs", "calib_samples", "eval_samples"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.threads < 0:
        ap.error("--warmup and --threads must not be negative")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = parse_args(argv)
    tmp = None
    try:
        if not args.work:
            tmp = tempfile.TemporaryDirectory(prefix="vs-optimum-")
            args.work = tmp.name
        args.work_is_temp = tmp is not None
        result = compare(args)
        print(report(result))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=2, default=str) + "\n")
            log(f"wrote {args.json_out}")
        return 0
    except BenchError as e:
        log(f"vs_optimum: {e}")
        return 1
    except KeyboardInterrupt:
        log("vs_optimum: interrupted")
        return 130
    except Exception as e:  # anything unforeseen still ends in one line
        log(f"vs_optimum: unexpected {first_line(e)}")
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
