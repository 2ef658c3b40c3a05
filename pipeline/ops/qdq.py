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

from edgeq.pipeline.ops.hybrid import prune

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class NotStrippable(ValueError):
    """The Q/DQ graph has a quantized tensor that no float tensor stands for."""


_INT_TYPES = {"int8", "uint8", "int16", "uint16"}  # and int32, for a bias's DequantizeLinear


def _constants(model) -> dict:
    """name -> numpy array of the graph's initializers and Constant nodes' values."""
    from onnx import helper, numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # topological: an Identity's constant input is known before it
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.attribute:
            a = n.attribute[0]
            if a.name == "value":
                out[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                v = helper.get_attribute_value(a)
                out[n.output[0]] = np.array(v, np.float32 if "float" in a.name else np.int64)
        elif n.op_type == "Identity" and n.input[0] in out:  # torch.onnx shares equal constants through Identity
            out[n.output[0]] = out[n.input[0]]
    return out


def _attr(node, name, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _int_type(node, consts, producer=None) -> np.dtype:
    """The integer type of a Q/DQ node's quantized side: its zero point's type, else a
    QuantizeLinear's output_dtype (opset 21), else what feeds a DequantizeLinear, else uint8."""
    from onnx import helper

    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp in consts:
        return consts[zp].dtype
    if node.op_type == "QuantizeLinear":
        t = _attr(node, "output_dtype", 0)
        return np.dtype(helper.tensor_dtype_to_np_dtype(t)) if t else np.dtype(np.uint8)
    if node.input[0] in consts:
        return consts[node.input[0]].dtype
    src = (producer or {}).get(node.input[0])
    if src is not None and src.op_type == "Clip":
        src = producer.get(src.input[0])
    return _int_type(src, consts) if src is not None and src.op_type == "QuantizeLinear" else np.dtype(np.uint8)


def _params(node, consts, producer=None) -> tuple[np.ndarray, np.ndarray, int]:
    """(scale, zero point (zeros of the node's integer type where none is given), axis)."""
    scale = consts[node.input[1]]
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    zp = consts[zp_name] if zp_name else np.zeros(scale.shape, _int_type(node, consts, producer))
    return scale, zp, int(_attr(node, "axis", 1))


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear: (x - zero_point) * scale, per tensor or along `axis`."""
    x = x.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp) * scale.astype(np.float32)).astype(np.float32)


def _int_clip(node, consts, readers) -> bool:
    """An integer Clip with constant bounds between a QuantizeLinear and DequantizeLinears (what
    torch.onnx writes for a fake quantization to a narrower range, such as 0..127)."""
    return (node.op_type == "Clip" and all(i in consts for i in node.input[1:] if i)
            and bool(readers.get(node.output[0])) and all(r.op_type == "DequantizeLinear" for r in readers[node.output[0]]))


def unstrippable(model, consts: dict | None = None) -> str | None:
    """Why `strip` cannot take the Q/DQ nodes of `model` out (None where it can): control flow,
    opset below 13, a scale or zero point that is not a constant, a type other than (u)int8/(u)int16
    (int32 for biases), float16 scales, blocked quantization, a quantized tensor read by anything but
    a DequantizeLinear (through an integer Clip at most), a DequantizeLinear reading neither a
    constant nor a QuantizeLinear, or a pair whose two halves disagree on scale or zero point.
    `consts`: the model's _constants, where the caller has them."""
    from onnx import AttributeProto

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return f"opset {opset}: Q/DQ models of opset 13 or later are supported"
    flow = next((n for n in g.node if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in n.attribute)), None)
    if flow is not None:
        return f"{flow.op_type} {flow.name or flow.output[0]}: control flow (subgraphs) is not supported"
    consts = _constants(model) if consts is None else consts
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    for n in g.node:
        if n.op_type not in QDQ_OPS:
            continue
        label = f"{n.op_type} {n.name or n.output[0]}"
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if n.input[1] not in consts or (zp and zp not in consts):
            return f"{label}: its scale or zero point is not a constant"
        if consts[n.input[1]].dtype != np.float32:
            return f"{label}: {consts[n.input[1]].dtype} scales are not supported (float32 only)"
        if _attr(n, "block_size", 0):
            return f"{label}: blocked quantization is not supported"
        kind = str(_int_type(n, consts, producer))
        if kind not in _INT_TYPES and not (kind == "int32" and n.op_type == "DequantizeLinear" and n.input[0] in consts):
            return f"{label}: {kind} quantization is not supported ((u)int8 and (u)int16)"
        if n.op_type == "QuantizeLinear":
            rs = readers.get(n.output[0], [])
            other = sorted({r.op_type for r in rs if r.op_type != "DequantizeLinear" and not _int_clip(r, consts, readers)})
            if other or n.output[0] in outputs:
                return f"{label}: its integer output is read by {', '.join(other) or 'a graph output'}"
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "Clip" and _int_clip(q, consts, readers):
            q = producer.get(q.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            if n.input[0] not in consts:
                return f"{label}: it reads {n.input[0]!r}, neither a constant nor a QuantizeLinear's output"
            continue
        (qs, qz, qa), (ds, dz, da) = _params(q, consts, producer), _params(n, consts, producer)
        same_axis = qa == da or qs.size == 1
        if qs.shape != ds.shape or not np.array_equal(qs, ds) or not np.array_equal(qz, dz) or not same_axis:
            return f"{label}: its scale or zero point differs from its QuantizeLinear's"
    return None


def _clamp(q, clip, consts, producer) -> tuple[float, float] | None:
    """The float range a per-tensor Q -> [integer Clip ->] DQ pair clamps to, where it clamps more
    than a float tensor's own range would suggest: always after an integer Clip, else where the
    range starts at 0 (zero point at the bottom of the type: the ReLU/ReLU6 that ONNX Runtime's
    QDQ quantizer folds into such a range and deletes). None otherwise."""
    scale, zp, _ = _params(q, consts, producer)
    if scale.size != 1:
        return None
    info = np.iinfo(zp.dtype)
    lo, hi, z, s = info.min, info.max, int(zp.reshape(-1)[0]), float(scale.reshape(-1)[0])
    if clip is not None:
        bounds = [consts[i] if i else None for i in (list(clip.input[1:]) + ["", ""])[:2]]
        lo = max(lo, int(bounds[0].reshape(-1)[0])) if bounds[0] is not None else lo
        hi = min(hi, int(bounds[1].reshape(-1)[0])) if bounds[1] is not None else hi
    elif z != info.min:
        return None
    return float((lo - z) * s), float((hi - z) * s)


def strip(model):
    """A copy of the Q/DQ `model` with every QuantizeLinear/DequantizeLinear taken out (module
    docstring), and how many of each kind: {"activation_pairs", "clamping_pairs", "float_weights",
    "dequantized_weights"}. Raises NotStrippable for a graph `unstrippable` names a reason for."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    consts = _constants(model)
    why = unstrippable(model, consts)
    if why:
        raise NotStrippable(why)
    producer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}  # a DequantizeLinear's output -> the float tensor that replaces it
    new_inits, drop, clips = [], set(), {}
    counts = Counter()
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            drop.add(id(n))
        elif n.op_type == "DequantizeLinear":
            drop.add(id(n))
            q, clip = producer.get(n.input[0]), None
            if q is not None and q.op_type == "Clip":
                clip, q = q, producer.get(q.input[0])
                drop.add(id(clip))
            if q is None or q.op_type != "QuantizeLinear":  # a constant (unstrippable checked)
                scale, zp, axis = _params(n, consts, producer)
                values = dequantize(consts[n.input[0]], scale, zp, axis)
                new_inits.append(numpy_helper.from_array(values, n.output[0]))
                counts["dequantized_weights"] += 1
                continue
            span = None if q.input[0] in consts else _clamp(q, clip, consts, producer)
            if span is None:
                rename[n.output[0]] = q.input[0]
                counts["float_weights" if q.input[0] in consts else "activation_pairs"] += 1
                continue
            names = [f"{n.output[0]}/clip_{k}" for k in ("min", "max")]
            new_inits += [numpy_helper.from_array(np.array(v, np.float32), nm) for v, nm in zip(span, names)]
            clips[id(n)] = helper.make_node("Clip", [q.input[0], *names], [n.output[0]], name=f"{n.output[0]}/clip")
            counts["clamping_pairs"] += 1

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    # a Clip where its DequantizeLinear was: the order stays topological
    kept = [clips.get(id(n), n) for n in g.node if id(n) not in drop or id(n) in clips]
    for n in kept:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = resolve(i)
    # a graph output that was a DequantizeLinear's output keeps its name through an Identity
    extra = [helper.make_node("Identity", [resolve(o.name)], [o.name], name=f"{o.name}/qdq_removed")
             for o in g.output if o.name in rename]
    del g.node[:]
    g.node.extend(kept + extra)
    g.initializer.extend(new_inits)
    prune(model, ("Constant", "Identity"))  # scales, zero points, int8 weights: read only by the removed nodes
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
        out_type = helper.np_dtype_to_tensor_dtype(_int_type(n, consts))
        one = helper.make_model(helper.make_graph(
            [node], "fold", [], [helper.make_tensor_value_info("y", out_type, None)],
            [numpy_helper.from_array(consts[i], nm) for nm, i in zip(names, n.input) if i]),
            opset_imports=[helper.make_opsetid("", max(opset, 13))], ir_version=model.ir_version)
        y = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        folded.append(numpy_helper.from_array(y, n.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(folded)
    prune(model, ("Constant", "Identity"))  # the float weights, now unread
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
        if n.op_type != "DequantizeLinear" or n.input[1] not in consts:
            continue
        q = producer.get(n.input[0])
        if q is not None and q.op_type == "Clip":
            q = producer.get(q.input[0])
        weight = n.input[0] in consts or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in consts)
        scale, zp, _ = _params(n, consts, producer)
        dtype = str(zp.dtype)
        # symmetric: zero point 0 (signed types) or the middle of the range (unsigned)
        mid = (np.iinfo(zp.dtype).max + 1) // 2 if dtype.startswith("u") else 0
        sym = bool(np.all(zp.astype(np.int64) == mid))
        if weight and dtype == "int32":  # a bias, quantized with the input's scale times the weight's
            biases += 1
        elif weight:
            wts[dtype] += 1
            per_channel.add(scale.size > 1)
            symmetric_w.add(sym)
        else:
            act[dtype] += 1
            symmetric_a.add(sym)

    def one(s):  # per-channel: "mixed" where some weights are and some are not
        return next(iter(s)) if len(s) == 1 else "mixed" if s else None

    # symmetric only where every zero point is (an asymmetric range can land on the middle by chance)
    return {"quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "activation_types": dict(act), "weight_types": dict(wts), "quantized_biases": biases,
            "weight_per_channel": one(per_channel), "weight_symmetric": all(symmetric_w) if symmetric_w else None,
            "activation_symmetric": all(symmetric_a) if symmetric_a else None}
