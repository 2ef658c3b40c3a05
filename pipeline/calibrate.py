"""Stage 3, calibrate: activation ranges for static int8 from representative data.

Why not onnxruntime.quantization's calibrators as they are: they keep every intermediate output of
every batch until the end (memory grows with the sample count) and their histogram collectors fail
on batches of different sequence lengths ("inhomogeneous shape"). Here the model runs batch by batch
and each batch is folded into running min/max or into ORT's own HistogramCollector at once, so
memory stays flat and variable-length batches are fine. The ranges are written in ORT's calibration
cache format, which `quantize_static(calibration_cache_path=...)` reads back, and reused on re-runs
while the model, data and settings are unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeq.calib.source import for_build
from edgeq.core import BuildContext, CalibrationResult, EdgeqError, Files, StageResult, sha256_file, sha256_json
from edgeq.pipeline.ops import bias_correction, smooth
from edgeq.pipeline.ops.quantizer import calibration_method
from edgeq.pipeline.ops.static_plan import static_plan


def tensors_to_calibrate(model, op_types) -> list[str]:
    """Float activations (not weights) that feed or leave nodes of the given op types."""
    import onnx

    vi = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inits = {i.name for i in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for t in list(node.input) + list(node.output):
            if t and t not in inits and t in vi and vi[t].type.tensor_type.elem_type in floats and t not in names:
                names.append(t)
    return names


class RangeCollector:
    """Folds batches of activations into ranges with memory independent of the number of batches."""

    def __init__(self, method: str, percentile: float = 99.999, symmetric: bool = False):
        self.method = method
        self.minmax: dict[str, list[np.ndarray]] = {}
        self.hist = None
        if method != "minmax":
            from onnxruntime.quantization.calibrate import HistogramCollector

            self.hist = HistogramCollector(method=method, symmetric=symmetric, num_bins=2048 if method != "entropy" else 128,
                                           num_quantized_bins=128, percentile=percentile, scenario="same")

    def add(self, name: str, value: np.ndarray) -> None:
        if self.hist is None:
            lo, hi = value.min(), value.max()
            if name in self.minmax:
                old = self.minmax[name]
                lo, hi = min(old[0], lo), max(old[1], hi)
            self.minmax[name] = [np.float32(lo), np.float32(hi)]
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints per call
                self.hist.collect({name: value.reshape(-1)})

    def result(self):
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        if self.hist is None:
            data = {k: TensorData(lowest=np.array(v[0], np.float32), highest=np.array(v[1], np.float32))
                    for k, v in self.minmax.items()}
            return TensorsData(calibration_method("minmax"), data)
        with contextlib.redirect_stdout(io.StringIO()):
            raw = self.hist.compute_collection_result()
        data = {}
        for k, v in raw.items():
            if isinstance(v, TensorData):  # distribution: keep what the quantizer reads, drop histograms
                kw = {a: getattr(v, a) for a in ("lowest", "highest", "avg", "std") if hasattr(v, a)}
            else:
                kw = {"lowest": np.asarray(v[0], np.float32), "highest": np.asarray(v[1], np.float32)}
            data[k] = TensorData(**kw)
        return TensorsData(calibration_method(self.method), data)


def run(ctx: BuildContext) -> StageResult:
    import onnx
    from onnxruntime.quantization.calibrate import save_tensors_data

    if ctx.family == "causal-lm":
        return _lm_absmax(ctx)
    cal = ctx.config.calibration
    method, batch_size, max_length, percentile = cal.method, cal.batch_size, ctx.config.max_length, cal.percentile
    fp32 = ctx.path(Files.FP32)
    calib_path = cal.path
    recipe = ctx.static
    op_types = list(recipe.op_types)
    smoothing = ctx.smoothing

    data = for_build(ctx)
    samples = data.calibration_samples()
    key = {
        "model_sha256": sha256_file(fp32), "data_sha256": _samples_sha256(samples),
        "method": method, "percentile": percentile if method == "percentile" else None,
        "op_types": op_types, "max_length": max_length, "symmetric": recipe.activation_symmetric,
        "bias_correction": recipe.bias_correction, "absmax": smoothing.measured,
        # static SmoothQuant adds the ranges of the smoothed inputs of the nodes the recipe quantizes
        "static_smooth": {"alpha": recipe.smooth_alpha, "keep_float_after": list(recipe.keep_float_after),
                          "keep_float_first": recipe.keep_float_first} if smoothing.static else None,
    }
    ranges_path = ctx.path(Files.ranges(method))
    meta_path = ranges_path.with_suffix(".meta.json")
    means_path = ctx.path(Files.input_means(method))
    absmax_path = ctx.path(Files.absmax(method))
    # the per-channel statistics this build keeps beside its ranges, by their name in the cache
    stats = {name: path for name, path, wanted in (("means.npz", means_path, recipe.bias_correction),
                                                   ("absmax.npz", absmax_path, key["absmax"])) if wanted}
    for p in (means_path, absmax_path):
        p.unlink(missing_ok=True)  # only this run's statistics may sit beside this run's ranges
    # Shared by every build of this model under --out: a target that differs only in quantization
    # settings (types, per-channel, reduce_range, format) reuses the ranges.
    cache = Path(ctx.config.out) / ctx.model_name / ".cache" / "calibration" / sha256_json(key)[:32]
    settings = {"method": method, "samples": len(samples) if isinstance(samples, list) else
                len(next(iter(samples.values()))), "batch_size": batch_size, "max_length": max_length,
                "percentile": key["percentile"], "op_types": op_types, "data": calib_path}
    meta = _from_cache(cache, key, {"ranges.json": ranges_path, **stats}, meta_path)
    if meta is not None:
        ctx.calibration = CalibrationResult(
            method=method, ranges_path=ranges_path, means_path=means_path if "means.npz" in stats else None,
            absmax_path=absmax_path if "absmax.npz" in stats else None,
            static_smoothed=meta.get("metrics", {}).get("static_smoothed", []))
        return StageResult(settings=settings, outputs=[Files.ranges(method)], reused=True,
                           metrics={**meta.get("metrics", {}), "cache": str(cache)})

    model = onnx.load(str(fp32))
    names = tensors_to_calibrate(model, set(op_types))
    if not names:
        raise EdgeqError(f"the model has no {'/'.join(op_types)} nodes to calibrate for static quantization")
    # per-channel input means of the Conv/Gemm nodes, for the quantize stage's bias correction
    mean_names = set(bias_correction.correctable_inputs(model).values()) & set(names) \
        if recipe.bias_correction else set()
    means = bias_correction.MeanCollector()
    # per-channel |max| of the inputs of the nodes SmoothQuant may smooth (pipeline/ops/smooth.py)
    smooth_inputs = smooth.smoothable(model) if key["absmax"] else {}
    absmax = smooth.AbsMaxCollector()
    by_tensor: dict[str, list[str]] = {}
    for node, t in smooth_inputs.items():
        by_tensor.setdefault(t, []).append(node)
    names += [t for t in by_tensor if t not in names]
    collector = RangeCollector(method, percentile=percentile, symmetric=recipe.activation_symmetric)
    t0 = time.perf_counter()

    def fold(name, value):
        collector.add(name, value)
        if name in mean_names:
            means.add(name, value)
        if name in by_tensor:
            absmax.add(name, value)

    batches = _run_batches(ctx, model, names, data, samples, batch_size, fold, "calibration batch")
    del model
    per_tensor = absmax.result()
    per_node = {node: per_tensor[t] for t, nodes in by_tensor.items() for node in nodes}
    static_smoothed = _smoothed_ranges(ctx, fp32, recipe, per_node, data, samples, batch_size, collector.add) \
        if key["static_smooth"] else []
    ranges = collector.result()
    save_tensors_data(ranges, ranges_path)
    metrics = {"tensors": len(names), "batches": batches, "collect_seconds": round(time.perf_counter() - t0, 3)}
    if key["static_smooth"]:
        metrics["static_smoothed"] = static_smoothed
    if mean_names:
        np.savez(means_path, **means.result())
        metrics["input_means"] = len(mean_names)
    if by_tensor:
        smooth.save_npz(absmax_path, per_node)
        metrics["smoothing_inputs"] = len(smooth_inputs)
    # no timings in the file: it is part of the build, whose bytes must not depend on the clock
    meta_path.write_text(json.dumps({"key": key, "metrics": {k: v for k, v in metrics.items()
                                                             if k != "collect_seconds"}}, indent=2))
    _store(cache, {"ranges.json": ranges_path, "meta.json": meta_path, **stats})
    ctx.calibration = CalibrationResult(method=method, ranges_path=ranges_path,
                                        means_path=means_path if mean_names else None,
                                        absmax_path=absmax_path if by_tensor else None, static_smoothed=static_smoothed)
    return StageResult(settings=settings, outputs=[Files.ranges(method)], metrics=metrics)


def _lm_absmax(ctx: BuildContext) -> StageResult:
    """A causal LM's calibration: no activation ranges (its int8 is dynamic, its int4 weight-only),
    only the per-channel |max| of the inputs SmoothQuant smooths, for the dynamic artifact. Each
    calibration text runs as one prompt of at most --max-length tokens on an empty cache. Cached
    like the ranges, by model, tokens and statistic."""
    import onnx

    from edgeq.pipeline.runners.lm_runtime import KVModel

    calib_path = ctx.config.calibration.path
    rows = for_build(ctx).calibration_rows()
    fp32 = ctx.path(Files.FP32)
    key = {"model_sha256": sha256_file(fp32), "data_sha256": sha256_json([r.tolist() for r in rows]),
           "statistic": "smoothquant input absmax, causal LM"}
    absmax_path = ctx.path(Files.LM_ABSMAX)
    meta_path = absmax_path.with_suffix(".meta.json")
    absmax_path.unlink(missing_ok=True)
    cache = Path(ctx.config.out) / ctx.model_name / ".cache" / "calibration" / sha256_json(key)[:32]
    settings = {"samples": len(rows), "max_length": ctx.config.max_length, "data": calib_path,
                "statistics": "per-channel |max| of the inputs SmoothQuant smooths (dynamic int8)"}
    meta = _from_cache(cache, key, {"absmax.npz": absmax_path}, meta_path)
    if meta is not None:
        ctx.calibration = CalibrationResult(absmax_path=absmax_path)
        return StageResult(settings=settings, outputs=[Files.LM_ABSMAX], reused=True,
                           metrics={**meta.get("metrics", {}), "cache": str(cache)})

    model = onnx.load(str(fp32))
    by_tensor: dict[str, list[str]] = {}
    for node, t in smooth.smoothable(model).items():
        by_tensor.setdefault(t, []).append(node)
    names = list(by_tensor)
    sess = _probe_session(model, names, optimized=True)
    del model
    lm, absmax = KVModel(sess), smooth.AbsMaxCollector()
    t0 = time.perf_counter()
    for ids in ctx.track(rows, len(rows), "calibration text"):
        for n, v in zip(names, sess.run(names, lm.feeds(ids, lm.empty_past(1), 0))):
            absmax.add(n, v)
    per_tensor = absmax.result()
    absmax_path.parent.mkdir(parents=True, exist_ok=True)
    smooth.save_npz(absmax_path, {node: per_tensor[t] for t, nodes in by_tensor.items() for node in nodes})
    metrics = {"smoothing_inputs": len(names), "tokens": int(sum(r.shape[1] for r in rows)),
               "collect_seconds": round(time.perf_counter() - t0, 3)}
    meta_path.write_text(json.dumps({"key": key, "metrics": {k: v for k, v in metrics.items()
                                                             if k != "collect_seconds"}}, indent=2))
    _store(cache, {"absmax.npz": absmax_path, "meta.json": meta_path})
    ctx.calibration = CalibrationResult(absmax_path=absmax_path)
    return StageResult(settings=settings, outputs=[Files.LM_ABSMAX], metrics=metrics)


def _run_batches(ctx: BuildContext, model, names: list[str], data, samples, batch_size: int, fold, label: str) -> int:
    """Runs `model` (an in-memory ModelProto, changed here: `names` become graph outputs) over the
    calibration samples batch by batch, handing each named tensor to `fold(name, value)` at once.
    Returns the number of batches."""
    sess = _probe_session(model, names, optimized=False)  # ranges of the graph as saved
    calib_path = ctx.config.calibration.path
    batches = 0
    n_samples = len(samples) if isinstance(samples, list) else len(next(iter(samples.values())))
    for feeds in ctx.track(data.batches(samples, batch_size), -(-n_samples // batch_size), label):
        try:
            outs = sess.run(names, feeds)
        except Exception as e:  # the user's data does not fit the model (ids out of range, shapes...)
            raise EdgeqError(f"the model fails on calibration batch {batches + 1} of {calib_path}: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
        for n, v in zip(names, outs):
            fold(n, v)
        batches += 1
    return batches


def _probe_session(model, names: list[str], optimized: bool):
    """A CPU session over `model` (an in-memory ModelProto, changed here) with the tensors `names`
    added to its outputs. `optimized`: ORT's graph optimizations on (they keep graph outputs);
    off, the values are those of the graph exactly as saved."""
    import onnx
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # a failure is raised by the caller with its message; no coloured log line too
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _from_cache(cache: Path, key: dict, files: dict[str, Path], meta_path: Path) -> dict | None:
    """The cached run's meta when `cache` holds a run with this `key` and every file in `files` (name
    in the cache -> where this build wants it), those files then copied into place and the meta
    written to `meta_path`; None on a miss or a damaged cache (the caller recomputes)."""
    try:
        meta = json.loads((cache / "meta.json").read_text())
        if meta.get("key") != key or not all((cache / n).is_file() for n in files):
            return None
        for name, path in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache / name, path)
        meta_path.write_text(json.dumps(meta, indent=2))
        return meta
    except (OSError, json.JSONDecodeError):
        return None


def _smoothed_ranges(ctx: BuildContext, fp32: Path, recipe, absmax: dict[str, np.ndarray], data, samples,
                     batch_size: int, fold) -> list[str]:
    """Static SmoothQuant: smooths the nodes the static recipe quantizes, as the quantize stage will
    (same statistics, same alpha, so the same graph), and measures the ranges of their smoothed
    inputs in a second pass over the data. A second pass because only the min/max method could
    derive them from per-channel extremes; the histogram methods need the values. Returns the
    smoothed nodes (the quantize stage smooths exactly these)."""
    import onnx

    model = onnx.load(str(fp32))
    done = smooth.smooth(model, absmax, recipe.smooth_alpha, set(static_plan(model, recipe)[1]))
    if done:
        _run_batches(ctx, model, [smooth.smoothed_input(n) for n in done], data, samples, batch_size, fold,
                     "calibration batch, smoothed")
    return sorted(done)


def _store(cache: Path, files: dict[str, Path]) -> None:
    """Publish the files this run wrote (name in the cache -> path) to the shared cache
    atomically: a directory renamed into place whole."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        for name, path in files.items():
            if path.is_file():
                shutil.copyfile(path, tmp / name)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # the cache is an optimisation; the build goes on


def _samples_sha256(samples) -> str:
    if isinstance(samples, list):
        return sha256_json(samples)
    h = hashlib.sha256()
    for k in sorted(samples):
        h.update(k.encode() + str(samples[k].shape).encode() + str(samples[k].dtype).encode())
        h.update(np.ascontiguousarray(samples[k]).tobytes())
    return h.hexdigest()
