"""Stage 4, quantize: static int8 (calibrated activation ranges) and dynamic int8 (activation scales
computed at run time) with onnxruntime.quantization, every setting taken from the target profile.

Which nodes the static recipe quantizes and which it keeps float is ops/static_plan.py; the calls
into onnxruntime.quantization are ops/quantizer.py; what is smoothed the calibrate stage decided
(its CalibrationResult). Causal LMs get int4 weight-only (ops/int4.py) here too.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from edgeq.core import Artifact, BuildContext, EdgeqError, Files, StageResult, model_size_bytes
from edgeq.pipeline.ops import smooth
from edgeq.pipeline.ops.quantizer import as_file, check, quantize_dynamic_recipe, quantize_static_recipe
from edgeq.pipeline.ops.static_plan import static_plan


def run(ctx: BuildContext) -> StageResult:
    settings: dict = {}
    outputs: list[str] = []
    metrics: dict = {}
    # ORT's quantizer logs a pre-processing hint at WARNING even for pre-processed models in some cases
    logging.getLogger().setLevel(logging.ERROR)
    for mode, make in MODES.items():
        if mode in ctx.config.modes:
            before = len(ctx.artifacts)
            made = make(ctx)  # adds its artifact(s) to ctx.artifacts
            # (settings, metrics) of one artifact, or {artifact name: (settings, metrics)}
            for key, (s, m) in ({mode: made} if isinstance(made, tuple) else made).items():
                settings[key], metrics[key] = s, m
            outputs += [a.path for a in ctx.artifacts[before:]]
    return StageResult(settings=settings, outputs=outputs, metrics=metrics)


INT4_HOW = {
    "rtn": "round to nearest (onnxruntime.quantization.matmul_nbits_quantizer, DefaultWeightOnlyQuantConfig)",
    "hqq": "HQQ, half-quadratic optimisation of scales and zero points, no data "
           "(onnxruntime.quantization.matmul_nbits_quantizer, HQQWeightOnlyQuantConfig)",
    "kquant": "k-quant, llama.cpp's per-block scale search (onnxruntime.quantization.matmul_nbits_quantizer, "
              "KQuantWeightOnlyQuantConfig)",
    "gptq": "GPTQ on the calibration text, act-order with static groups (edgeq.pipeline.ops.weight_only)",
    "awq": "AWQ on the calibration text: activation-aware input scales folded into the norms and the MLP's "
           "up-projection, then a per-block clipping search (edgeq.pipeline.ops.weight_only)",
    "gguf": "the GGUF file's own Q4_1/Q8_0 grids repacked exactly (blocks of 32); weights off them rounded to nearest",
}


def _int4(ctx: BuildContext) -> dict[str, tuple[dict, dict]]:
    """One artifact per --int4-algo: `int4` for one, `int4-<algo>` for several."""
    import time

    from edgeq.pipeline.ops.int4 import quantize_weights

    cfg = ctx.config.int4
    rows = None
    made = {}
    for algo in cfg.algorithms:
        name = cfg.artifact(algo)
        out = ctx.path(Files.model(name))
        symmetric = cfg.symmetric_for(algo)
        if algo in ("gptq", "awq") and rows is None:
            from edgeq.calib.source import for_build

            rows = for_build(ctx).calibration_rows()
        t0 = time.perf_counter()
        try:
            counts = quantize_weights(ctx.path(Files.FP32), out, algo, cfg.block_size, symmetric, cfg.accuracy_level,
                                      embeddings=cfg.embeddings, head_bits=cfg.head_bits, rows=rows, track=ctx.track)
        except EdgeqError:
            raise
        except Exception as e:  # onnxruntime's quantizer failing on this graph: say which algorithm
            out.unlink(missing_ok=True)
            raise EdgeqError(f"int4 ({algo}): onnxruntime's quantizer fails on this model: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
        seconds = round(time.perf_counter() - t0, 2)
        if not counts["MatMulNBits"]:
            out.unlink(missing_ok=True)
            raise EdgeqError("int4: the model has no MatMul with a constant weight to quantize")
        check(out)
        settings = {"bits": 4, "algorithm": algo, "how": INT4_HOW[algo], "block_size": cfg.block_size,
                    "symmetric": symmetric if algo not in ("hqq", "kquant") else False,
                    "accuracy_level": cfg.accuracy_level, "embeddings": cfg.embeddings, "head_bits": cfg.head_bits,
                    "weights": "MatMul weights blocked along the input axis, the LM head at "
                               f"{cfg.head_bits} bits" + ("; token embeddings blocked along the hidden axis"
                                                           if cfg.embeddings else "")}
        if algo in ("gptq", "awq"):
            settings["calibration"] = {"data": ctx.config.calibration.path, "samples": len(rows),
                                       "tokens": int(sum(r.shape[1] for r in rows))}
        ctx.artifacts.append(Artifact(name=name, path=Files.model(name), precision="int4",
                                      recipe={"mode": "int4", **settings}))
        made[name] = (settings, {**counts, "size_bytes": model_size_bytes(out), "quantize_seconds": seconds})
    return made


def _nf4(ctx: BuildContext) -> tuple[dict, dict]:
    import time

    from edgeq.pipeline.ops.int4 import quantize_nf4

    cfg = ctx.config.int4
    out = ctx.path(Files.model("nf4"))
    t0 = time.perf_counter()
    counts = quantize_nf4(ctx.path(Files.FP32), out, cfg.block_size, cfg.accuracy_level, embeddings=cfg.embeddings,
                          head_bits=cfg.head_bits)
    if not counts["MatMulBnb4"]:
        out.unlink(missing_ok=True)
        raise EdgeqError("nf4: the model has no MatMul with a constant weight to quantize")
    check(out)
    settings = {"bits": 4, "data_type": "NF4 (4-bit NormalFloat, one absmax scale per block)",
                "quantizer": "onnxruntime.quantization.matmul_bnb4_quantizer.MatMulBnb4Quantizer",
                "block_size": cfg.block_size, "head_bits": cfg.head_bits, "embeddings": cfg.embeddings}
    ctx.artifacts.append(Artifact(name="nf4", path=Files.model("nf4"), precision="nf4",
                                  recipe={"mode": "nf4", **settings}))
    return settings, {**counts, "size_bytes": model_size_bytes(out),
                      "quantize_seconds": round(time.perf_counter() - t0, 2)}


def _static(ctx: BuildContext) -> tuple[dict, dict]:
    return _static_recipe(ctx, ctx.path(Files.FP32), "int8-static", ctx.calibration.ranges_path)


def _static_recipe(ctx: BuildContext, src: Path, name: str, ranges_path: Path, mode: str = "static",
                   extra_settings: dict | None = None) -> tuple[dict, dict]:
    """The target's static recipe on the fp32 graph at `src` with the activation ranges at
    `ranges_path`: int8-static from the export, int8-qat from the fine-tuned weights and learnt ranges."""
    import onnx

    r = ctx.static
    cal = ctx.calibration
    method = cal.method
    out = ctx.path(Files.model(name))
    # the nodes whose smoothed inputs the calibrate stage measured (calibrate._smoothed_ranges)
    smoothed = cal.static_smoothed
    model = onnx.load(str(src), load_external_data=bool(smoothed))  # smoothing rescales the weights
    kept, quantized = static_plan(model, r)
    if not quantized:
        raise EdgeqError(f"static int8: the model has no {'/'.join(r.op_types)} nodes to quantize")
    settings = {"format": r.format, "activation_type": r.activation_type, "weight_type": r.weight_type,
                "per_channel": r.per_channel, "reduce_range": r.reduce_range,
                "activation_symmetric": r.activation_symmetric, "weight_symmetric": r.weight_symmetric,
                "op_types": list(r.op_types),
                "calibration": method, "keep_float_after": list(r.keep_float_after),
                "bias_correction": r.bias_correction, "keep_float_first": r.keep_float_first}
    if smoothed:
        done = smooth.smooth(model, smooth.load_absmax(cal.absmax_path), r.smooth_alpha, set(smoothed))
        if sorted(done) != sorted(smoothed):
            raise EdgeqError("static int8: the calibration statistics do not match the model; "
                             "delete the build's .cache folder and build again")
        settings["smoothquant"] = {"alpha": r.smooth_alpha, "nodes": len(done)}
    with as_file(model if smoothed else src, out) as path:
        corrected = quantize_static_recipe(path, out, r, ranges_path, method,
                                           exclude=[k["node"] for k in kept], means_path=cal.means_path)
    skipped = _not_quantized(out, quantized)
    if len(skipped) == len(quantized):
        raise EdgeqError(f"static int8: ONNX Runtime's quantizer quantized none of the {len(quantized)} "
                         f"{'/'.join(r.op_types)} nodes (their inputs have no known type or range)")
    kept += [{"node": n, "op_type": next(x.op_type for x in model.graph.node if x.name == n),
              "reason": "ONNX Runtime's quantizer left it float (its input has no known type or range)"}
             for n in skipped]
    extra = {}
    if r.fallback == "dynamic":
        kept, extra = _dynamic_fallback(ctx, out, kept)
        settings["fallback"] = {"mode": "dynamic", "recipe": "[dynamic]", **extra.pop("settings")}
    settings.update(extra_settings or {})
    ctx.artifacts.append(Artifact(name=name, path=Files.model(name), precision="int8",
                                  recipe={"mode": mode, **settings, "kept_float": kept}))
    return settings, {"quantized_nodes": len(quantized) - len(skipped), "kept_float": kept, **corrected, **extra,
                      "size_bytes": model_size_bytes(out)}


def _not_quantized(path: Path, planned: list[str]) -> list[str]:
    """The planned nodes whose activation input is not fed by a DequantizeLinear in the static
    model at `path`: ORT's quantizer skips, with only a log line, a tensor whose type it does not
    know, so what the plan says is checked against what was made."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    return [name for name in planned if name in nodes and nodes[name].input
            and producer.get(nodes[name].input[0]) != "DequantizeLinear"]


