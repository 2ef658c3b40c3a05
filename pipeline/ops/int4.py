"""Block-wise int4 weight-only quantization of a causal LM, one entry point (`quantize_weights`) for
every --int4-algo: onnxruntime's MatMulNBitsQuantizer for round-to-nearest, HQQ and k-quant;
pipeline/ops/weight_only.py for GPTQ and AWQ (calibrated; why not onnxruntime's, see there); an
exact repack of weights still on a GGUF file's own Q4_1/Q8_0 grids (what any re-quantization would
re-round, this carries over bit for bit). NF4 (`quantize_nf4`) is onnxruntime's MatMulBnb4Quantizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np


ORT_ALGOS = {"rtn": "round to nearest", "hqq": "HQQ (half-quadratic, no data)", "kquant": "k-quant (llama.cpp's search)"}


def output_projection(model) -> str | None:
    """The name of the MatMul computing the logits (the LM head): the producer of the `logits`
    output, through Cast/Identity/Reshape, when it multiplies a constant weight."""
    inits = {i.name for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    t = next((o.name for o in model.graph.output if o.name == "logits"), None)
    while t in prod:
        n = prod[t]
        if n.op_type == "MatMul":
            return n.name if n.input[1] in inits else None
        if n.op_type not in ("Cast", "Identity", "Reshape", "Squeeze"):
            return None
        t = n.input[0]
    return None


def _ort_nbits(src, dst, bits: int, block: int, symmetric: bool, accuracy_level: int, algo: str = "rtn",
               include=None, exclude=(), op_types=("MatMul",)) -> None:
    """One pass of onnxruntime's MatMulNBitsQuantizer over `src` (a path or ModelProto)."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    # it warns that it raises the opset to 21 and the IR version to 10 (int4 types need them): expected
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    axes = tuple((op, 1 if op == "Gather" else 0) for op in op_types)
    if algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=op_types,
                                              quant_axes=axes)
    elif algo == "kquant":
        config = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                                  accuracy_level=accuracy_level, op_types_to_quantize=op_types,
                                                  quant_axes=axes, bits=bits)
    model = onnx.load(str(src)) if not isinstance(src, onnx.ModelProto) else src
    q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=list(exclude),
                                 nodes_to_include=list(include) if include else None, op_types_to_quantize=op_types,
                                 quant_axes=axes, algo_config=config)
    with np.errstate(divide="ignore", invalid="ignore"):  # its np.where divides all-zero blocks too, then drops them
        q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_weights(src: Path, dst: Path, algo: str, block_size: int, symmetric: bool, accuracy_level: int,
                     embeddings: bool = True, head_bits: int = 8, rows=None, track=None) -> dict:
    """The int4 artifact of the LM at `src` by `algo` (config.INT4_ALGOS): every MatMul with a
    constant weight becomes MatMulNBits (4 bits, blocks of `block_size` along the input axis), the
    LM head at `head_bits`, and with `embeddings` the token-embedding Gather becomes
    GatherBlockQuantized (4 bits along the hidden axis: the vocabulary-sized table is the largest
    tensor of a small LM). `rows`: calibration token rows, for gptq and awq. Returns counts and the
    algorithm's own report."""
    import onnx

    from edgeq.pipeline.ops import weight_only

    model = onnx.load(str(src), load_external_data=False)
    head = output_projection(model)
    corr = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith("_corr")]
    wide_head = [head] if head and head_bits == 8 else []
    del model
    info: dict = {}
    cur = src
    if algo == "gguf":
        info = repack_gguf_grids(src, dst, accuracy_level)
        if info["q4_1_exact"] + info["q8_0_exact"]:
            cur = dst
        # the weights off the file's grids: round to nearest
        _ort_nbits(cur, dst, 4, block_size, symmetric, accuracy_level, exclude=corr_names(cur) + wide_head)
        cur = dst
    elif algo in ("gptq", "awq"):
        info = weight_only.quantize_calibrated(src, dst, algo, rows, block_size, symmetric, accuracy_level,
                                               exclude=corr + wide_head, **({"track": track} if track else {}))
        cur = dst
    else:
        _ort_nbits(src, dst, 4, block_size, symmetric, accuracy_level, algo=algo, exclude=corr + wide_head)
        cur = dst
    g = onnx.load(str(cur), load_external_data=False).graph
    if wide_head and any(n.name == head and n.op_type == "MatMul" for n in g.node):
        _ort_nbits(cur, dst, 8, block_size, True, accuracy_level, include=wide_head)
    if embeddings:
        _ort_nbits(dst, dst, 4, block_size, symmetric if algo != "hqq" else False, accuracy_level,
                   op_types=("Gather",))
    g = onnx.load(str(dst), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in g.node if n.op_type == "MatMulNBits"}
    return {"MatMulNBits": sum(b == 4 for b in bits.values()), "MatMulNBits_8bit": sum(b == 8 for b in bits.values()),
            "GatherBlockQuantized": sum(n.op_type == "GatherBlockQuantized" for n in g.node),
            "MatMul_left_float": sum(n.op_type == "MatMul" and not n.name.endswith("_corr") for n in g.node),
            **({"head": head, "head_bits": head_bits} if head else {}), **info}


