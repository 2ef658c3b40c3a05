"""The one wrapper over onnxruntime.quantization: a target's static and dynamic recipes become
quantize_static / quantize_dynamic calls with the same options everywhere (the quantize stage, the
dynamic fallback, the hybrid search's full int8 model), and the one table of calibration methods.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import onnx
from onnx import TensorProto

QTYPE = {"int8": "QInt8", "uint8": "QUInt8"}
# Options every quantizer call gets. DefaultTensorType: the fused graph has contrib ops (Attention,
# SkipLayerNormalization) whose outputs ONNX shape inference cannot type; without a default the
# quantizer fails its type lookup. MatMulConstBOnly: only MatMuls with a constant weight;
# activation x activation MatMuls (attention scores in unfused graphs) are the most sensitive and
# gain little.
QUANTIZER_OPTIONS = {"DefaultTensorType": TensorProto.FLOAT, "MatMulConstBOnly": True}
# edgeq's calibration method names (targets' `calibration`, --calib-method) -> ORT's CalibrationMethod
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile",
                       "distribution": "Distribution"}


def calibration_method(name: str):
    """onnxruntime.quantization's CalibrationMethod for one of CALIBRATION_METHODS."""
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, CALIBRATION_METHODS[name])


def quantize_static_recipe(src: Path, out: Path, recipe, ranges_path: Path, method: str,
                           exclude: list[str] = (), means_path: Path | None = None) -> dict:
    """onnxruntime.quantization.quantize_static with a target's static recipe and calibrated ranges
    (ORT's calibration cache file), then the recipe's bias correction from the per-channel input
    means in `means_path` (when given). Returns the bias correction's counts (empty when off)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra = {**QUANTIZER_OPTIONS, "ActivationSymmetric": recipe.activation_symmetric,
             "WeightSymmetric": recipe.weight_symmetric}
    if recipe.reduce_range and recipe.per_channel:
        overrides = depthwise_full_range(onnx.load(str(src), load_external_data=False))
        if overrides:
            extra["TensorQuantOverrides"] = overrides
    quantize_static(
        str(src), str(out), calibration_data_reader=None, calibration_cache_path=str(ranges_path),
        calibrate_method=calibration_method(method),
        quant_format=getattr(QuantFormat, recipe.format), op_types_to_quantize=list(recipe.op_types),
        per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
        activation_type=getattr(QuantType, QTYPE[recipe.activation_type]),
        weight_type=getattr(QuantType, QTYPE[recipe.weight_type]),
        nodes_to_exclude=list(exclude), extra_options=extra,
    )
    stats = {}
    if recipe.bias_correction and means_path is not None and Path(means_path).is_file():
        import numpy as np

        from edgeq.pipeline.ops import bias_correction

        with np.load(means_path) as z:
            means = {k: z[k] for k in z.files}
        model = onnx.load(str(out))
        stats = bias_correction.correct(model, onnx.load(str(src)), means)
        onnx.save(model, str(out))
    check(out)
    return stats


def depthwise_full_range(model) -> dict:
    """TensorQuantOverrides giving depthwise Conv weights the full 8-bit range under reduce_range.

    reduce_range (7-bit weights) exists for the x86 GEMM kernels without VNNI, whose u8 x s8 pair
    sums saturate int16; depthwise convolutions run a direct kernel without that problem, and their
    few weights per channel are the ones 7 bits hurt most (measured in the README, "Depthwise
    weights on 8 bits"). "axis" must be repeated, or the override silently makes the weight
    per-tensor."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        dims = inits[n.input[1]].dims
        if group > 1 and len(dims) == 4 and dims[1] == 1 and dims[0] == group:
            out[n.input[1]] = [{"axis": 0, "reduce_range": False}]
    return out


def quantize_dynamic_recipe(model, out: Path, r, nodes: list[str] | None = None) -> None:
    """onnxruntime's quantize_dynamic with a target's [dynamic] recipe `r`, on a model file or an
    in-memory model; `nodes` limits it to those nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with as_file(model, out) as path:
        quantize_dynamic(str(path), str(out), op_types_to_quantize=list(r.op_types), per_channel=r.per_channel,
                         reduce_range=r.reduce_range, weight_type=getattr(QuantType, QTYPE[r.weight_type]),
                         nodes_to_quantize=nodes, extra_options=dict(QUANTIZER_OPTIONS))
    check(out)


@contextlib.contextmanager
def as_file(model, out: Path):
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


def check(path: Path) -> None:
    onnx.checker.check_model(str(path))