def _dynamic_fallback(ctx: BuildContext, path: Path, kept: list[dict]) -> tuple[list[dict], dict]:
    """The static model's float leftovers -- the nodes the recipe kept out of static int8 and the
    op types QDQ cannot express (ORT's fused Attention, embeddings) -- quantized dynamically, in
    place: per-inference activation scales need no calibrated range, so the outliers that rule a
    static scale out do not apply, and smoothing (when on) tames them further. Int8 kernels in
    place of those fp32 nodes make the static artifact markedly faster, and with smoothing no less
    faithful (measured in the README, "What they become instead of fp32")."""
    import onnx

    model = onnx.load(str(path))
    nodes = _fallback_nodes(ctx, model, kept)
    if not nodes:
        return kept, {"settings": {"nodes": 0}}
    smoothed = _smooth(ctx, model, set(nodes))
    quantize_dynamic_recipe(model, path, ctx.target.dynamic, nodes=nodes)
    # what the dynamic quantizer actually changed: nodes it skipped (no constant weight) stay float
    after = {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}
    done = [n for n in nodes if n not in after]
    still = [k for k in kept if k["node"] not in set(done)]
    settings = {"nodes": len(done), **({"smoothquant": {"alpha": ctx.target.dynamic.smooth_alpha,
                                                        "nodes": len(smoothed)}} if smoothed else {})}
    return still, {"settings": settings, "dynamic_nodes": done}


