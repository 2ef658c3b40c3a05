"""Calibrated weight-only int4 for a causal LM: GPTQ and AWQ, written to onnxruntime's MatMulNBits.

Why by hand. onnxruntime ships GPTQ (`GPTQWeightOnlyQuantConfig`, a vendored copy of Intel Neural
Compressor's), but it rounds twice: its GPTQ loop fake-quantizes each block on a grid whose range
always includes zero, then `quant_tensor` re-quantizes those values on a grid from their own
min/max, so most weights move a second time. Measured on SmolLM2-135M (block 32): +114% perplexity,
worse than plain round-to-nearest (+22%) -- see benchmarks/int4_algos.py. Its AWQ
(`nvidia_awq`) needs NVIDIA's modelopt and a GPU. Here both write the integers they chose, on the
grid they chose, straight into MatMulNBits: nothing is rounded twice.

The statistics both need come from the fp32 model run on the build's calibration text (each text one
prompt on an empty cache), the inputs of every MatMul with a constant weight added as outputs and
folded in one row at a time, so memory is bounded by the statistics, not the data:
- GPTQ: H = sum x^T x per MatMul input (K x K, float64);
- AWQ: the mean |x| per input channel and a bounded, evenly spread sample of input rows.

The quantization grid is MatMulNBits' (one scale per block of `block_size` along the input axis, per
output column; w ~= (q - zp) * scale, q in 0..15): symmetric (zp 8, the scale set so the block's
largest-magnitude weight lands exactly on -8) or asymmetric (a 4-bit zero point per block).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BITS = 4
MAXQ = 2 ** BITS - 1


# -- the grid ---------------------------------------------------------------------------------------

def grid_params(w: np.ndarray, symmetric: bool, clip=1.0):
    """Scale and zero point per column of each block, `w` [..., rows, N]: asymmetric over the block's
    [min, max] (times `clip`), symmetric so its largest-magnitude value (times `clip`) maps to -8
    (llama.cpp's Q4_0 choice: all 16 levels used, the sign taking the extra one)."""
    if symmetric:
        idx = np.abs(w).argmax(-2)[..., None, :]
        scale = np.take_along_axis(w, idx, -2)[..., 0, :] * clip / -8.0
        scale = np.where(scale == 0, 1.0, scale)
        return scale.astype(np.float32), np.full(scale.shape, 8.0, np.float32)
    lo, hi = w.min(-2) * clip, w.max(-2) * clip
    scale = (hi - lo) / MAXQ
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, MAXQ)
    return scale.astype(np.float32), zp.astype(np.float32)


def quantize_rows(w: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / scale) + zp, 0, MAXQ)