def corr_names(path) -> list[str]:
    """The correction MatMuls of a GGUF repack (see repack_gguf_grids): they stay fp32."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in g.node if n.op_type == "MatMul" and n.name.endswith("_corr")]


# A GGUF file is already quantized (SmolLM2's: Q4_1 transformer weights, Q8_0 embeddings); the fp32
# artifact holds those weights de-quantized. Re-quantizing them with a different int4 grid (round to
# nearest on new block scales) adds a second rounding error as large as the first (measured in the
# README). Weights still lying on their GGUF grid are instead repacked exactly into onnxruntime's
# block-quantized ops, so the int4 artifact computes with the very weights the fp32 one does.
GGUF_BLOCK = 32


def _blocks(w: np.ndarray) -> np.ndarray:  # [K, N] -> [N, K/32, 32]
    k, n = w.shape
    return w.T.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)


def _pack4(q: np.ndarray) -> np.ndarray:  # [N, kb, 32] values 0..15 -> [N, kb, 16], even index in the low nibble
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def on_q4_1_grid(w: np.ndarray, tol: float = 1e-3):
    """(packed q, scales d, float zero points) when every block of 32 along K is d*q + m with q in
    0..15 (GGUF Q4_1), else None."""
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = _blocks(w.astype(np.float64))
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = np.where(hi > lo, (hi - lo) / 15, 1.0)
    t = (b - lo) / d
    q = np.round(t)
    if np.abs(t - q).max() > tol:
        return None
    return _pack4(q), d[..., 0].astype(np.float32), (-lo / d)[..., 0].astype(np.float32)


def on_q8_0_grid(w: np.ndarray, tol: float = 1e-3):
    """(uint8 q with zero point 128, scales) when every block of 32 along K is d*q, q in -127..127
    (GGUF Q8_0), else None."""
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = _blocks(w.astype(np.float64))
    d = np.abs(b).max(-1, keepdims=True) / 127
    d = np.where(d > 0, d, 1.0)
    t = b / d
    q = np.round(t)
    if np.abs(t - q).max() > tol:
        return None
    return (q + 128).astype(np.uint8), d[..., 0].astype(np.float32)


def repack_gguf_grids(src: Path, dst: Path, accuracy_level: int) -> dict:
    """The int4 artifact of a GGUF-sourced model, losslessly: Q4_1 weights -> MatMulNBits (4 bits,
    blocks of 32) with zero point 8 plus a per-block correction term, Q8_0 weights -> MatMulNBits (8
    bits), the Q8_0 token embedding -> GatherBlockQuantized (8 bits). MatMulNBits takes only integer
    zero points on its fast int8-activation path, while Q4_1's offset m is any float, so
        x @ (d * (q - zp_f)) = MatMulNBits(x, q, d, zp=8) + blocksum(x) @ (d * (8 - zp_f)),
    the correction being a MatMul 32x smaller than the weight's. Q4_1 MatMuls that read the same
    activation are packed into one MatMulNBits (their output columns side by side), one correction
    and one Split. Weights off every grid are left to `quantize_int4` (round to nearest)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_inits, removed, nodes, made = [], set(), [], set()
    stats = {"q4_1_exact": 0, "q8_0_exact": 0, "embedding_q8_0_exact": 0, "off_grid": 0}

    added: set[str] = set()

    def add(name: str, arr: np.ndarray) -> str:
        if name not in added:  # a weight two MatMuls share is packed (identically) once
            added.add(name)
            new_inits.append(numpy_helper.from_array(arr, name))
        return name

    # Q4_1 MatMuls reading the same activation (a layer's q/k/v projections, its gate/up pair) are
    # packed side by side into one MatMulNBits, one correction and one Add, then Split: fewer
    # kernels per decode step, whose dispatch is much of its time (see README, int4 decode).
    q4_grids, groups = {}, {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            r = on_q4_1_grid(numpy_helper.to_array(inits[n.input[1]]))
            if r is not None:
                q4_grids[n.name] = r
                groups.setdefault(n.input[0], []).append(n)
    for n in g.node:
        if n.name in q4_grids:
            members = groups[n.input[0]]
            removed.add(n.input[1])
            stats["q4_1_exact"] += 1
            if n is not members[0]:
                continue  # packed with the group's first member, which comes earlier in the graph
            x, k = n.input[0], int(inits[n.input[1]].dims[0])
            kb = k // GGUF_BLOCK
            bsum = f"{x}_blocksum{kb}"
            if bsum not in made:
                shape = add(bsum + "_shape", np.array([0, 0, kb, GGUF_BLOCK], np.int64))
                axes = add(bsum + "_axes", np.array([-1], np.int64))
                nodes.append(helper.make_node("Reshape", [x, shape], [bsum + "_r"], bsum + "_Reshape"))
                nodes.append(helper.make_node("ReduceSum", [bsum + "_r", axes], [bsum], bsum + "_ReduceSum",
                                              keepdims=0))
                made.add(bsum)
            grids = [q4_grids[m.name] for m in members]
            packed = len(members) > 1
            wname = f"{n.name}_packed{len(members)}" if packed else n.input[1]
            q = np.concatenate([r[0] for r in grids])  # [N, kb, 16]: the members' output columns side by side
            d = np.concatenate([r[1] for r in grids])
            corr_w = np.concatenate([((8.0 - r[2]) * r[1]).T for r in grids], axis=1)  # [kb, N]
            main, total = n.output[0] + "_nbits", (n.output[0] + "_packed" if packed else n.output[0])
            nodes.append(helper.make_node(
                "MatMulNBits", [x, add(wname + "_q4", q), add(wname + "_scales", d.reshape(-1))], [main],
                n.name + "_Q4", domain="com.microsoft", bits=4, K=k, N=int(q.shape[0]), block_size=GGUF_BLOCK,
                accuracy_level=accuracy_level))
            nodes.append(helper.make_node("MatMul", [bsum, add(wname + "_corr", corr_w)], [n.output[0] + "_corr"],
                                          n.name + "_corr"))
            nodes.append(helper.make_node("Add", [main, n.output[0] + "_corr"], [total], n.name + "_add"))
            if packed:
                sizes = add(wname + "_sizes", np.array([r[0].shape[0] for r in grids], np.int64))
                nodes.append(helper.make_node("Split", [total, sizes], [m.output[0] for m in members],
                                              n.name + "_split", axis=-1))
                stats["q4_1_packed_groups"] = stats.get("q4_1_packed_groups", 0) + 1
            continue
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            wname = n.input[1]
            w = numpy_helper.to_array(inits[wname])
            k, nout = w.shape
            attrs = {"K": k, "N": nout, "block_size": GGUF_BLOCK, "accuracy_level": accuracy_level}
            q8 = on_q8_0_grid(w)
            if q8 is not None:
                q, d = q8  # no zero-point input: MatMulNBits' default for 8 bits is 128
                nodes.append(helper.make_node(
                    "MatMulNBits", [n.input[0], add(wname + "_q8", q), add(wname + "_scales", d.reshape(-1))],
                    list(n.output), n.name + "_Q8", domain="com.microsoft", bits=8, **attrs))
                removed.add(wname)
                stats["q8_0_exact"] += 1
                continue
            stats["off_grid"] += 1
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and \
                not any(a.name == "axis" and a.i != 0 for a in n.attribute):
            table = numpy_helper.to_array(inits[n.input[0]])  # [vocab, hidden], blocks along hidden
            q8 = on_q8_0_grid(table.T)
            if q8 is not None:
                q, d = q8  # [V, H/32, 32], [V, H/32]
                v, h = table.shape
                name = n.input[0]
                nodes.append(helper.make_node(
                    "GatherBlockQuantized",
                    [add(name + "_q8", q.reshape(v, h)), n.input[1], add(name + "_scales", d),
                     add(name + "_zp", np.full(d.shape, 128, np.uint8))],
                    list(n.output), n.name + "_Q8", domain="com.microsoft", bits=8, block_size=GGUF_BLOCK,
                    gather_axis=0, quantize_axis=1))
                removed.add(name)
                stats["embedding_q8_0_exact"] += 1
                continue
        nodes.append(n)
    if not (stats["q4_1_exact"] + stats["q8_0_exact"]):
        return stats
    g.ClearField("node")
    g.node.extend(nodes)
    keep = [i for i in g.initializer if i.name not in removed] + new_inits
    g.ClearField("initializer")
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return stats


def quantize_nf4(src: Path, dst: Path, block_size: int, accuracy_level: int, embeddings: bool = True,
                 head_bits: int = 8) -> dict:
    """NF4 (QLoRA's 4-bit NormalFloat: 16 levels at the quantiles of a normal distribution, one
    absmax scale per block) with onnxruntime's MatMulBnb4Quantizer: every MatMul with a constant
    weight becomes MatMulBnb4, except the LM head (MatMulNBits at `head_bits`, as for int4); the
    embeddings as for int4. MatMulBnb4's CPU kernel de-quantizes the weight to fp32 for every call
    (no int8-activation path), so it trails MatMulNBits in speed: the README measures by how much."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    logging.getLogger("onnxruntime.quantization.matmul_bnb4_quantizer").setLevel(logging.ERROR)
    model = onnx.load(str(src))
    head = output_projection(model)
    wide_head = [head] if head and head_bits == 8 else []
    q = MatMulBnb4Quantizer(model, MatMulBnb4Quantizer.NF4, block_size, nodes_to_exclude=wide_head)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    if wide_head:
        _ort_nbits(dst, dst, 8, block_size, True, accuracy_level, include=wide_head)
    if embeddings:
        _ort_nbits(dst, dst, 4, block_size, True, accuracy_level, op_types=("Gather",))
    g = onnx.load(str(dst), load_external_data=False).graph
    return {"MatMulBnb4": sum(n.op_type == "MatMulBnb4" for n in g.node),
            "MatMulNBits_8bit": sum(n.op_type == "MatMulNBits" for n in g.node),
            "GatherBlockQuantized": sum(n.op_type == "GatherBlockQuantized" for n in g.node),
            "MatMul_left_float": sum(n.op_type == "MatMul" for n in g.node),
            **({"head": head, "head_bits": head_bits} if head else {})}
