"""Causal language models: export with the key/value cache, int8 and block-wise int4, perplexity,
generation speed, `edgeq generate` (on a tiny random Llama; the real SmolLM2 in test_e2e_smollm2)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import disk_manifest, run_build
from edgeq.core import EdgeqError


@pytest.fixture(scope="module")
def llama_build(tiny_llama, tmp_path_factory):
    return run_build(tiny_llama, tmp_path_factory.mktemp("lmout"), runs=2, block_size=16)


def _dir(m):
    from pathlib import Path

    return Path(m["build_dir"])


def test_decoder_is_exported_with_its_cache_and_checked_against_pytorch(llama_build):
    export = next(s for s in llama_build["stages"] if s["stage"] == "export")
    assert export["metrics"]["greedy_match"] is True
    assert all(g["match"] and g["matching_prefix"] == g["tokens"] >= 1 for g in export["metrics"]["greedy"])
    assert export["metrics"]["max_abs_diff"] < 1e-3
    inputs = {i.name for i in onnx.load(str(_dir(llama_build) / "model.fp32.onnx"), load_external_data=False).graph.input}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= inputs
    assert llama_build["config"]["family"] == "causal-lm" and llama_build["config"]["modes"] == ["dynamic", "int4"]


def test_kv_cache_decoding_equals_recomputing_the_whole_sequence(llama_build):
    """The cache path (one token per call) must give the logits a full forward pass gives."""
    from edgeq.causal_lm import session
    from edgeq.pipeline.runners.lm_runtime import KVModel

    lm = KVModel(session(_dir(llama_build) / "model.fp32.onnx"))
    ids = np.array([[5, 17, 42, 8, 99, 3, 12]], dtype=np.int64)
    full, _ = lm.forward(ids, lm.empty_past(1), 0)
    logits, past = lm.forward(ids[:, :3], lm.empty_past(1), 0)
    steps = [logits[:, -1]]
    for t in range(3, ids.shape[1]):
        logits, past = lm.forward(ids[:, t:t + 1], past, t)
        steps.append(logits[:, -1])
    np.testing.assert_allclose(np.stack(steps, 1)[0], full[0, 2:], atol=1e-4)
    assert past["past_key_values.0.key"].shape[2] == ids.shape[1]


def test_int4_is_block_wise_with_quantized_embeddings(llama_build):
    g = onnx.load(str(_dir(llama_build) / "model.int4.onnx")).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in nbits}
    assert nbits and all(a["block_size"] == 16 and a["accuracy_level"] == 4 for a in attrs.values())
    # every projection at 4 bits, the LM head (it computes the logits) at 8
    assert {n: a["bits"] for n, a in attrs.items() if a["bits"] == 8} == {"/lm_head/MatMul_Q8": 8}
    assert sum(a["bits"] == 4 for a in attrs.values()) == 10
    assert any(n.op_type == "GatherBlockQuantized" for n in g.node)
    # every weight MatMul went to int4: the only MatMuls left multiply activations (attention)
    inits = {i.name for i in g.initializer}
    assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    arts = {a["name"]: a for a in llama_build["artifacts"]}
    assert arts["int4"]["metrics"]["size_vs_fp32"] < arts["int8-dynamic"]["metrics"]["size_vs_fp32"] < 1


def test_perplexity_and_generation_speed_are_recorded(llama_build):
    arts = {a["name"]: a["metrics"] for a in llama_build["artifacts"]}
    for name, m in arts.items():
        assert m["task"]["metric"] == "perplexity" and m["task"]["value"] > 1
        assert m["decode_tokens_per_s"] > 0 and m["prefill_p50_ms"] > 0
        assert m["speedup_vs_fp32"] == pytest.approx(m["decode_tokens_per_s"] / arts["fp32"]["decode_tokens_per_s"],
                                                     rel=1e-2)
    assert arts["fp32"]["task"]["delta_vs_fp32"] == 0 and arts["fp32"]["top1_agreement"] == 1.0
    # a random model is near-uniform: perplexity close to the vocabulary size, int8 very close to fp32
    assert abs(arts["int8-dynamic"]["task"]["relative_vs_fp32"]) < 0.05


def test_perplexity_matches_a_direct_computation(llama_build, tiny_llama):
    """The recorded fp32 perplexity is exp(mean NLL) of PyTorch's model on the same token rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeq.calib import default_eval_path, read_texts

    cfg = llama_build["config"]
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    nll, n = 0.0, 0
    for t in read_texts(default_eval_path(), limit=cfg["evaluation"]["samples"] or 120):
        ids = tok(t, return_tensors="pt", truncation=True, max_length=cfg["max_length"]).input_ids
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        nll -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        n += ids.shape[1] - 1
    fp32 = next(a for a in llama_build["artifacts"] if a["name"] == "fp32")
    assert fp32["metrics"]["task"]["value"] == pytest.approx(np.exp(nll / n), rel=1e-3)