def _fallback_nodes(ctx: BuildContext, model, kept: list[dict]) -> list[str]:
    """The nodes the dynamic fallback quantizes: of the [dynamic] recipe's op types, those the static
    recipe kept float and those of op types it does not quantize."""
    dyn_ops, static_ops = set(ctx.target.dynamic.op_types), set(ctx.static.op_types)
    kept_names = {k["node"] for k in kept}
    return [n.name for n in model.graph.node if n.name and n.op_type in dyn_ops
            and (n.name in kept_names or n.op_type not in static_ops)]


def _dynamic(ctx: BuildContext) -> tuple[dict, dict]:
    import onnx

    r = ctx.target.dynamic
    src = ctx.path(Files.FP32)
    out = ctx.path(Files.model("int8-dynamic"))
    settings = {"weight_type": r.weight_type, "per_channel": r.per_channel, "reduce_range": r.reduce_range,
                "op_types": list(r.op_types), "activations": "uint8, scale computed per inference"}
    smoothed = None
    if ctx.smoothing.dynamic:
        model = onnx.load(str(src))
        smoothed = _smooth(ctx, model, None, fold=True)  # dynamic int8 measures no range of a smoothed input
    if smoothed:
        settings["smoothquant"] = {"alpha": r.smooth_alpha, "nodes": len(smoothed)}
    quantize_dynamic_recipe(model if smoothed else src, out, r)
    ctx.artifacts.append(Artifact(name="int8-dynamic", path=Files.model("int8-dynamic"), precision="int8",
                                  recipe={"mode": "dynamic", **settings}))
    return settings, {"size_bytes": model_size_bytes(out), **({"smoothed": smoothed} if smoothed else {})}


def _smooth(ctx: BuildContext, model, nodes: set[str] | None, fold: bool = False) -> list[str] | None:
    """SmoothQuant on the dynamic int8 nodes of `model`, in place (pipeline/ops/smooth.py), with the
    statistics the calibrate stage measured; None when the build smooths no dynamic node."""
    path = ctx.calibration.absmax_path if ctx.smoothing.dynamic and ctx.calibration else None
    if not path or not Path(path).is_file():
        return None
    return smooth.smooth(model, smooth.load_absmax(path), ctx.target.dynamic.smooth_alpha, nodes, fold=fold)