def _blocked(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [kb, block, N], a short last block padded with its own last row (which changes no
    block's min, max or largest magnitude)."""
    k, n = w.shape
    kb = -(-k // block)
    if kb * block != k:
        w = np.pad(w, ((0, kb * block - k), (0, 0)), mode="edge")
    return w.reshape(kb, block, n)


def quantize_blocks(w: np.ndarray, block: int, symmetric: bool, clip=1.0):
    """Round to nearest on the grid: q [K, N] (0..15), scales and zero points [ceil(K/block), N];
    `clip` a number or [kb, N]."""
    k = w.shape[0]
    b = _blocked(w, block)
    scales, zps = grid_params(b, symmetric, clip)  # clip: a number, or [kb, N] like the scales
    q = quantize_rows(b, scales[:, None, :], zps[:, None, :]).reshape(-1, w.shape[1])[:k]
    return q, scales, zps


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, zps: np.ndarray, block: int) -> np.ndarray:
    k = q.shape[0]
    return (q - np.repeat(zps, block, 0)[:k]) * np.repeat(scales, block, 0)[:k]


# -- GPTQ -------------------------------------------------------------------------------------------

def gptq(w: np.ndarray, h: np.ndarray, block: int, symmetric: bool, damp: float = 0.01, lazy: int = 128,
         act_order: bool = True):
    """GPTQ (Frantar et al. 2022): quantize the input rows of `w` [K, N] one at a time, each row's
    rounding error spread over the rows not yet quantized through the inverse Hessian of the layer's
    inputs (`h` = X^T X, K x K), in lazy batches of `lazy` rows. With `act_order` the rows go in
    order of decreasing Hessian diagonal (the inputs that matter most first, while there are the
    most rows left to absorb their error), each block's grid fixed beforehand from the unquantized
    weights ("static groups", so a block keeps one scale as MatMulNBits needs); without, in order,
    a block's grid set from the updated weights when its first row comes up. Returns q, scales and
    zero points as quantize_blocks does."""
    w = w.astype(np.float32).copy()
    k, n = w.shape
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    kb = -(-k // block)
    scales = np.empty((kb, n), np.float32)
    zps = np.empty((kb, n), np.float32)
    perm = np.arange(k)
    if act_order:
        scales[:], zps[:] = grid_params(_blocked(w, block), symmetric)
        perm = np.argsort(-np.diag(h), kind="stable")
        w, h = w[perm], h[perm][:, perm]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # the upper Cholesky factor of H^-1: row i holds what quantizing row i costs the rows after it
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:  # not positive definite even damped: dampen harder once
        h[np.diag_indices(k)] += 0.1 * np.mean(np.diag(h))
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    hinv = hinv.astype(np.float32)
    q = np.empty((k, n), np.float32)
    lazy = max(block, (lazy // block) * block)  # batches start on block boundaries
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[i1:i2].copy()
        err = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            b = perm[row] // block
            if not act_order and row % block == 0:
                rows = w1[i:i + block]
                if len(rows) < block:  # a short last block: padded as quantize_blocks pads it
                    rows = _blocked(rows, block)[0]
                scales[b], zps[b] = grid_params(rows, symmetric)
            qi = quantize_rows(w1[i], scales[b], zps[b])
            q[row] = qi
            e = (w1[i] - (qi - zps[b]) * scales[b]) / h1[i, i]
            w1[i:] -= np.outer(h1[i, i:], e)
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    out = np.empty_like(q)
    out[perm] = q
    return out, scales, zps


# -- AWQ --------------------------------------------------------------------------------------------

ALPHAS = np.linspace(0.0, 1.0, 21)
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def awq_scales(ws: list[np.ndarray], x: np.ndarray, absmean: np.ndarray, block: int, symmetric: bool):
    """AWQ's scale search (Lin et al. 2023, with AutoAWQ's default "duo" scaling): input channel c
    of every weight reading the same input is scaled by s_c = mean|x_c|^alpha / mean|w_c|^(1-alpha)
    (|w| relative to its block's largest; the input divided by s_c, so the product is unchanged),
    which gives the channels that carry large activations finer steps; alpha in [0, 1] is the one
    whose quantized outputs on the sample rows `x` come closest to fp32's. Returns (s, alpha, error
    ratio of the best alpha vs alpha 0). (Measured on SmolLM2, asymmetric: +12.9% perplexity with
    the weight term, +17.1% with mean|x|^alpha alone.)"""
    ref = [x @ w for w in ws]
    best = (np.inf, None, 0.0)
    base = None
    wn = [np.abs(b) / np.maximum(np.abs(b).max(1, keepdims=True), 1e-8) for b in (_blocked(w, block) for w in ws)]
    wmean = np.concatenate([b.reshape(-1, w.shape[1])[:w.shape[0]] for b, w in zip(wn, ws)], 1).mean(1)
    for a in ALPHAS:
        s = np.power(np.maximum(absmean, 1e-8), a).astype(np.float32)
        s = (s / (np.power(np.maximum(wmean, 1e-8), 1 - a) + 1e-4)).astype(np.float32)
        s = s / np.sqrt(s.max() * s.min())
        xs = x / s
        err = 0.0
        for w, r in zip(ws, ref):
            ws_ = w * s[:, None]
            qd = dequantize_blocks(*quantize_blocks(ws_, block, symmetric), block)
            err += float(np.square(xs @ qd - r).mean())
        if base is None:
            base = err
        if err < best[0]:
            best = (err, s, float(a))
    return best[1], best[2], (best[0] / base if base else 1.0)


def awq_clip(w: np.ndarray, x: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """AWQ's clipping search: per block and output column, the ratio shrinking the block's range
    (CLIPS) whose quantized block output on the sample rows `x` errs least. Returns [kb, N].
    (Measured on SmolLM2: searching the top and the bottom of an asymmetric range separately, 25
    pairs, lowered this error but raised perplexity, +14.8% against +12.9%.)"""
    k, n = w.shape
    kb = -(-k // block)
    clip = np.ones((kb, n), np.float32)
    for b in range(kb):
        sl = slice(b * block, (b + 1) * block)
        wb, xb = w[sl], x[:, sl]
        ref = xb @ wb
        best = np.full(n, np.inf)
        for c in CLIPS:
            s, z = grid_params(wb, symmetric, c)
            qd = (quantize_rows(wb, s, z) - z) * s
            e = np.square(xb @ qd - ref).mean(0)
            better = e < best
            best[better] = e[better]
            clip[b, better] = c
    return clip


# -- statistics -------------------------------------------------------------------------------------

@dataclass
class InputStats:
    """What GPTQ and AWQ need of one MatMul input, accumulated a calibration row at a time."""

    k: int
    sample_rows: int
    h: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    tokens: int = 0
    sample: list = field(default_factory=list)

    def add(self, x: np.ndarray, want_h: bool, want_sample: bool, stride: int) -> None:
        if want_sample and not want_h and x.ndim == 3 and x.shape[1] > 1:
            # AWQ: leave out each prompt's first token. Its activations are the attention sink's, many
            # times the others' in a few channels; one row in 20 here (short calibration texts, each
            # its own prompt) against one in 512 in AutoAWQ's concatenated chunks, so it would set the
            # scales and clips. (Measured on SmolLM2: +12.5% perplexity, top-1 80.8%, against +12.9%, 78.4%.)
            x = x[:, 1:]
        x = x.reshape(-1, self.k).astype(np.float32)
        if want_h:  # float32 products (BLAS speed), summed in float64
            xtx = (x.T @ x).astype(np.float64)
            self.h = xtx if self.h is None else self.h + xtx
        if want_sample:
            a = np.abs(x).sum(0, dtype=np.float64)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
            # every `stride`-th token of the whole stream, wherever rows begin (a row shorter than
            # the stride would otherwise give only its first token, the attention sink)
            take = np.nonzero((self.tokens + np.arange(x.shape[0])) % stride == 0)[0]
            room = self.sample_rows - sum(len(s) for s in self.sample)
            if room > 0 and len(take):
                self.sample.append(x[take[:room]])
        self.tokens += x.shape[0]

    def rows(self) -> np.ndarray:
        return np.concatenate(self.sample) if self.sample else np.zeros((0, self.k), np.float32)


def collect_stats(model, groups: dict, rows: list[np.ndarray], want_h: bool, want_sample: bool,
                  sample_rows: int = 256, track=lambda x, n, label: x) -> dict[str, InputStats]:
    """Run the fp32 causal LM `model` on each calibration row (one prompt on an empty cache), the
    inputs named by `groups` added as outputs, and fold them into InputStats a row at a time."""
    import onnx
    import onnxruntime as ort

    from edgeq.pipeline.runners.lm_runtime import KVModel

    inits = {i.name: i for i in model.graph.initializer}
    names = list(groups)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    lm = KVModel(sess)
    stats = {x: InputStats(k=int(inits[g[0].input[1]].dims[0]), sample_rows=sample_rows) for x, g in groups.items()}
    stride = max(1, sum(r.shape[1] for r in rows) // sample_rows)
    for ids in track(rows, len(rows), "calibration text"):
        for x, v in zip(names, sess.run(names, lm.feeds(ids, lm.empty_past(1), 0))):
            stats[x].add(v, want_h=want_h, want_sample=want_sample, stride=stride)
    return stats


def weight_groups(model) -> dict[str, list]:
    """The MatMuls with a constant 2-D weight, grouped by the tensor they multiply."""
    from onnx import numpy_helper  # noqa: F401  (the caller reads weights)

    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            groups.setdefault(n.input[0], []).append(n)
    return groups


def quantizable_groups(model, exclude=()) -> dict[str, list]:
    """weight_groups less the MatMuls named in `exclude` and the _corr ones (the GGUF repack's)."""
    skip = set(exclude)
    groups = {x: [n for n in g if n.name not in skip and not n.name.endswith("_corr")]
              for x, g in weight_groups(model).items()}
    return {x: g for x, g in groups.items() if g}


def _consumers(model, name: str) -> list:
    return [n for n in model.graph.node if name in n.input]


def _initializer_behind(model, name: str, inits: dict) -> str | None:
    """The initializer `name` is, directly or through Identity nodes (how exporters share equal
    constants, such as a tiny model's all-ones norm weights), else None."""
    for _ in range(8):
        if name in inits:
            return name
        p = next((n for n in model.graph.node if name in n.output), None)
        if p is None or p.op_type != "Identity":
            return None
        name = p.input[0]
    return None


def _fold_target(model, x: str, group: list, inits: dict):
    """Where AWQ's 1/s for input `x` can be folded so the graph gains no node: a Mul by a constant
    per-channel vector (an RMSNorm/LayerNorm weight: the vector, or a copy of it when it is shared, is
    divided by s), or a Mul of two
    activations one of which is a constant-weight MatMul's output read only there (the MLP's
    up-projection times the gate: that weight's output columns are divided by s). None when
    neither holds (then the input is not scaled: AutoAWQ likewise leaves o_proj unscaled under
    grouped-query attention, where v_proj's columns do not map one to one onto its inputs)."""
    if any(o.name == x for o in model.graph.output):
        return None
    users = _consumers(model, x)
    if {id(n) for n in users} != {id(n) for n in group}:
        return None
    prod = next((n for n in model.graph.node if x in n.output), None)
    if prod is None or prod.op_type != "Mul":
        return None
    k = int(inits[group[0].input[1]].dims[0])
    for i, t in enumerate(prod.input):
        c = _initializer_behind(model, t, inits)
        if c is not None and int(np.prod(inits[c].dims)) == k:
            return ("vector", prod, i)
    for i, t in enumerate(prod.input):
        p = next((n for n in model.graph.node if t in n.output), None)
        if p is not None and p.op_type == "MatMul" and p.input[1] in inits and \
                len(inits[p.input[1]].dims) == 2 and int(inits[p.input[1]].dims[1]) == k and \
                len(_consumers(model, t)) == 1 and not any(o.name == t for o in model.graph.output):
            return ("columns", p, 1)
    return None


def awq_apply(model, groups: dict, inits: dict, weights: dict, stats: dict, block: int, symmetric: bool,
              track=lambda x, n, label: x):
    """AWQ on the float model: each input's scales searched, the weights reading it multiplied by
    them (in `weights`) and 1/s folded where `_fold_target` finds room (in `model`'s initializers or
    in `weights`), then each weight's clipping searched on the scaled sample rows. The model with the
    scaled float weights computes what it did before. Returns the clip ratios per MatMul and a
    report."""
    from onnx import numpy_helper

    clips: dict[str, np.ndarray] = {}
    alphas, scaled = [], 0
    for x, g in track(list(groups.items()), len(groups), "AWQ scale search"):
        st = stats[x]
        xs, absmean = st.rows(), (st.abs_sum / max(st.tokens, 1)).astype(np.float32)
        target = _fold_target(model, x, g, inits)
        if target is not None:
            s, alpha, _ = awq_scales([weights[n.name] for n in g], xs, absmean, block, symmetric)
            alphas.append(alpha)
            kind, node, i = target
            if kind == "vector":
                t = inits[_initializer_behind(model, node.input[i], inits)]
                vec = numpy_helper.to_array(t)
                new = numpy_helper.from_array(
                    (vec.astype(np.float32).reshape(-1) / s).reshape(vec.shape).astype(vec.dtype), t.name)
                if node.input[i] != t.name or len(_consumers(model, t.name)) > 1:  # shared: scale a copy
                    new.name = f"{t.name}_awq{scaled}"
                    model.graph.initializer.append(new)
                    inits[new.name] = model.graph.initializer[-1]
                    node.input[i] = new.name
                else:
                    t.CopyFrom(new)
            elif node.name in weights:  # a MatMul's output columns
                weights[node.name] = weights[node.name] / s[None, :]
            else:
                t = inits[node.input[1]]
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / s[None, :], t.name))
            for n in g:
                weights[n.name] = weights[n.name] * s[:, None]
            xs = xs / s
            scaled += 1
        for n in g:
            clips[n.name] = awq_clip(weights[n.name], xs, block, symmetric)
    return clips, {"scaled_inputs": scaled, "unscaled_inputs": len(groups) - scaled,
                   "alpha_mean": round(float(np.mean(alphas)), 3) if alphas else None}


def pack_matmul_nbits(q: np.ndarray, scales: np.ndarray, zps: np.ndarray, symmetric: bool, block: int):
    """MatMulNBits' tensors for q [K, N] (0..15), scales/zero points [kb, N]: B [N, kb, block/2]
    uint8 (even index in the low nibble), scales [N * kb], and for asymmetric zero points [N,
    ceil(kb/2)] uint8 packed the same way (symmetric: none, the kernel's default 8)."""
    k, n = q.shape
    kb = scales.shape[0]
    qb = np.full((kb * block, n), 0, np.uint8)
    qb[:k] = q.astype(np.uint8)
    if kb * block != k:  # padded rows meet no input (the kernel reads K); store the block's zero point
        qb[k:] = zps[-1].astype(np.uint8)
    qb = qb.T.reshape(n, kb, block)
    b = (qb[..., 0::2] | (qb[..., 1::2] << 4)).astype(np.uint8)
    sc = np.ascontiguousarray(scales.T).reshape(-1).astype(np.float32)
    if symmetric:
        return b, sc, None
    z = zps.T.astype(np.uint8)  # [N, kb]
    if kb % 2:
        z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
    return b, sc, (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def quantize_calibrated(src, dst, algo: str, rows: list[np.ndarray], block: int, symmetric: bool,
                        accuracy_level: int, exclude=(), track=lambda x, n, label: x, sample_rows: int = 256,
                        log=lambda msg: None) -> dict:
    """GPTQ or AWQ int4 of every MatMul with a constant weight of the causal LM at `src`, written to
    `dst` with MatMulNBits (the embeddings are left to the caller). `rows`: the calibration token
    rows, each run as one prompt on an empty cache."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    groups = quantizable_groups(model, exclude)
    stats = collect_stats(model, groups, rows, want_h=algo == "gptq", want_sample=algo == "awq",
                          sample_rows=sample_rows, track=track)
    total = sum(r.shape[1] for r in rows)
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for g in groups.values() for n in g}
    report = {"calibration_rows": len(rows), "calibration_tokens": total, "inputs": len(groups),
              "matmuls": len(weights)}
    clips: dict[str, np.ndarray] = {}
    if algo == "awq":
        clips, found = awq_apply(model, groups, inits, weights, stats, block, symmetric, track)
        report.update(found)
    nodes = []
    by_name = {n.name: n for g in groups.values() for n in g}
    done = set()
    for node in track(list(model.graph.node), len(model.graph.node), f"{algo.upper()} int4"):
        if node.name not in by_name:
            nodes.append(node)
            continue
        w = weights[node.name]
        if algo == "gptq":
            q, sc, zp = gptq(w, stats[node.input[0]].h, block, symmetric)
        else:
            q, sc, zp = quantize_blocks(w, block, symmetric, clips[node.name])
        b, scales, zpp = pack_matmul_nbits(q, sc, zp, symmetric, block)
        k, n = w.shape
        base = node.name.strip("/").replace("/", "_") or f"matmul_{len(done)}"
        new = [numpy_helper.from_array(b, base + "_Q4"), numpy_helper.from_array(scales, base + "_scales")]
        if zpp is not None:
            new.append(numpy_helper.from_array(zpp, base + "_zero_points"))
        model.graph.initializer.extend(new)
        nodes.append(helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in new], list(node.output),
                                      node.name + "_Q4", domain="com.microsoft", bits=BITS, K=k, N=n,
                                      block_size=block, accuracy_level=accuracy_level))
        done.add(node.input[1])
    used = {i for n in nodes for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used or i.name not in done]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return report
