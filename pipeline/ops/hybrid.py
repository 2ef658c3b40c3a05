"""Graph surgery for hybrid precision: take nodes of a QDQ int8 model back to float (fp32), or into
fp16 islands, without re-running the quantizer.

Why by hand: onnxruntime.quantization can only quantize a chosen node set from scratch (seconds per
call, and the sensitivity search needs one model per node and per step), and
onnxruntime.transformers' fp16 converter works the other way round (everything fp16 except a block
list), which for a few islands leaves dozens of Cast pairs and, with contrib ops, an unsorted graph.
Both operations here are protobuf edits: milliseconds.

A QDQ node `n` looks like  X -> Q -> DQ -> n <- DQ <- W_int8 ; reverting it rewires n to X and to the
fp32 weight from the fp32 model (same node names in both), then drops Q/DQ nodes and initializers
nothing uses any more.
"""
from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper, numpy_helper

# Inputs that carry shapes, sizes, indices or scales: never cast to fp16 (they must keep their type,
# and a float scale/ROI of Resize is declared float32 by the op).
SHAPE_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3},
    "Resize": {1, 2, 3}, "Upsample": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "TopK": {1},
    "Gather": {1}, "GatherElements": {1}, "ScatterND": {1}, "Split": {1}, "Squeeze": {1}, "Unsqueeze": {1},
    "ReduceSum": {1}, "ReduceMean": {1}, "OneHot": {1}, "CumSum": {1},
}
# Ops whose fp16 form is a drop-in (same inputs, outputs follow the input type).
FLOAT16_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Mul", "Sub", "Div", "Relu", "Sigmoid",
               "Tanh", "Softmax", "Gelu", "BiasGelu", "FastGelu", "LayerNormalization", "Transpose", "Reshape",
               "Resize", "Upsample", "Slice", "Expand", "Concat", "Squeeze", "Unsqueeze", "Pad", "MaxPool",
               "AveragePool", "GlobalAveragePool", "Clip", "HardSigmoid", "HardSwish", "Tile", "Flatten"}


def _producers(model) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def quantized_nodes(qdq_model, op_types) -> list[str]:
    """Nodes of `op_types` whose first input comes out of a DequantizeLinear."""
    prod = _producers(qdq_model)
    return [n.name for n in qdq_model.graph.node if n.op_type in op_types and n.input
            and n.input[0] in prod and prod[n.input[0]].op_type == "DequantizeLinear"]


