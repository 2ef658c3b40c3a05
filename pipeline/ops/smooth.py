"""SmoothQuant (Xiao et al., "SmoothQuant", ICML 2023) for int8 with one activation scale per tensor.

A transformer's activations have a few outlier channels: one channel of an FFN's GELU output can
reach many times the median channel's range (the LayerNorm outputs have such channels too; measured
in the README, "SmoothQuant"). One scale per tensor -- computed per inference by dynamic int8,
calibrated by static -- must cover the outlier, which leaves a few steps of the 256 for every other
channel. The MatMul is linear in each input channel, so each channel j can be divided by s_j before
the MatMul and row j of the weight multiplied by s_j: X W = (X diag(1/s)) (diag(s) W), exact in
float. With

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| measured per channel on the calibration data) the activation's outliers move into the
weight, whose scales are per output channel and take them far better. alpha sets how much of the
range moves: too little leaves the activation's outliers, too much overloads the weight (the alphas
measured, with dynamic int8's fidelity and speed, are in the README, "SmoothQuant").

The division is a Mul node in front of each smoothed node (one elementwise pass over the activation,
cheap next to the MatMul; its cost is measured in the README); SmoothQuant's paper folds it into
the preceding LayerNorm instead, which is not valid here: in a post-LN BERT the LayerNorm's output
also feeds the residual sum, which must see the unscaled values.

Why by hand: onnxruntime.quantization's `SmoothQuant` extra option runs Intel Neural Compressor's
implementation (a heavy dependency, for static quantization only) and it cannot smooth the nodes
ORT quantizes dynamically (QAttention, DynamicQuantizeMatMul), which is where it matters here.
"""
from __future__ import annotations

import numpy as np

OP_TYPES = ("MatMul", "Attention")  # activation x constant weight [in, out]: rows are input channels


