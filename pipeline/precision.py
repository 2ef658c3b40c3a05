"""Stage 5, precision: float16 artifacts, and hybrid int8 artifacts chosen against an accuracy budget.

fp16 (mode `fp16`): onnxruntime.transformers' converter, which knows the contrib ops of fused
transformer graphs (Attention, SkipLayerNormalization...) and inserts Cast nodes at the boundaries of
ops it keeps in fp32. Model inputs and outputs keep their fp32 type unless `--fp16-io` is given.

Hybrid (mode `hybrid`, `--max-accuracy-drop X`): start from full static int8 (every node the
target's recipe can quantize), measure each quantized node's sensitivity (the cosine lost when it
alone is quantized, on calibration samples), then take the most sensitive nodes back to higher
precision one at a time (fp16 islands where the target has fp16 compute, fp32 where it has none,
as on the x86 CPU EP) until 1 - cosine <= X. Every step's accuracy, latency and size is recorded;
the artifact is the fastest step within the budget.

With `--budget-metric task` and labelled evaluation data, a step meets the budget when its task
metric (accuracy, Spearman) is at most X below fp32's, measured on the even-indexed half of the
labelled set (the selection half; the evaluate stage reports on the whole set). Sensitivity is still
ranked by cosine: a task metric on a few hundred samples moves in steps too coarse to rank single
nodes. With `--budget-metric retrieval` (a retrieval --eval set), a step meets the budget when
1 - recall@10 against fp32's own ranking is at most X, on the even-indexed half of the queries
searching the whole corpus.
"""
from __future__ import annotations

import os
import shutil

from edgeq.core import Artifact, BuildContext, EdgeqError, Files, StageResult, model_size_bytes
from edgeq.metrics import pooled, retrieval_metrics, row_cosine, task_metric


def to_fp16(src, dst, keep_io_types: bool, op_block_list: list[str] | None = None) -> dict:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    kw = {"keep_io_types": keep_io_types}
    if op_block_list:
        kw["op_block_list"] = list(op_block_list)
    model.convert_float_to_float16(**kw)
    model.topological_sort()
    model.save_model_to_file(str(dst))
    onnx.checker.check_model(str(dst))
    g = model.model.graph
    fp16 = sum(1 for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT16)
    return {"casts": sum(1 for n in g.node if n.op_type == "Cast"), "fp16_initializers": fp16,
            "fp32_initializers": sum(1 for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT)}


def run(ctx: BuildContext) -> StageResult:
    settings: dict = {}
    outputs: list[str] = []
    metrics: dict = {}
    for mode, make in MODES.items():
        if mode in ctx.config.modes:
            settings[mode], metrics[mode] = make(ctx)  # each adds its artifact to ctx.artifacts
            outputs.append(ctx.artifacts[-1].path)
    return StageResult(settings=settings, outputs=outputs, metrics=metrics)


def _fp16(ctx: BuildContext) -> tuple[dict, dict]:
    cfg = ctx.config.fp16
    out = ctx.path(Files.model("fp16"))
    stats = to_fp16(ctx.path(Files.FP32), out, cfg.keep_io_types, cfg.op_block_list)
    settings = {"keep_io_types": cfg.keep_io_types, "op_block_list": cfg.op_block_list or "onnxruntime default",
                "converter": "onnxruntime.transformers OnnxModel.convert_float_to_float16"}
    ctx.artifacts.append(Artifact(name="fp16", path=Files.model("fp16"), precision="fp16",
                                  recipe={"mode": "fp16", **settings}))
    return settings, {**stats, "size_bytes": model_size_bytes(out)}


SELECTION_SAMPLES = 32  # calibration samples the search scores on (not the held-out set)