def test_generate_command_streams_greedy_text(llama_build):
    from transformers import AutoTokenizer

    from edgeq.cli import cli
    from edgeq.causal_lm import session
    from edgeq.pipeline.runners.lm_runtime import KVModel

    d = _dir(llama_build)
    r = CliRunner().invoke(cli, ["generate", str(d), "the model is", "-n", "8", "-a", "fp32"])
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    ids = tok("the model is", return_tensors="np")["input_ids"].astype(np.int64)
    out = KVModel(session(d / "model.fp32.onnx")).generate(ids, 8, eos={tok.eos_token_id})[0][0].tolist()
    expect = tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=True)
    assert r.stdout.strip() == expect.strip()
    assert "tokens/s" in r.stderr
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "edgeq", "generate", str(d), "hi", "-a", "int2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"edgeq: error: no artifact 'int2' in {d} (it has: fp32, int8-dynamic, int4)"]


def test_language_model_user_errors(tiny_llama, tmp_path):
    from edgeq.config import resolve_config

    with pytest.raises(EdgeqError, match="mode static is not built for causal language models"):
        resolve_config(model=str(tiny_llama), out=str(tmp_path), modes=("static",))
    with pytest.raises(EdgeqError, match="--block-size must be a power of two from 16 to 256"):
        resolve_config(model=str(tiny_llama), out=str(tmp_path), block_size=48)
    with pytest.raises(EdgeqError, match="mode hybrid is not built"):
        resolve_config(model=str(tiny_llama), out=str(tmp_path), modes=("hybrid",))
    # for a causal LM --max-accuracy-drop is a gate only (relative perplexity), not a hybrid build
    cfg = resolve_config(model=str(tiny_llama), out=str(tmp_path), max_accuracy_drop=0.05)
    assert "hybrid" not in cfg.modes and cfg.gates.max_accuracy_drop == 0.05
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    cfg = resolve_config(model=str(bad), out=str(tmp_path / "o"))
    assert cfg.family == "causal-lm" and cfg.model_kind == "gguf"
    from edgeq.build import build
    with pytest.raises(EdgeqError, match="cannot load broken.gguf as a causal language model"):
        build(cfg, log=lambda m: None)
    assert not any((tmp_path / "o").rglob("manifest.json"))


def test_manifest_records_the_int4_recipe(llama_build):
    q = next(s for s in llama_build["stages"] if s["stage"] == "quantize")
    assert q["settings"]["int4"]["block_size"] == 16 and q["settings"]["int4"]["accuracy_level"] == 4
    # a float checkpoint's default: GPTQ on the calibration text, asymmetric blocks
    assert q["settings"]["int4"]["algorithm"] == "gptq" and q["settings"]["int4"]["symmetric"] is False
    assert q["settings"]["int4"]["calibration"]["samples"] > 0
    # 2 layers x (packed qkv, o, gate, up, down) at 4 bits; the LM head at 8
    assert q["metrics"]["int4"]["MatMulNBits"] == 10 and q["metrics"]["int4"]["MatMulNBits_8bit"] == 1
    assert q["metrics"]["int4"]["head"] == "/lm_head/MatMul"
    on_disk = disk_manifest(_dir(llama_build) / "manifest.json")
    assert on_disk["artifacts"][2]["recipe"]["mode"] == "int4"