def smoothable(model, nodes: set[str] | None = None) -> dict[str, str]:
    """{node name: activation input} of the MatMul/Attention nodes whose weight is a 2-D float
    initializer used by that node alone (scaling a shared weight would change its other users),
    restricted to `nodes` when given."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    out = {}
    for n in model.graph.node:
        if not n.name or n.op_type not in OP_TYPES or len(n.input) < 2 or (nodes is not None and n.name not in nodes):
            continue
        w = inits.get(n.input[1])
        if (w is None or n.input[0] in inits or len(w.dims) != 2 or users[n.input[1]] != 1
                or w.data_type != onnx.TensorProto.FLOAT):
            continue
        out[n.name] = n.input[0]
    return out


class AbsMaxCollector:
    """Running per-channel (last axis) max |x| of activations over every calibration batch."""

    def __init__(self):
        self.absmax: dict[str, np.ndarray] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        a = np.abs(value.astype(np.float32, copy=False)).reshape(-1, value.shape[-1]).max(axis=0)
        prev = self.absmax.get(name)
        self.absmax[name] = a if prev is None or prev.shape != a.shape else np.maximum(prev, a)

    def result(self) -> dict[str, np.ndarray]:
        return dict(self.absmax)


def scales(act_absmax: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), guarded: a channel that never fires or a zero
    weight row keeps s = 1, and s stays within [1e-4, 1e4]."""
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.abs(weight.astype(np.float64)).max(axis=1)
    s = np.ones_like(a)
    ok = (a > 0) & (w > 0)
    s[ok] = a[ok] ** alpha / w[ok] ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smooth(model, absmax: dict[str, np.ndarray], alpha: float, nodes: set[str] | None = None,
           fold: bool = False) -> list[str]:
    """Smooths, in place, every smoothable node (of `nodes`, when given) that has a measured
    per-channel |max| in `absmax` (keyed by node name) of the right width. Returns their names.
    `fold`: where the division can go into the constant of the `Mul` that produces the input (see
    `_fold`), it goes there instead of into a new `Mul`; the smoothed input then has no tensor of
    its own, so only for dynamic int8, which calibrates nothing."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    todo = smoothable(model, nodes)
    done = _fold(model, absmax, alpha, todo, inits) if fold else []
    inserts = []
    for n in model.graph.node:
        if n.name not in todo or n.name not in absmax or n.name in done:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        a = absmax[n.name]
        if a.shape != (w.shape[0],):
            continue
        s = scales(a, w, alpha)
        inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{n.name}_smooth_scale")
        model.graph.initializer.append(inv)
        mul = helper.make_node("Mul", [n.input[0], inv.name], [smoothed_input(n.name)], name=f"{n.name}_smooth")
        n.input[0] = mul.output[0]
        inserts.append((n.name, mul))
        done.append(n.name)
    index = {name: i for i, name in enumerate(nd.name for nd in model.graph.node)}
    for name, mul in sorted(inserts, key=lambda t: -index[t[0]]):  # back to front: indices stay valid
        model.graph.node.insert(index[name], mul)
    return done


def _fold(model, absmax: dict[str, np.ndarray], alpha: float, todo: dict[str, str], inits) -> list[str]:
    """SmoothQuant's own placement, where it is exact: the input X of the smoothed nodes is made by
    `Mul(Y, c)` with a per-channel constant c, and only smoothed nodes read X (a
    pre-norm decoder's RMSNorm scale: its output feeds q/k/v and gate/up, never the residual). Then
    c / s replaces the `Mul` that dividing X by s would add, and every reader of X shares one s,
    from the largest |W| row over all their weights. In a pre-norm decoder that covers most of the
    smoothed MatMuls (q/k/v, gate/up, lm_head; counted in the README, "Causal language models"); the
    dynamic int8 decode step then runs no extra kernel for them. Returns the folded nodes' names."""
    from onnx import numpy_helper

    readers: dict[str, list] = {}
    producer, users = {}, {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
            users[i] = users.get(i, 0) + 1
        for o in n.output:
            producer[o] = n
    outputs = {o.name for o in model.graph.output}
    done = []
    for x in dict.fromkeys(todo.values()):
        group = readers.get(x, [])
        p = producer.get(x)
        if (x in outputs or p is None or p.op_type != "Mul" or not group
                or any(n.name not in todo or n.name not in absmax for n in group)):
            continue
        # the constant, or an Identity of one (torch.onnx's export shares equal weights that way)
        const = [(i, i if i in inits else producer[i].input[0]) for i in p.input if i in inits or (
            i in producer and producer[i].op_type == "Identity" and producer[i].input[0] in inits)]
        if len(const) != 1 or p.input[0] == p.input[1]:
            continue
        (slot, source), = const
        c = numpy_helper.to_array(inits[source])
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
        a = absmax[group[0].name]
        width = ws[0].shape[0]
        if (a.shape != (width,) or any(w.shape[0] != width for w in ws) or c.dtype != np.float32
                or c.shape[-1:] != (width,) or int(np.prod(c.shape)) != width):
            continue
        s = scales(a, np.concatenate(ws, axis=1), alpha)
        scaled = numpy_helper.from_array((c / s.reshape(c.shape)).astype(np.float32), source)
        if slot == source and users[source] == 1:
            inits[source].CopyFrom(scaled)
        else:  # a shared constant: this Mul gets its own
            scaled.name = f"{p.name or x}_smoothed_scale"
            model.graph.initializer.append(scaled)
            p.input[list(p.input).index(slot)] = scaled.name
        for n, w in zip(group, ws):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
            done.append(n.name)
    return done


def smoothed_input(node: str) -> str:
    """The tensor `smooth` feeds a smoothed node: the calibrate stage measures its range."""
    return f"{node}_smoothed_input"


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed entry times and order (numpy stamps each entry with the clock), so the
    build's bytes do not depend on when it ran; np.load reads it as usual."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[k]), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def load_absmax(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}

