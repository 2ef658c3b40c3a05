"""A decoder's attention fused into ONNX Runtime's GroupQueryAttention.

optimum's export of a Llama-family decoder ("text-generation-with-past") spells attention out op by
op: per layer the rotary embedding of Q and K, the key/value cache concatenation, repeat_kv for the
grouped key/value heads, a 4-D causal mask built from the attention mask, and the shape arithmetic
that all of this needs at run time. Even a small model's graph then has thousands of nodes, and a
one-token decode step runs thousands of kernels, most of them Shape/Gather/Unsqueeze/Concat on tiny
tensors: their dispatch, not the weights, bounds decode speed, the more so once int4 makes the
MatMuls cheap (counted in the README, "Where decode time went").

`GroupQueryAttention` (com.microsoft, CPU and CUDA) does all of it in one kernel per layer: Q, K, V
straight from their projections (BSH), rotary from cos/sin tables, the cache appended in BNSH, the
grouped heads and the causal mask inside. Here each layer's q/k/v projections become one MatMul
(their weights side by side) whose packed QKV output one such node reads; its output goes into
o_proj, its present outputs become the graph's present.<i>.key/value, and everything the old
attention used and nothing else does is dropped, most of the graph's nodes with it (counted in
the README).

Why by hand: onnxruntime.transformers' optimizer has no pattern for this export (its `qwen3` model
type fuses the RMSNorms and the rotary but not the attention, and the decode step got slower; see
the README), and onnxruntime-genai's model builder, which writes such graphs, needs a newer
transformers than optimum's export runs with here. The fusion is matched by the
exporter's node names (`/model/layers.<i>/self_attn/{q,k,v,o}_proj/MatMul`, the module paths
torch.onnx records) and the Hugging Face config; the optimize stage then checks the fused graph
against the exported one on logits and cache and keeps the exported graph if they differ.

What the fused graph does not take: position_ids (GroupQueryAttention derives each token's position
from the attention mask: past length + index, which is what the exported graph is fed here, see
lm_runtime.KVModel) and left padding.
"""
from __future__ import annotations

import numpy as np


def fusable(hf_config: dict) -> str | None:
    """None when the config describes an attention that GroupQueryAttention computes as the export
    does (Llama's: q/k/v/o projections without bias, rotate-half rotary over the whole head,
    grouped key/value heads, full causal attention), else why not."""
    mtype = hf_config.get("model_type")
    if mtype not in ("llama", "mistral"):
        return f"model type {mtype!r}: only Llama and Mistral attention is fused"
    if hf_config.get("rope_scaling"):
        return "rope_scaling is not supported"
    if hf_config.get("sliding_window"):
        return "sliding-window attention is not supported"
    if hf_config.get("attention_bias"):
        return "projections with bias are not supported"
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings"):
        if not isinstance(hf_config.get(key), int) or isinstance(hf_config.get(key), bool) or hf_config[key] <= 0:
            return f"the config has no positive integer {key}"
    return None


