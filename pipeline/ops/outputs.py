"""Which output of a graph the evaluation compares: the model's answer, not whatever comes first.

An optimum export has one output per task (an encoder's last_hidden_state, a classifier's logits).
Exports from other tools often have several: a sentence-transformers model exported with its pooling
inside gives the token embeddings, BERT's pooler output (tanh of a dense layer on [CLS], which the
embedding does not use) and the pooled, often L2-normalised, sentence embedding, in any order and
under any names. The choice is by graph structure, never by name: an output computed by pooling over
the sequence axis (ReduceSum/ReduceMean over axis 1 of a rank-3 float tensor) is the sentence
embedding; of several, the one computed last (normalisation after pooling) wins. Without one, a
rank-3 float output is pooled by the evaluation itself (mean over real tokens). `--output NAME`
overrides the choice.
"""
from __future__ import annotations

from edgeq.core import EdgeqError

_FLOAT = (1, 10, 11)  # FLOAT, FLOAT16, DOUBLE


def _rank(vi) -> int | None:
    t = vi.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def _axes(node, consts) -> list[int] | None:
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    if len(node.input) > 1 and node.input[1]:
        return consts.get(node.input[1])
    return None


def _constants(model) -> dict[str, list[int]]:
    from onnx import numpy_helper

    out = {}
    for t in model.graph.initializer:
        if t.data_type in (6, 7) and len(t.dims) <= 1:  # INT32/INT64 vectors: axes
            out[t.name] = [int(x) for x in numpy_helper.to_array(t).reshape(-1)]
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (6, 7) and len(a.t.dims) <= 1:
                    out[n.output[0]] = [int(x) for x in numpy_helper.to_array(a.t).reshape(-1)]
    return out


def primary_output(model, task: str | None, wanted: str | None = None) -> tuple[str, str]:
    """(name, why) of the output the evaluation compares in `model` (types inferred)."""
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    if wanted:
        if wanted not in names:
            raise EdgeqError(f"--output {wanted!r}: the model has no such output (it has: {', '.join(names)})")
        return wanted, "chosen with --output"
    if len(outputs) == 1:
        return names[0], "the only output"
    floats = [o for o in outputs if o.type.tensor_type.elem_type in _FLOAT]
    if not floats:
        return names[0], "the first output (none is float)"
    if task in ("text-classification", "image-classification"):
        return floats[0].name, "a classifier's first float output (its logits)"
    vi = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + outputs}
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = _constants(model)

    def pooling(n) -> bool:
        if n.op_type not in ("ReduceSum", "ReduceMean") or not n.input or n.input[0] not in vi:
            return False
        src = vi[n.input[0]]
        axes = _axes(n, consts)
        return (src.type.tensor_type.elem_type in _FLOAT and _rank(src) == 3
                and axes is not None and [a % 3 for a in axes] == [1])

    def ancestry(name: str) -> list:
        seen, stack, nodes = set(), [name], []
        while stack:
            t = stack.pop()
            n = producer.get(t)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            nodes.append(n)
            stack.extend(i for i in n.input if i)
        return nodes

    pooled = []
    for o in floats:
        if _rank(o) == 2:
            nodes = ancestry(o.name)
            if any(pooling(n) for n in nodes):
                pooled.append((len(nodes), o.name))
    if pooled:
        best = max(pooled, key=lambda x: x[0])[1]  # the most computed: normalised after pooling
        return best, "the sentence embedding computed in the graph (pooled over the sequence axis)"
    tokens = [o for o in floats if _rank(o) == 3]
    if tokens:
        return tokens[0].name, "the first token-level output (mean-pooled over real tokens)"
    return floats[0].name, "the first float output"
