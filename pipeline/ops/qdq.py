"""A user's own Q/DQ model (for example a QAT model exported by torch.onnx with FakeQuantize as
QuantizeLinear/DequantizeLinear): its float reference, and what its quantization is.

The build keeps the given graph as it is (artifact `int8-qdq`, its scales respected) and needs a
float model beside it, for the fp32 artifact every artifact is compared with and for any other mode
built from it. `strip` makes that model by taking the Q/DQ nodes out: an activation's
QuantizeLinear -> DequantizeLinear pair becomes the float tensor it quantized (clamped where its
range starts at 0, the ReLU/ReLU6 ONNX Runtime's quantizer folds into such a range), a weight's
DequantizeLinear of a constant becomes a float constant (its de-quantized values: the weights the
Q/DQ model computes with), and a weight's QuantizeLinear -> DequantizeLinear of a float constant
(what torch.onnx writes for a fake-quantized weight) becomes that float constant (the latent QAT
weights). Written by hand: onnxruntime.quantization only goes the other way (its qdq_loss_debug
matches a float and a Q/DQ model but needs both).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class NotStrippable(ValueError):
    """The Q/DQ graph has a quantized tensor that no float tensor stands for."""


def _constants(model) -> dict:
    """name -> numpy array of the graph's initializers and Constant nodes' values."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # topological: an Identity's constant input is known before it
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in out:  # torch.onnx shares equal constants through Identity
            out[n.output[0]] = out[n.input[0]]
    return out


def _attr(node, name, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear: (x - zero_point) * scale, per tensor or along `axis`."""
    x = x.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp) * scale.astype(np.float32)).astype(np.float32)


def unstrippable(model) -> str | None:
    """Why `strip` cannot take the Q/DQ nodes of `model` out (None where it can): a quantized
    tensor read by anything but a DequantizeLinear, a DequantizeLinear reading neither a constant nor
    a QuantizeLinear's output, or one with a non-constant scale or blocked quantization."""
    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    outputs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        label = n.name or n.output[0]
        if n.op_type == "QuantizeLinear":
            other = sorted({r for r in readers.get(n.output[0], []) if r != "DequantizeLinear"})
            if other or n.output[0] in outputs:
                return f"QuantizeLinear {label}: its integer output is read by {', '.join(other) or 'a graph output'}"
        elif n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if _attr(n, "block_size", 0):
                return f"DequantizeLinear {label}: blocked quantization is not supported"
            if not (q is not None and q.op_type == "QuantizeLinear") and n.input[0] not in consts:
                return f"DequantizeLinear {label}: it reads {n.input[0]!r}, neither a constant nor a QuantizeLinear's output"
            if n.input[0] in consts and n.input[1] not in consts:
                return f"DequantizeLinear {label}: its scale is not a constant"
    return None


def _range_floor(q, consts) -> tuple[float, float] | None:
    """(0, top of the range) for a QuantizeLinear whose range starts at 0 (zero point at the bottom
    of its integer type: everything below 0 saturates), else None."""
    scale = consts.get(q.input[1])
    zp = consts.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or scale.size != 1:
        return None
    info = np.iinfo(zp.dtype if zp is not None else np.uint8)
    z = int(zp.reshape(-1)[0]) if zp is not None else 0
    if z != info.min:
        return None
    return 0.0, float((info.max - z) * float(scale.reshape(-1)[0]))


def strip(model):
    """A copy of the Q/DQ `model` with every QuantizeLinear/DequantizeLinear taken out (module
    docstring), and how many of each kind: {"activation_pairs", "clamping_pairs", "float_weights",
    "dequantized_weights"}.
    Raises NotStrippable for a graph `unstrippable` names a reason for."""
    import onnx
    from onnx import helper, numpy_helper

    why = unstrippable(model)
    if why:
        raise NotStrippable(why)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    consts = _constants(model)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}  # a DequantizeLinear's output -> the float tensor that replaces it
    new_inits, drop, clips = [], set(), []
    counts = Counter()
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            drop.add(id(n))
        elif n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            floor = _range_floor(q, consts) if q is not None and q.op_type == "QuantizeLinear" else None
            if floor is not None and q.input[0] not in consts:
                # the range starts at 0: the pair also clamps, as the ReLU or ReLU6 that ONNX Runtime's
                # QDQ quantizer removes when its output range implies it -- keep the clamp, or the
                # reference computes a different function
                lo, hi = floor
                names = [f"{n.output[0]}/clip_{k}" for k in ("min", "max")]
                new_inits += [numpy_helper.from_array(np.array(v, np.float32), nm) for v, nm in zip((lo, hi), names)]
                clips.append(helper.make_node("Clip", [q.input[0], *names], [n.output[0]], name=f"{n.output[0]}/clip"))
                counts["clamping_pairs"] += 1
            elif q is not None and q.op_type == "QuantizeLinear":
                rename[n.output[0]] = q.input[0]
                counts["float_weights" if q.input[0] in consts else "activation_pairs"] += 1
            else:  # a constant (unstrippable checked)
                zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                values = dequantize(consts[n.input[0]], consts[n.input[1]], zp, int(_attr(n, "axis", 1)))
                new_inits.append(numpy_helper.from_array(values, n.output[0]))
                counts["dequantized_weights"] += 1
            drop.add(id(n))

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    by_output = {c.output[0]: c for c in clips}
    kept = []
    for n in g.node:  # a Clip where its DequantizeLinear was: the order stays topological
        if id(n) not in drop:
            kept.append(n)
        elif n.output[0] in by_output:
            kept.append(by_output[n.output[0]])
    for n in kept:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = resolve(i)
    # a graph output that was a DequantizeLinear's output keeps its name through an Identity
    extra = [helper.make_node("Identity", [resolve(o)], [o], name=f"{o}/qdq_removed")
             for o in outputs if o in rename]
    del g.node[:]
    g.node.extend(kept + extra)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input} | outputs
    # Constant nodes and initializers only the removed nodes read (scales, zero points, int8 weights)
    live = [n for n in g.node if not (n.op_type in ("Constant", "Identity") and not set(n.output) & used)]
    del g.node[:]
    g.node.extend(live)
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]  # shapes of removed tensors; shape inference writes them again
    return model, dict(counts)