def fuse_group_query_attention(model, hf_config: dict) -> int:
    """Rewrites `model` (an optimum text-generation-with-past export) in place; returns the number of
    layers fused, 0 (model untouched) when the export does not have the expected nodes."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    g = model.graph
    layers = hf_config["num_hidden_layers"]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    by_name = {n.name: n for n in g.node}
    producer = {o: n for n in g.node for o in n.output}
    inputs = {i.name for i in g.input}
    outputs = {o.name for o in g.output}
    plan = []
    for i in range(layers):
        p = f"/model/layers.{i}/self_attn/"
        proj = [by_name.get(f"{p}{x}_proj/MatMul") for x in "qkvo"]
        names = [f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value"]
        if (None in proj or not all(n in inputs for n in names[:2]) or not all(n in outputs for n in names[2:])
                or "attention_mask" not in inputs):
            return 0
        plan.append((p, proj, names))

    # rotary tables as GroupQueryAttention reads them: [max positions, head_dim / 2]
    inv_freq = 1.0 / float(hf_config.get("rope_theta", 10000.0)) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(hf_config["max_position_embeddings"], dtype=np.float64), inv_freq)
    g.initializer.extend([numpy_helper.from_array(np.cos(angles).astype(np.float32), "gqa_cos_cache"),
                          numpy_helper.from_array(np.sin(angles).astype(np.float32), "gqa_sin_cache"),
                          numpy_helper.from_array(np.array([1], np.int64), "gqa_axes_1"),
                          numpy_helper.from_array(np.array(1, np.int64), "gqa_one")])
    # per row, the index of its last token (seqlens_k), and the total length (past + new)
    prologue = [
        helper.make_node("ReduceSum", ["attention_mask", "gqa_axes_1"], ["gqa_lengths"], "gqa_lengths", keepdims=0),
        helper.make_node("Sub", ["gqa_lengths", "gqa_one"], ["gqa_last_index"], "gqa_last_index"),
        helper.make_node("Cast", ["gqa_last_index"], ["gqa_seqlens_k"], "gqa_seqlens_k", to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["gqa_mask_shape"], "gqa_mask_shape"),
        helper.make_node("Gather", ["gqa_mask_shape", "gqa_one"], ["gqa_total_i64"], "gqa_total_i64", axis=0),
        helper.make_node("Cast", ["gqa_total_i64"], ["gqa_total_length"], "gqa_total_length", to=TensorProto.INT32),
    ]
    weights = {i.name: i for i in g.initializer}
    before_o_proj = {}
    for p, (q, k, v, o), (past_k, past_v, present_k, present_v) in plan:
        for t in (present_k, present_v):  # the old cache Concat nodes lose their graph output
            old = producer[t]
            old.output[list(old.output).index(t)] = t + "_unfused"
        out = p + "GroupQueryAttention_output"
        fused = []
        qkv = [q.output[0], k.output[0], v.output[0]]
        packed = _packed_qkv(p, (q, k, v), weights)
        if packed is not None:  # one MatMul for the three projections, read by GroupQueryAttention packed
            matmul, weight = packed
            g.initializer.append(weight)
            fused.append(matmul)
            qkv = [matmul.output[0], "", ""]
        fused.append(helper.make_node(
            "GroupQueryAttention",
            [*qkv, past_k, past_v, "gqa_seqlens_k", "gqa_total_length", "gqa_cos_cache", "gqa_sin_cache"],
            [out, present_k, present_v], p + "GroupQueryAttention", domain="com.microsoft",
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0))
        before_o_proj[o.name] = fused
        o.input[0] = out
    nodes = list(prologue)
    for n in g.node:  # each fused node right before its o_proj: after q/k/v's input, before its consumer
        nodes.extend(before_o_proj.get(n.name, []))
        nodes.append(n)
    g.ClearField("node")
    g.node.extend(nodes)
    # everything only the old attention used (nodes, initializers, the position_ids input) goes
    OnnxModel(model).prune_graph()
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(plan)


def _packed_qkv(prefix: str, projections, weights):
    """(MatMul, its weight) computing q, k and v side by side when the three projections read the
    same activation with constant 2-D weights, else None. GroupQueryAttention takes such a packed
    QKV as its query (key and value left empty). One MatMul instead of three per layer: fewer
    kernels per decode step, and dynamic int8 quantizes the activation once, not three times (the
    effect on decode speed is measured in the README, "Where decode time went"); the columns are
    the same, so per-column quantization (int4 blocks, per-channel int8) sees the same weights."""
    from onnx import helper, numpy_helper

    if len({n.input[0] for n in projections}) != 1:
        return None
    ws = [weights.get(n.input[1]) for n in projections]
    if any(w is None or len(w.dims) != 2 for w in ws) or len({w.dims[0] for w in ws}) != 1:
        return None
    w = np.concatenate([numpy_helper.to_array(w) for w in ws], axis=1)
    name = prefix + "qkv_proj"
    matmul = helper.make_node("MatMul", [projections[0].input[0], name + ".weight"], [name + "/MatMul_output_0"],
                              name + "/MatMul")
    return matmul, numpy_helper.from_array(w, name + ".weight")


def check_fused(exported, fused, vocab_size: int, prompt_tokens: int = 16, steps: int = 4) -> dict:
    """The fused graph against the exported one, both as onnxruntime sessions: a prompt of
    `prompt_tokens` deterministic ids, then `steps` greedy one-token steps with the cache. Returns
    the largest logit and cache differences, the logit scale, and whether greedy tokens agree."""
    from edgeq.pipeline.runners.lm_runtime import KVModel

    a, b = KVModel(exported), KVModel(fused)
    ids = (np.arange(prompt_tokens, dtype=np.int64)[None] * 7919 + 101) % max(vocab_size - 1, 2) + 1
    la, pa = a.forward(ids, a.empty_past(1), 0)
    lb, pb = b.forward(ids, b.empty_past(1), 0)
    logit_diff, cache_diff = float(np.abs(la - lb).max()), max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)
    scale = float(np.abs(la).max())
    same = bool((la[0].argmax(-1) == lb[0].argmax(-1)).all())
    token = la[:, -1].argmax(-1)
    for step in range(steps):
        la, pa = a.forward(token[:, None], pa, prompt_tokens + step)
        lb, pb = b.forward(token[:, None], pb, prompt_tokens + step)
        logit_diff = max(logit_diff, float(np.abs(la - lb).max()))
        cache_diff = max(cache_diff, max(float(np.abs(pa[k] - pb[k]).max()) for k in pa))
        same = same and int(la[0, -1].argmax()) == int(lb[0, -1].argmax())
        token = la[:, -1].argmax(-1)
    return {"max_logit_diff": logit_diff, "max_cache_diff": cache_diff, "logit_scale": scale, "greedy_same": same}