def _qat(ctx: BuildContext) -> tuple[dict, dict]:
    """int8-qat: the Hugging Face model fine-tuned by distillation with the static recipe's fake
    quantization (pipeline/ops/qat.py), its weights written into the fp32 graph and its learnt
    activation ranges into a copy of the calibration cache, then the unchanged static recipe."""
    import time

    import numpy as np
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data

    from edgeq.calib.source import for_build
    from edgeq.pipeline.ops import qat

    r, cal, cfg = ctx.static, ctx.calibration, ctx.config.qat
    model = onnx.load(str(ctx.path(Files.FP32)))
    kept, quantized = static_plan(model, r)
    if not quantized:
        raise EdgeqError(f"qat: the model has no {'/'.join(r.op_types)} nodes to quantize")
    dynamic = set(_fallback_nodes(ctx, model, kept)) if r.fallback == "dynamic" else set()
    cache = load_tensors_data(cal.ranges_path)  # ORT's calibration cache, as the calibrate stage saved it
    ranges = {k: tuple(float(x) for x in v.range_value) for k, v in cache.items()}
    absmax = smooth.load_absmax(cal.absmax_path) if cal.absmax_path and Path(cal.absmax_path).is_file() else None
    t0 = time.perf_counter()
    result = qat.fine_tune(
        ctx.model_path, ctx.model.task or "feature-extraction", model, set(quantized), dynamic, ranges, absmax,
        static_alpha=r.smooth_alpha if cal.static_smoothed else None,
        dynamic_alpha=ctx.target.dynamic.smooth_alpha if ctx.smoothing.dynamic else None,
        smoothed_static=set(cal.static_smoothed), reduce_range=r.reduce_range, config=cfg,
        data=for_build(ctx), track=ctx.track, trust_remote_code=ctx.config.trust_remote_code)
    seconds = round(time.perf_counter() - t0, 1)
    tuned = ctx.path(Files.QAT_FP32)
    onnx.save(model, str(tuned))
    for k, (lo, hi) in result["ranges"].items():  # the learnt ranges replace the calibrated ones
        cache[k].lowest, cache[k].highest = np.array(lo, np.float32), np.array(hi, np.float32)
    ranges_path = ctx.path(Files.QAT_RANGES)
    save_tensors_data(cache, ranges_path)
    settings = {"qat": {"how": qat.HOW, "steps": cfg.steps, "lr": cfg.lr, "scale_lr": cfg.scale_lr,
                        "batch_size": cfg.batch_size, "seed": cfg.seed, "calibration_samples": result["samples"],
                        "fake_quantized_linears": result["sites"], "static": result["static"],
                        "learnt_ranges": len(result["ranges"]), "loss_first": result["loss_first"],
                        "loss_last": result["loss_last"], "seconds": seconds}}
    s, m = _static_recipe(ctx, tuned, "int8-qat", ranges_path, mode="qat", extra_settings=settings)
    return s, {**m, "qat_seconds": seconds}


def _qdq(ctx: BuildContext) -> tuple[dict, dict]:
    """int8-qdq: the user's own Q/DQ model (a QAT export, say) as given: the same nodes, scales and
    zero points (the user's decisions). Only a weight stored as float and quantized at every load
    (QuantizeLinear of a constant, as torch.onnx exports FakeQuantize) is quantized once here, by
    ONNX Runtime's QuantizeLinear, so the file holds int8 weights computing the same values."""
    import onnx

    from edgeq.pipeline.ops import qdq

    name = "int8-qdq"
    out = ctx.path(Files.model(name))
    model, folded = qdq.fold_weights(onnx.load(str(ctx.path(Files.GIVEN_QDQ))))
    onnx.save(model, str(out))
    check(out)
    facts = qdq.describe(model)
    types = set(facts["weight_types"]) | set(facts["activation_types"])
    precision = "int8" if types <= {"int8", "uint8"} else "+".join(sorted(types))
    settings = {"format": "QDQ", "how": "the given Q/DQ model, kept as it is (its own scales and zero points); "
                "weights stored as float quantized once at build time by ONNX Runtime's QuantizeLinear",
                "source": str(ctx.model_path), "weights_quantized_at_build": folded, **facts}
    ctx.artifacts.append(Artifact(name=name, path=Files.model(name), precision=precision,
                                  recipe={"mode": "qdq", **settings}))
    return settings, {"size_bytes": model_size_bytes(out)}


# mode -> the function making its artifact, in build order (the registry's `makes` for this stage)
MODES = {"static": _static, "dynamic": _dynamic, "qat": _qat, "qdq": _qdq, "int4": _int4, "nf4": _nf4}