def revert(qdq_model, fp32_model, names, op_types, fp16: bool = False):
    """A copy of `qdq_model` with the nodes `names` computing in float again (fp16 islands when
    `fp16`); the fp32 model supplies their original inputs and weights. `op_types`: the op types the
    quantizer was asked to quantize (their nodes are the ones that need their Q/DQ pairs)."""
    model = copy.deepcopy(qdq_model)
    names = set(names)
    still_quantized = set(quantized_nodes(model, set(op_types))) - names
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
    have = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in names:
            continue
        orig = fp32_nodes[node.name]
        del node.input[:]
        node.input.extend(orig.input)
        producer = _producers(model)
        # ORT's QDQ format puts one Q -> DQ pair on a tensor for all its consumers (and on the
        # node's output too, so it can become a QLinear kernel). Once no quantized node reads a
        # pair, every consumer reads the float tensor again and the pair is pruned -- unless a
        # still-quantized node produces the tensor: its real output is the quantized one, and
        # when the quantizer folded a Clip/Relu into that Q's range, the float tensor is the
        # un-clipped value, and reading it wrecks the output (measured in the README, "Hybrid precision").
        for t in list(orig.input) + list(node.output):
            from_quantized = t in producer and producer[t].name in still_quantized
            for q in [c for c in consumers.get(t, []) if c.op_type == "QuantizeLinear"]:
                for dq in [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
                    readers = consumers.get(dq.output[0], [])
                    if from_quantized:
                        node.input[:] = [dq.output[0] if i == t else i for i in node.input]
                    elif not any(c.name in still_quantized for c in readers):
                        for c in readers:
                            c.input[:] = [t if i == dq.output[0] else i for i in c.input]
        produced = {o for n in model.graph.node for o in n.output}
        for idx, t in enumerate(orig.input):
            if t not in fp32_inits:
                continue
            if t in produced:
                # the quantizer named a DequantizeLinear output after the float tensor it replaces
                # (a Gemm/Conv bias): the float copy needs another name, or the graph defines it twice
                twin = f"{t}_float"
                node.input[idx] = twin
                if twin not in have:
                    init = copy.deepcopy(fp32_inits[t])
                    init.name = twin
                    model.graph.initializer.append(init)
                    have.add(twin)
            elif t not in have:
                model.graph.initializer.append(fp32_inits[t])
                have.add(t)
    # Outputs too: the quantizer renames a node's output when it removes the Clip/Relu after it
    # (the node then writes the activation's output name) or puts Q/DQ on a graph output.
    for node in model.graph.node:
        if node.name not in names:
            continue
        orig = fp32_nodes[node.name]
        for old_name, new_name in zip(list(node.output), orig.output):
            if old_name == new_name:
                continue
            for q in [c for c in consumers.get(old_name, []) if c.op_type == "QuantizeLinear"]:
                for dq in [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
                    if new_name in dq.output:  # the pair re-made new_name; the float node makes it now
                        model.graph.node.remove(dq)
                        model.graph.node.remove(q)
        node.output[:] = list(orig.output)
    prune(model)  # first: a dead Q reading a renamed output must not make its producer come back
    _restore_missing(model, fp32_model)
    prune(model)  # before sorting: Q/DQ pairs left reading a renamed output are dead, not cycles
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).topological_sort()  # restored activations were appended at the end
    if fp16:
        to_fp16_islands(model, names)
    return model


def _restore_missing(model, fp32_model) -> None:
    """Re-add fp32 nodes whose outputs a reverted node reads but the QDQ graph no longer has. ORT's
    quantizer removes a Clip/Relu after a quantized Conv (the output's quantization range then clips
    instead); a node taken back to float reads the activation's output again, so the activation must
    come back."""
    g = model.graph
    fp32_producer = {o: n for n in fp32_model.graph.node for o in n.output}
    fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
    while True:
        defined = ({o for n in g.node for o in n.output} | {i.name for i in g.initializer}
                   | {i.name for i in g.input})
        missing = [t for n in g.node for t in n.input if t and t not in defined]
        if not missing:
            return
        for t in dict.fromkeys(missing):
            if t in fp32_inits:
                g.initializer.append(fp32_inits[t])
            elif t in fp32_producer:
                g.node.append(copy.deepcopy(fp32_producer[t]))
            else:
                raise ValueError(f"hybrid: tensor {t} has no producer in the fp32 model either")


def prune(model, op_types=("QuantizeLinear", "DequantizeLinear")) -> None:
    """Drop nodes of `op_types` whose outputs nobody reads (and that are not graph outputs), until
    nothing changes, then unused initializers (and their graph-input entries, where a model lists
    initializers as inputs)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in op_types and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input} | outputs
    gone = {i.name for i in model.graph.initializer if i.name not in used}
    for init in [i for i in model.graph.initializer if i.name in gone]:
        model.graph.initializer.remove(init)
    for entry in [i for i in model.graph.input if i.name in gone]:
        model.graph.input.remove(entry)


def to_fp16_islands(model, names) -> None:
    """Compute the nodes `names` in fp16: float inputs cast to fp16 at the island's edge (weights
    converted once), outputs cast back to fp32 for consumers outside the island; a tensor passing
    between two island nodes stays fp16. Shape-carrying inputs are never cast."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    island = [n for n in g.node if n.name in names]
    island_names = {n.name for n in island}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    fp16_name: dict[str, str] = {}  # fp32 tensor -> its fp16 twin
    is_fp16: set[str] = set()
    new_nodes = []
    for node in island:
        if node.op_type not in FLOAT16_OPS:
            raise ValueError(f"{node.name}: {node.op_type} is not supported in an fp16 island")
        skip = SHAPE_INPUTS.get(node.op_type, set())
        for idx, t in enumerate(node.input):
            if not t or idx in skip or t in is_fp16:
                continue
            if t in inits:
                init = inits[t]
                if init.data_type != TensorProto.FLOAT:
                    continue
                twin = f"{t}_fp16"
                if twin not in inits:
                    arr = numpy_helper.to_array(init).astype("float16")
                    inits[twin] = numpy_helper.from_array(arr, twin)
                    g.initializer.append(inits[twin])
                node.input[idx] = twin
                continue
            if t not in fp16_name:
                fp16_name[t] = f"{t}_to_fp16"
                is_fp16.add(fp16_name[t])
                new_nodes.append(helper.make_node("Cast", [t], [fp16_name[t]], name=f"{t}_cast_fp16",
                                                  to=TensorProto.FLOAT16))
            node.input[idx] = fp16_name[t]
        for idx, out in enumerate(node.output):
            half = f"{out}_fp16"
            node.output[idx] = half
            fp16_name[out] = half
            is_fp16.add(half)
            outside = [c for c in consumers.get(out, []) if c.name not in island_names]
            if outside or out in graph_outputs:
                new_nodes.append(helper.make_node("Cast", [half], [out], name=f"{out}_cast_fp32",
                                                  to=TensorProto.FLOAT))
            for c in consumers.get(out, []):
                if c.name in island_names:  # stays fp16 inside the island
                    c.input[:] = [half if i == out else i for i in c.input]
    g.node.extend(new_nodes)
    # value_info of rewired tensors would now lie about their types: let inference redo them
    del g.value_info[:]
    wrapper = OnnxModel(model)
    wrapper.topological_sort()
    prune(model)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