def test_gguf_grid_repack_is_exact_and_handles_shared_weights(tmp_path):
    """Weights on GGUF's Q4_1 / Q8_0 grids become MatMulNBits with the same values: the repacked
    model computes what the fp32 one does (up to the kernel's arithmetic), even when two MatMuls
    share a weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.pipeline.ops.int4 import repack_gguf_grids

    rng = np.random.default_rng(0)
    k, n = 64, 8
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # as GGUF makes them: each block spans its whole 4-bit range
    d, m = rng.uniform(0.01, 0.05, (n, k // 32, 1)), rng.uniform(-0.3, 0.0, (n, k // 32, 1))
    w4 = (d * q + m).reshape(n, k).T.astype(np.float32)  # Q4_1: blocks of 32 along K
    q8 = rng.integers(-127, 128, size=(n, k // 32, 32))
    q8[..., 0] = 127  # Q8_0's scale is the block's absolute maximum / 127
    w8 = (rng.uniform(0.001, 0.01, (n, k // 32, 1)) * q8).reshape(n, k).T.astype(np.float32)  # Q8_0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 3, n]) for o in ("a", "b", "c")]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w4"], ["a"], "m1"),
                           helper.make_node("MatMul", ["x", "w4"], ["b"], "m2"),
                           helper.make_node("MatMul", ["x", "w8"], ["c"], "m3")], "g", [x], outs,
                          [numpy_helper.from_array(w4, "w4"), numpy_helper.from_array(w8, "w8")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    stats = repack_gguf_grids(src, tmp_path / "q.onnx", accuracy_level=0)
    assert stats["q4_1_exact"] == 2 and stats["q8_0_exact"] == 1 and stats["off_grid"] == 0
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    # the two Q4_1 MatMuls reading x are packed into one MatMulNBits (N = 2n) and split after
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert stats["q4_1_packed_groups"] == 1 and ops.count("MatMulNBits") == 2 and ops.count("Split") == 1
    feeds = {"x": rng.normal(size=(1, 3, k)).astype(np.float32)}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for r, o in zip(ref, got):
        np.testing.assert_allclose(o, r, atol=1e-4)


def test_attention_is_fused_into_group_query_attention(llama_build):
    """optimize: each layer's exported attention (rotary, cache concat, repeat_kv, mask, shape
    arithmetic) becomes one GroupQueryAttention; the graph shrinks and takes no position_ids. That
    the fused model computes what PyTorch does is checked by the perplexity and cache tests above."""
    opt = next(s for s in llama_build["stages"] if s["stage"] == "optimize")
    layers = 2  # the tiny Llama's
    assert opt["metrics"]["fused_ops"] == {"GroupQueryAttention": layers}
    assert opt["settings"]["fusion"] == {"model_type": "llama", "attention": "GroupQueryAttention"}
    ops = opt["metrics"]["ops_after"]
    assert ops["GroupQueryAttention"] == layers and "Softmax" not in ops and "Expand" not in ops
    assert opt["metrics"]["nodes_after"] < opt["metrics"]["nodes_before"] / 3
    g = onnx.load(str(_dir(llama_build) / "model.fp32.onnx"), load_external_data=False).graph
    assert "position_ids" not in {i.name for i in g.input}
    assert [o.name for o in g.output] == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    # q/k/v are one MatMul whose output GroupQueryAttention reads packed (key and value inputs empty)
    inits = {i.name: i for i in g.initializer}
    for gqa in [n for n in g.node if n.op_type == "GroupQueryAttention"]:
        assert gqa.input[1] == gqa.input[2] == ""
        qkv = next(n for n in g.node if gqa.input[0] in n.output)
        assert qkv.op_type == "MatMul" and qkv.name.endswith("qkv_proj/MatMul")
        heads, kv = ({a.name: a.i for a in gqa.attribute}[k] for k in ("num_heads", "kv_num_heads"))
        hidden = inits[qkv.input[1]].dims[0]
        assert list(inits[qkv.input[1]].dims) == [hidden, hidden + 2 * kv * hidden // heads]
    assert not [n for n in g.node if n.name.endswith(("/q_proj/MatMul", "/k_proj/MatMul", "/v_proj/MatMul"))]
    # the int4 artifact keeps the fused attention and quantizes the projections around it
    g4 = onnx.load(str(_dir(llama_build) / "model.int4.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "GroupQueryAttention" for n in g4.node) == layers


def test_attention_fusion_is_checked_against_the_export(llama_build, tiny_llama):
    """A fusion that does not compute what the export does is caught: with the wrong rotary base
    the check sees the logits move; with the right one they agree to float precision."""
    from edgeq.pipeline.ops import lm_fusion
    from edgeq.causal_lm import session

    exported = _dir(llama_build) / "work" / "export" / "model.onnx"
    cfg = json.loads((tiny_llama / "config.json").read_text())
    results = {}
    for theta in (cfg.get("rope_theta", 10000.0), 1234.0):
        model = onnx.load(str(exported))
        assert lm_fusion.fuse_group_query_attention(model, {**cfg, "rope_theta": theta}) == cfg["num_hidden_layers"]
        path = exported.with_name(f"fused-{theta}.onnx")
        onnx.save(model, str(path))
        results[theta] = lm_fusion.check_fused(session(exported), session(path), cfg["vocab_size"])
        path.unlink()
    good, bad = results[cfg.get("rope_theta", 10000.0)], results[1234.0]
    assert good["greedy_same"] and good["max_logit_diff"] < 1e-4 * max(1.0, good["logit_scale"])
    assert bad["max_logit_diff"] > 100 * good["max_logit_diff"] and bad["max_cache_diff"] > 1e-3


def test_attention_fusion_applies_only_to_llama_attention():
    from edgeq.pipeline.ops import lm_fusion

    base = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
            "max_position_embeddings": 128}
    assert lm_fusion.fusable(base) is None
    assert "rope_scaling" in lm_fusion.fusable({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert "sliding-window" in lm_fusion.fusable({**base, "model_type": "mistral", "sliding_window": 4096})
    assert "bias" in lm_fusion.fusable({**base, "attention_bias": True})
    assert "gpt2" in lm_fusion.fusable({**base, "model_type": "gpt2"})
    assert "num_hidden_layers" in lm_fusion.fusable({**base, "num_hidden_layers": "2"})
    # a graph without the exporter's projection nodes is left untouched
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["attention_mask"], ["logits"])], "g",
                          [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 4])])
    m = helper.make_model(g)
    assert lm_fusion.fuse_group_query_attention(m, base) == 0 and len(m.graph.node) == 1


def test_dynamic_int8_is_smoothed_with_statistics_from_calibration_text(llama_build, tiny_llama):
    """The calibrate stage runs each calibration text through the fp32 LM and keeps the per-channel
    |max| of every projection's input; the int8-dynamic artifact is SmoothQuant-ed with them. Where
    the input comes from an RMSNorm's scale (q/k/v, gate/up, lm_head), the division is folded into
    that scale; o_proj and down_proj get a Mul each."""
    from edgeq.pipeline.ops import smooth

    cal = next(s for s in llama_build["stages"] if s["stage"] == "calibrate")
    assert cal["outputs"] == ["calibration/absmax.npz"] and cal["metrics"]["tokens"] > 0
    layers = 2
    stats = smooth.load_absmax(_dir(llama_build) / "calibration" / "absmax.npz")
    assert len(stats) == layers * 5 + 1 and all(np.all(v >= 0) and v.any() for v in stats.values())
    q = next(s for s in llama_build["stages"] if s["stage"] == "quantize")
    assert q["settings"]["dynamic"]["smoothquant"] == {"alpha": 0.75, "nodes": layers * 5 + 1}
    g = onnx.load(str(_dir(llama_build) / "model.int8-dynamic.onnx")).graph
    smoothing = sorted(n.name for n in g.node if n.op_type == "Mul" and n.name.endswith("_smooth"))
    assert smoothing == sorted(f"/model/layers.{i}/{p}/MatMul_smooth" for i in range(layers)
                               for p in ("self_attn/o_proj", "mlp/down_proj"))
    # folded: the Mul by the RMSNorm weight that feeds layer 0's q/k/v now divides by s as well
    from onnx import numpy_helper

    def scale_of(graph, mul_name):
        inits = {i.name: i for i in graph.initializer}
        mul = next(n for n in graph.node if n.name == mul_name)
        return numpy_helper.to_array(inits[next(i for i in mul.input if i in inits)])

    fp = onnx.load(str(_dir(llama_build) / "model.fp32.onnx")).graph
    x = next(n for n in fp.node if n.name == "/model/layers.0/self_attn/qkv_proj/MatMul").input[0]
    mul = next(n for n in fp.node if x in n.output)
    assert mul.op_type == "Mul"
    before, after = scale_of(fp, mul.name), scale_of(g, mul.name)
    assert before.shape == after.shape and not np.allclose(before, after)
    # a rebuild into the same --out reuses the statistics and makes the same artifact
    import hashlib

    digest = hashlib.sha256((_dir(llama_build) / "model.int8-dynamic.onnx").read_bytes()).hexdigest()
    again = run_build(tiny_llama, _dir(llama_build).parents[1], runs=2, block_size=16)
    assert next(s for s in again["stages"] if s["stage"] == "calibrate")["reused"] is True
    assert hashlib.sha256((_dir(again) / "model.int8-dynamic.onnx").read_bytes()).hexdigest() == digest
