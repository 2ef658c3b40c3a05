"""The static int8 recipe's plan for a model: which nodes it quantizes and which it keeps float, with
why. The calibrate stage asks (it measures and smooths what will be quantized), the quantize stage
follows it, the hybrid search starts from it.

Kept float: the MatMuls whose activation input comes out of a GELU-family op (profile key
`keep_float_after`; those tensors carry token-wise outliers that no single static per-tensor scale
represents), and an image model's first weighted layers (`keep_float_first`).
"""
from __future__ import annotations

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