def _hybrid(ctx: BuildContext) -> tuple[dict, dict]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgeq.calib.source import for_build
    from edgeq.measure import run_runner
    from edgeq.pipeline.ops import hybrid
    from edgeq.pipeline.ops.quantizer import quantize_static_recipe
    from edgeq.pipeline.ops.static_plan import first_layers_kept_float

    budget = ctx.config.max_accuracy_drop
    r = ctx.static
    cal = ctx.calibration
    data = for_build(ctx)
    op_types = set(r.op_types)
    work = ctx.path("work/hybrid")
    work.mkdir(parents=True, exist_ok=True)
    full_path = work / "full-int8.onnx"
    # The recipe's first layers (keep_float_first, image models) start in float, as in int8-static:
    # a structural rule measured once, not re-derived from a noisy per-node ranking (started from
    # all-int8, the search keeps many convs float and can end slower than fp32; see the README,
    # "Image models from a PyTorch factory").
    first = [k["node"] for k in first_layers_kept_float(onnx.load(str(ctx.path(Files.FP32)), load_external_data=False),
                                                         op_types, r.keep_float_first)]
    quantize_static_recipe(ctx.path(Files.FP32), full_path, r, cal.ranges_path, cal.method, exclude=first,
                           means_path=cal.means_path)
    fp32, full = onnx.load(str(ctx.path(Files.FP32))), onnx.load(str(full_path))
    candidates = hybrid.quantized_nodes(full, op_types)
    if not candidates:
        raise EdgeqError(f"hybrid: the model has no {'/'.join(sorted(op_types))} nodes to quantize")
    # selection samples: calibration data, one sample per run as on a device
    samples = data.calibration_samples()
    sel = data.singles(samples, SELECTION_SAMPLES)

    wanted = [ctx.model.primary_output] if ctx.model.primary_output else None  # the output evaluate compares

    def outputs(model, feeds) -> np.ndarray:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([pooled(sess.run(wanted, f)[0].astype(np.float32), m) for f, m in feeds])

    ref = outputs(fp32, sel)

    def cosine(model) -> float:
        return float(row_cosine(outputs(model, sel), ref).mean())

    budget_metric = ctx.config.budget_metric
    task_sel = data.task_selection() if budget_metric in ("task", "retrieval") else None
    name = value = ref_value = None
    if task_sel is not None:
        tsel, tfeeds = task_sel
        task_ref = outputs(fp32, tfeeds)

        def task_value(model) -> tuple[float, float, str]:
            """(the model's task metric, fp32's, the metric's name) on the selection half; for the
            retrieval budget, recall@10 against fp32's own ranking (fp32's: 1)."""
            got = {"fp32": task_ref, "m": outputs(model, tfeeds)}
            if budget_metric == "retrieval":
                return retrieval_metrics(tsel, got)["m"]["recall@10_vs_fp32"], 1.0, "recall@10_vs_fp32"
            scores, how = task_metric(tsel, got, ctx.model.task, ctx.model.hf_config)
            return scores["m"], scores["fp32"], how["metric"]

    fp16 = bool(ctx.target.fp16_compute)
    higher = "fp16" if fp16 else "fp32"
    # sensitivity: the cosine each node costs when it alone is quantized
    sensitivity = []
    for n in ctx.track(candidates, len(candidates), "sensitivity"):
        alone = hybrid.revert(full, fp32, [c for c in candidates if c != n], op_types)
        sensitivity.append({"node": n, "op_type": next(x.op_type for x in full.graph.node if x.name == n),
                            "cosine_drop": round(1.0 - cosine(alone), 6)})
    sensitivity.sort(key=lambda s: -s["cosine_drop"])
    ranked = [s["node"] for s in sensitivity]
    steps = []
    for k in range(len(ranked) + 1):
        model = full if k == 0 else hybrid.revert(full, fp32, ranked[:k], op_types, fp16=fp16)
        path = work / f"step-{k:02d}.onnx"
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
        cos = cosine(model)
        step = {"step": k, "kept": ranked[:k], "cosine": round(cos, 6), "size_bytes": path.stat().st_size,
                "path": path}
        drop = 1 - cos
        if task_sel is not None:
            value, ref_value, name = task_value(model)
            drop = ref_value - value
            step.update({name: round(value, 6), f"{name}_fp32": round(ref_value, 6)})
        step["meets_budget"] = drop <= budget + 1e-12
        steps.append(step)
        ctx.log(f"  hybrid step {k}: {k} node(s) in {higher}, cosine {cos:.4f}"
                + (f", {name} {value:.4f} (fp32 {ref_value:.4f})" if task_sel is not None else ""))
        if step["meets_budget"]:
            break
    # latency of every step and fp32, interleaved in one process (the same runner as the benchmark)
    bcfg = ctx.config.benchmark
    lat = run_runner({"models": [str(ctx.path(Files.FP32))] + [str(s["path"]) for s in steps],
                      "inputs": str(data.bench_file(ctx.path(Files.BENCH_INPUTS))),
                      "threads": bcfg.threads or os.cpu_count(),
                      "warmup": min(bcfg.warmup, 5), "runs": max(5, bcfg.runs // 2)})
    if "results" not in lat:
        raise RuntimeError(f"hybrid: benchmarking the steps failed: {lat.get('error') or lat.get('unavailable')}")
    fp32_ms = lat["results"][0]["latency_p50_ms"]
    for s, res in zip(steps, lat["results"][1:]):
        s["latency_p50_ms"] = res["latency_p50_ms"]
        s["speedup_vs_fp32"] = round(fp32_ms / res["latency_p50_ms"], 3)
    within = [s for s in steps if s["meets_budget"]]
    if not within:  # everything back in float and still over budget: fp16, or a task metric's noise
        raise EdgeqError(f"hybrid: no step meets --max-accuracy-drop {budget} on {budget_metric} (best cosine "
                         f"{max(s['cosine'] for s in steps):.4f})")
    chosen = min(within, key=lambda s: s.get("latency_p50_ms", float("inf")))
    out = Files.model("int8-hybrid")
    shutil.copyfile(chosen["path"], ctx.path(out))
    drops = {s["node"]: s["cosine_drop"] for s in sensitivity}
    kept = [{"node": n, "precision": higher, "rank": i + 1,
             "reason": f"cosine drop {drops[n]:.4f} when quantized alone (rank {i + 1} of {len(ranked)})"}
            for i, n in enumerate(chosen["kept"])]
    curve = [{k: v for k, v in s.items() if k not in ("path", "kept")} | {"kept_nodes": len(s["kept"])}
             for s in steps]
    metric_text = ("cosine of pooled outputs vs fp32" if task_sel is None else
                   f"task metric ({name}) drop vs fp32 "
                   f"on the even-indexed half of the evaluation data ({len(task_sel[0])} samples)")
    settings = {"max_accuracy_drop": budget, "budget_metric": budget_metric, "metric": metric_text,
                "selection_samples": len(sel), "fallback_precision": higher, "candidates": len(candidates),
                "float_from_the_start": first,
                "recipe": "static int8 of the target, all candidate nodes, then greedy fallback by sensitivity"}
    ctx.artifacts.append(Artifact(name="int8-hybrid", path=out, precision=f"int8+{higher}",
                                  recipe={"mode": "hybrid", **settings, "kept": kept,
                                          "chosen_step": chosen["step"]}))
    for s in steps:  # keep only the chosen step and the full int8 model among the intermediates
        if s is not chosen:
            s["path"].unlink()
    return settings, {"sensitivity": sensitivity, "curve": curve, "chosen_step": chosen["step"], "kept": kept}


# mode -> the function making its artifact, in build order (the registry's `makes` for this stage)
MODES = {"fp16": _fp16, "hybrid": _hybrid}