def fold_weights(model) -> tuple[object, int]:
    """A copy of `model` with each QuantizeLinear of a float constant (a fake-quantized weight as
    torch.onnx exports it: the float weights are stored, and quantized at every load) replaced by its
    integer result, computed once by ONNX Runtime's own QuantizeLinear so the values are the ones the
    given graph computes; the DequantizeLinear after it is left as it is. The file then holds int8
    weights, not float ones: a quarter of the size. Returns (model, how many were folded)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts = _constants(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    folded, kept = [], []
    for n in model.graph.node:
        inputs = [i for i in n.input if i]
        if n.op_type != "QuantizeLinear" or not all(i in consts for i in inputs) or consts[inputs[0]].dtype.kind != "f":
            kept.append(n)
            continue
        names = [f"i{k}" for k in range(len(n.input))]
        node = helper.make_node("QuantizeLinear", [nm if i else "" for nm, i in zip(names, n.input)], ["y"])
        node.attribute.extend(n.attribute)
        one = helper.make_model(helper.make_graph(
            [node], "fold", [], [helper.make_tensor_value_info("y", numpy_helper.from_array(consts[inputs[-1]]).data_type
                                                               if len(inputs) > 2 else onnx.TensorProto.UINT8, None)],
            [numpy_helper.from_array(consts[i], nm) for nm, i in zip(names, n.input) if i]),
            opset_imports=[helper.make_opsetid("", max(opset, 13))], ir_version=model.ir_version)
        y = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        folded.append(numpy_helper.from_array(y, n.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(folded)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    inits = [i for i in model.graph.initializer if i.name in used]  # the float weights, now unread
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    live = [n for n in model.graph.node if not (n.op_type in ("Constant", "Identity") and not set(n.output) & used)]
    del model.graph.node[:]
    model.graph.node.extend(live)
    return model, len(folded)


def describe(model) -> dict:
    """What a Q/DQ model's quantization is, from its own nodes: counts, the integer types of
    activations and weights, how many biases are quantized (int32), whether weight scales are per
    channel and zero points symmetric."""
    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    ops = Counter(n.op_type for n in model.graph.node)
    act, wts, biases = Counter(), Counter(), 0
    per_channel, symmetric_w, symmetric_a = set(), set(), set()
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producer.get(n.input[0])
        weight = n.input[0] in consts or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in consts)
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        zp = consts.get(zp_name) if zp_name else None
        dtype = str(zp.dtype) if zp is not None else str(consts[n.input[0]].dtype) if n.input[0] in consts else "uint8"
        scale = consts.get(n.input[1])
        # symmetric: zero point 0 (int types) or the middle of the range (128 for uint8)
        sym = zp is None or bool(np.all(zp.astype(np.int64) == (128 if dtype == "uint8" else 0)))
        if weight and dtype == "int32":  # a bias, quantized with the input's scale times the weight's
            biases += 1
        elif weight:
            wts[dtype] += 1
            per_channel.add(scale is not None and scale.size > 1)
            symmetric_w.add(sym)
        else:
            act[dtype] += 1
            symmetric_a.add(sym)

    def one(s):
        return next(iter(s)) if len(s) == 1 else "mixed" if s else None

    return {"quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "activation_types": dict(act), "weight_types": dict(wts), "quantized_biases": biases,
            "weight_per_channel": one(per_channel), "weight_symmetric": one(symmetric_w),
            "activation_symmetric": one(symmetric_a)}
