"""Stage 4, quantize: static int8 (calibrated activation ranges) and dynamic int8 (activation scales
computed at run time) with onnxruntime.quantization, every setting taken from the target profile.

The static recipe keeps float the MatMuls whose activation input comes out of a GELU-family op
(profile key `keep_float_after`): those tensors carry token-wise outliers that no single static
per-tensor scale can represent (see targets/x86_64.toml and the README for the measurements).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edgeq.core import Artifact, BuildContext, EdgeqError, Files, StageResult, model_size_bytes



def nodes_kept_float(model, op_types, after_ops) -> list[dict]:
    """Nodes of `op_types` whose first (activation) input is produced by one of `after_ops`."""
    producer = {o: n for n in model.graph.node for o in n.output}
    kept = []
    for n in model.graph.node:
        if n.op_type in op_types and n.input and n.input[0] in producer:
            src = producer[n.input[0]]
            if src.op_type in after_ops:
                kept.append({"node": n.name, "op_type": n.op_type,
                             "reason": f"activation input comes from {src.op_type} (token-wise outliers)"})
    return kept


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def first_layers_kept_float(model, op_types, n: int) -> list[dict]:
    """The first `n` weighted nodes of `op_types` in graph order, each with the activations of
    `op_types` that directly follow it (a Conv kept without its Clip measured worse: the Clip's Q/DQ
    pair then quantizes the float conv's output anyway). At most a tenth of the weighted nodes: the
    rule is for deep networks, whose first layers are a small share of the work; a shallow model
    keeps every layer int8."""
    inits = {i.name for i in model.graph.initializer}
    weighted = [nd for nd in model.graph.node
                if nd.op_type in op_types and nd.op_type in WEIGHTED and len(nd.input) > 1 and nd.input[1] in inits]
    n = min(n, len(weighted) // 10)
    if n <= 0:
        return []
    first = weighted[:n]
    outs = {o for nd in first for o in nd.output}
    acts = [nd for nd in model.graph.node
            if nd.op_type in op_types and nd.op_type not in WEIGHTED and nd.input and nd.input[0] in outs]
    reason = f"among the first {n} weighted layers (keep_float_first)"
    return [{"node": nd.name, "op_type": nd.op_type, "reason": reason} for nd in first + acts]


def static_plan(model, recipe) -> tuple[list[dict], list[str]]:
    """The static recipe's split of `model`: the nodes it keeps out of static int8 (with why) and
    the names of the nodes it quantizes. The calibrate stage asks too: it smooths the latter."""
    kept = nodes_kept_float(model, set(recipe.op_types), set(recipe.keep_float_after))
    kept += [k for k in first_layers_kept_float(model, set(recipe.op_types), recipe.keep_float_first)
             if k["node"] not in {x["node"] for x in kept}]
    names = {k["node"] for k in kept}
    return kept, [n.name for n in model.graph.node if n.op_type in recipe.op_types and n.name not in names]


def run(ctx: BuildContext) -> StageResult:
    modes = ctx.config["modes"]
    settings: dict = {}
    outputs: list[str] = []
    metrics: dict = {}
    # ORT's quantizer logs a pre-processing hint at WARNING even for pre-processed models in some cases
    logging.getLogger().setLevel(logging.ERROR)
    if "static" in modes:
        s, m = _static(ctx)
        settings["static"], metrics["static"] = s, m
        outputs.append(Files.model("int8-static"))
    if "dynamic" in modes:
        s, m = _dynamic(ctx)
        settings["dynamic"], metrics["dynamic"] = s, m
        outputs.append(Files.model("int8-dynamic"))
    if "int4" in modes:
        s, m = _int4(ctx)
        settings["int4"], metrics["int4"] = s, m
        outputs.append(Files.model("int4"))
    return StageResult(settings=settings, outputs=outputs, metrics=metrics)


def _int4(ctx: BuildContext) -> tuple[dict, dict]:
    from edgeq.causal_lm import GGUF_BLOCK, quantize_int4, repack_gguf_grids

    cfg = ctx.config["int4"]
    out = ctx.path(Files.model("int4"))
    src = ctx.path(Files.FP32)
    repacked = {}
    if ctx.model_kind == "gguf":  # weights still on the GGUF's own grids: carried over exactly
        repacked = repack_gguf_grids(src, out, cfg["accuracy_level"])
        if repacked["q4_1_exact"] + repacked["q8_0_exact"]:
            src = out
    counts = quantize_int4(src, out, cfg["block_size"], cfg["symmetric"], cfg["accuracy_level"],
                           embeddings=cfg["embeddings"])
    counts.update(repacked)
    if not counts["MatMulNBits"]:
        raise EdgeqError("int4: the model has no MatMul with a constant weight to quantize")
    _check(out)
    settings = {"bits": 4, **cfg, "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                "weights": "MatMul weights blocked along the input axis"
                           + ("; token embeddings blocked along the hidden axis" if cfg["embeddings"] else "")}
    if repacked.get("q4_1_exact") or repacked.get("q8_0_exact"):
        settings["gguf_grids"] = (f"weights on the GGUF's Q4_1/Q8_0 grids repacked exactly (blocks of {GGUF_BLOCK}); "
                                  "the rest quantized as above")
    ctx.artifacts.append(Artifact(name="int4", path=Files.model("int4"), precision="int4",
                                  recipe={"mode": "int4", **settings}))
    return settings, {**counts, "size_bytes": model_size_bytes(out)}


def _static(ctx: BuildContext) -> tuple[dict, dict]:
    import onnx

    from edgeq.pipeline.ops.hybrid import quantize_static_recipe

    r = ctx.target.static_for(ctx.config.get("family"))
    method = ctx.config["calibration"]["method"]
    src = ctx.path(Files.FP32)
    out = ctx.path(Files.model("int8-static"))
    # the nodes whose smoothed inputs the calibrate stage measured (calibrate._smoothed_ranges)
    smoothed = ctx.facts.get("static_smoothed") or []
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
        from edgeq.pipeline.ops import smooth

        done = smooth.smooth(model, smooth.load_absmax(ctx.facts["absmax_path"]), r.smooth_alpha, set(smoothed))
        if sorted(done) != sorted(smoothed):
            raise EdgeqError("static int8: the calibration statistics do not match the model; "
                             "delete the build's .cache folder and build again")
        settings["smoothquant"] = {"alpha": r.smooth_alpha, "nodes": len(done)}
    with _as_file(model if smoothed else src, out) as path:
        corrected = quantize_static_recipe(path, out, r, ctx.facts["ranges_path"], method,
                                           exclude=[k["node"] for k in kept])
    extra = {}
    if r.fallback == "dynamic":
        kept, extra = _dynamic_fallback(ctx, out, kept)
        settings["fallback"] = {"mode": "dynamic", "recipe": "[dynamic]", **extra.pop("settings")}
    ctx.artifacts.append(Artifact(name="int8-static", path=Files.model("int8-static"), precision="int8",
                                  recipe={"mode": "static", **settings, "kept_float": kept}))
    return settings, {"quantized_nodes": len(quantized), "kept_float": kept, **corrected, **extra,
                      "size_bytes": model_size_bytes(out)}


def _dynamic_fallback(ctx: BuildContext, path: Path, kept: list[dict]) -> tuple[list[dict], dict]:
    """The static model's float leftovers -- the nodes the recipe kept out of static int8 and the
    op types QDQ cannot express (ORT's fused Attention, embeddings) -- quantized dynamically, in
    place: per-inference activation scales need no calibrated range, so the outliers that rule a
    static scale out do not apply, and smoothing (when on) tames them further. Measured on
    all-MiniLM-L6-v2 (x86_64, 2 threads): static with those nodes in fp32 1.14x fp32 at cosine
    0.9926; with them dynamic and smoothed about 1.5x at 0.996."""
    import onnx

    model = onnx.load(str(path))
    dyn_ops = set(ctx.target.dynamic.op_types)
    static_ops = set(ctx.target.static_for(ctx.config.get("family")).op_types)
    kept_names = {k["node"] for k in kept}
    nodes = [n.name for n in model.graph.node if n.name and n.op_type in dyn_ops
             and (n.name in kept_names or n.op_type not in static_ops)]
    if not nodes:
        return kept, {"settings": {"nodes": 0}}
    smoothed = _smooth(ctx, model, set(nodes))
    _quantize_dynamic(ctx, model, path, nodes=nodes)
    # what the dynamic quantizer actually changed: nodes it skipped (no constant weight) stay float
    after = {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}
    done = [n for n in nodes if n not in after]
    still = [k for k in kept if k["node"] not in set(done)]
    settings = {"nodes": len(done), **({"smoothquant": {"alpha": ctx.target.dynamic.smooth_alpha,
                                                        "nodes": len(smoothed)}} if smoothed else {})}
    return still, {"settings": settings, "dynamic_nodes": done}


def _dynamic(ctx: BuildContext) -> tuple[dict, dict]:
    import onnx

    r = ctx.target.dynamic
    src = ctx.path(Files.FP32)
    out = ctx.path(Files.model("int8-dynamic"))
    settings = {"weight_type": r.weight_type, "per_channel": r.per_channel, "reduce_range": r.reduce_range,
                "op_types": list(r.op_types), "activations": "uint8, scale computed per inference"}
    smoothed = None
    if ctx.facts.get("absmax_path"):
        model = onnx.load(str(src))
        smoothed = _smooth(ctx, model, None, fold=True)  # dynamic int8 measures no range of a smoothed input
    if smoothed:
        settings["smoothquant"] = {"alpha": r.smooth_alpha, "nodes": len(smoothed)}
    _quantize_dynamic(ctx, model if smoothed else src, out, nodes=None)
    ctx.artifacts.append(Artifact(name="int8-dynamic", path=Files.model("int8-dynamic"), precision="int8",
                                  recipe={"mode": "dynamic", **settings}))
    return settings, {"size_bytes": model_size_bytes(out), **({"smoothed": smoothed} if smoothed else {})}


def _smooth(ctx: BuildContext, model, nodes: set[str] | None, fold: bool = False) -> list[str] | None:
    """SmoothQuant on `model` in place (pipeline/smooth.py) when the calibrate stage measured the
    activations for it (it does when `smooth.wanted`); None when it does not apply."""
    from edgeq.pipeline.ops import smooth

    path = ctx.facts.get("absmax_path")
    if not path or not Path(path).is_file():
        return None
    return smooth.smooth(model, smooth.load_absmax(path), ctx.target.dynamic.smooth_alpha, nodes, fold=fold)


def _quantize_dynamic(ctx: BuildContext, model, out: Path, nodes: list[str] | None) -> None:
    """onnxruntime's quantize_dynamic with the target's [dynamic] recipe, on a model file or an
    in-memory model; `nodes` limits it to those nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.pipeline.ops.hybrid import QTYPE, QUANTIZER_OPTIONS

    r = ctx.target.dynamic
    with _as_file(model, out) as path:
        quantize_dynamic(str(path), str(out), op_types_to_quantize=list(r.op_types), per_channel=r.per_channel,
                         reduce_range=r.reduce_range, weight_type=getattr(QuantType, QTYPE[r.weight_type]),
                         nodes_to_quantize=nodes, extra_options=dict(QUANTIZER_OPTIONS))
    _check(out)


@contextlib.contextmanager
def _as_file(model, out: Path):
    """A path for onnxruntime's quantizers, which take files: `model` itself when it is one, else the
    in-memory model saved beside `out` under a hidden name, deleted afterwards."""
    if isinstance(model, (str, Path)):
        yield Path(model)
        return
    import onnx

    tmp = out.with_name(f".{out.stem}.src.onnx")
    try:
        onnx.save(model, str(tmp))
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))
