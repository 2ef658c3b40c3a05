"""Analytic bias correction of a static int8 QDQ model (Nagel et al., "Data-Free Quantization",
ICCV 2019, section 4.2, with the expectation measured on calibration data rather than inferred).

Rounding weights to int8 shifts every output channel's mean by dW . E[x], where dW is the weight's
rounding error and E[x] the mean of the node's input per input channel. A Conv or Gemm with a bias
can absorb that shift exactly: b <- b - dW . E[x]. On EfficientNet-Lite0 the shift is what costs
most of the static int8 top-1 agreement (depthwise convs have 9 weights per channel, so the error of
each one matters), and correcting it is free at run time.

Why by hand: onnxruntime.quantization has no bias correction. It is done here on the quantized
model, after the quantizer: dW comes from the int8 weights and scales ORT actually wrote, whatever
its rounding and range rules, and the new bias is re-quantized on the int32 grid ORT chose for it
(scale = input scale x weight scale), so nothing else in the graph changes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

OPS = ("Conv", "Gemm")


def correctable_inputs(model) -> dict[str, str]:
    """{node name: activation input} of the Conv/Gemm nodes with a constant weight and bias."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in OPS and len(n.input) >= 3 and n.input[1] in inits and n.input[2] in inits:
            if n.op_type == "Gemm" and _attr(n, "transA", 0):
                continue
            out[n.name] = n.input[0]
    return out


class MeanCollector:
    """Running per-channel means of activations (channel axis 1 for NCHW, last axis for 2-D)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        v = np.asarray(value, np.float64)
        if v.ndim == 2:
            s, c = v.sum(axis=0), v.shape[0]
        elif v.ndim >= 3:
            s, c = v.sum(axis=tuple(i for i in range(v.ndim) if i != 1)), v.size // v.shape[1]
        else:
            return
        self.sums[name] = self.sums.get(name, 0) + s
        self.counts[name] = self.counts.get(name, 0) + c

    def result(self) -> dict[str, np.ndarray]:
        return {k: (s / self.counts[k]).astype(np.float64) for k, s in self.sums.items()}


def correct(qdq_model, fp32_model, means: dict[str, np.ndarray], skip: set[str] = frozenset()) -> dict:
    """Correct, in place, the biases of the quantized Conv/Gemm nodes of `qdq_model` whose input
    means are known. `fp32_model` supplies the original weights (same node names). Returns counts
    and the largest correction relative to the bias scale."""
    inits = {i.name: i for i in qdq_model.graph.initializer}
    prod = {o: n for n in qdq_model.graph.node for o in n.output}
    f_inits = {i.name: i for i in fp32_model.graph.initializer}
    f_nodes = {n.name: n for n in fp32_model.graph.node}
    src = correctable_inputs(fp32_model)
    done, largest = 0, 0.0
    for n in qdq_model.graph.node:
        if n.op_type not in OPS or n.name in skip or n.name not in src or src[n.name] not in means:
            continue
        wdq = prod.get(n.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue  # weight not quantized: nothing to correct
        w = numpy_helper.to_array(f_inits[f_nodes[n.name].input[1]]).astype(np.float64)
        dw = _dequantize(wdq, inits) - w
        ex = np.asarray(means[src[n.name]], np.float64)
        delta = _output_shift(n, dw, ex)
        bdq = prod.get(n.input[2])
        if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits:
            bq = inits[bdq.input[0]]
            scale = numpy_helper.to_array(inits[bdq.input[1]]).astype(np.float64)
            b = numpy_helper.to_array(bq).astype(np.float64) * scale
            new = np.clip(np.round((b - delta) / scale), -2**31, 2**31 - 1).astype(np.int32)
            largest = max(largest, float(np.abs(delta / scale).max()))
            bq.CopyFrom(numpy_helper.from_array(new, bq.name))
        elif n.input[2] in inits:  # bias left in float by the quantizer
            bi = inits[n.input[2]]
            b = numpy_helper.to_array(bi)
            bi.CopyFrom(numpy_helper.from_array((b - delta).astype(b.dtype), bi.name))
        else:
            continue
        done += 1
    return {"corrected_nodes": done, "max_shift_in_bias_steps": round(largest, 1)}


def _output_shift(node, dw: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """dW . E[x] per output channel."""
    if node.op_type == "Gemm":
        return dw @ ex if _attr(node, "transB", 0) else ex @ dw
    group = _attr(node, "group", 1)
    cout, cin_g = dw.shape[0], dw.shape[1]
    per_in = dw.reshape(cout, cin_g, -1).sum(axis=2)           # [Cout, Cin/group]
    ex_g = ex.reshape(group, cin_g)[np.arange(cout) // (cout // group)]  # each output's input slice
    return (per_in * ex_g).sum(axis=1)


def _dequantize(dq, inits) -> np.ndarray:
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
          if len(dq.input) > 2 and dq.input[2] in inits else np.zeros_like(scale))
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[_attr(dq, "axis", 1)] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
