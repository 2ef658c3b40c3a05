"""Weight-only int4 methods (--int4-algo) and NF4: the grid and its packing into MatMulNBits, GPTQ
and AWQ against round to nearest, one artifact per algorithm in a build, and the settings a user
can get wrong (on a tiny random Llama; SmolLM2 in test_e2e_models)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_build
from edgeq.pipeline.ops import weight_only as wo


def _nbits_model(q, scales, zps, symmetric, block, k, n, bits=4):
    b, sc, zp = wo.pack_matmul_nbits(q, scales, zps, symmetric, block)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(sc, "S")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
    node = helper.make_node("MatMulNBits", ["x"] + [i.name for i in inits], ["y"], domain="com.microsoft",
                            bits=bits, K=k, N=n, block_size=block, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k,n,block,symmetric", [(96, 40, 32, True), (96, 40, 32, False), (80, 24, 32, False),
                                                  (80, 24, 32, True), (96, 8, 64, False)])
def test_packed_weights_compute_what_the_grid_says(k, n, block, symmetric):
    """What onnxruntime's MatMulNBits computes from the packed tensors equals x @ the de-quantized
    grid, with a short last block (K not a multiple of the block) too."""
    rng = np.random.default_rng(k + n)
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(5, k)).astype(np.float32)
    q, s, z = wo.quantize_blocks(w, block, symmetric)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == z.shape == (-(-k // block), n)
    deq = wo.dequantize_blocks(q, s, z, block)
    step = np.repeat(np.abs(s), block, 0)[:k]
    if symmetric:
        # zero point 8; each block's largest magnitude lands exactly on -8 steps, and nothing is off
        # by more than a step (the one value past +7 steps, clipped)
        assert (z == 8).all()
        blocks = [slice(i, i + block) for i in range(0, k, block)]
        for b in blocks:
            top = np.abs(w[b]).argmax(0)
            np.testing.assert_allclose(deq[b][top, np.arange(n)], w[b][top, np.arange(n)], rtol=1e-5)
        assert (np.abs(deq - w) <= step * 1.0001).all()
    else:  # min and max inside the grid: half a step at most, but for the zero point's rounding
        assert (np.abs(deq - w) <= step * 1.0001).all()
    got = _nbits_model(q, s, z, symmetric, block, k, n).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ deq, atol=1e-4)


def _correlated_inputs(rng, k, rows=400):
    """Activations like an LM's: channels of very different scale, correlated."""
    mix = rng.normal(size=(k, k)).astype(np.float32) / np.sqrt(k)
    return (rng.normal(size=(rows, k)).astype(np.float32) @ mix) * np.linspace(0.1, 4, k).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_errs_less_than_round_to_nearest_on_the_layer_output(symmetric):
    rng = np.random.default_rng(1)
    k, n, block = 128, 48, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = _correlated_inputs(rng, k)
    err = {}
    for name, (q, s, z) in {"rtn": wo.quantize_blocks(w, block, symmetric),
                            "gptq": wo.gptq(w, x.T @ x, block, symmetric),
                            "gptq-in-order": wo.gptq(w, x.T @ x, block, symmetric, act_order=False)}.items():
        assert q.shape == w.shape and q.min() >= 0 and q.max() <= 15
        err[name] = float(np.square(x @ wo.dequantize_blocks(q, s, z, block) - x @ w).mean())
    assert err["gptq"] < 0.6 * err["rtn"], err
    assert err["gptq-in-order"] < err["rtn"], err


def test_awq_scales_protect_the_channels_with_large_activations():
    rng = np.random.default_rng(2)
    k, n, block = 128, 64, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(256, k)).astype(np.float32)
    x[:, :4] *= 30  # a few outlier channels, as LMs have
    s, alpha, ratio = wo.awq_scales([w], x, np.abs(x).mean(0), block, symmetric=False)
    assert alpha > 0 and ratio < 0.9 and s[:4].min() > np.median(s)
    ref = x @ w
    plain = wo.dequantize_blocks(*wo.quantize_blocks(w, block, False), block)
    scaled = wo.dequantize_blocks(*wo.quantize_blocks(w * s[:, None], block, False), block)
    e_plain = np.square(x @ plain - ref).mean()
    e_awq = np.square((x / s) @ scaled - ref).mean()
    assert e_awq < 0.9 * e_plain
    clip = wo.awq_clip(w * s[:, None], x / s, block, False)
    assert clip.shape == (k // block, n) and clip.min() >= min(wo.CLIPS) and clip.max() <= 1.0
    e_clip = np.square((x / s) @ wo.dequantize_blocks(*wo.quantize_blocks(w * s[:, None], block, False, clip), block)
                       - ref).mean()
    assert e_clip <= e_awq * 1.0001


@pytest.fixture(scope="module")
def algo_build(tiny_llama, tmp_path_factory):
    return run_build(tiny_llama, tmp_path_factory.mktemp("algos"), runs=1, block_size=16, target="x86_64",
                     modes=("int4", "nf4"), int4_algos=("rtn,gptq", "awq", "hqq"))


def test_each_algorithm_is_its_own_artifact_measured_like_the_others(algo_build):
    from pathlib import Path

    arts = {a["name"]: a for a in algo_build["artifacts"]}
    assert list(arts) == ["fp32", "int4-rtn", "int4-gptq", "int4-awq", "int4-hqq", "nf4"]
    d = Path(algo_build["build_dir"])
    q = next(s for s in algo_build["stages"] if s["stage"] == "quantize")
    for name in ("int4-rtn", "int4-gptq", "int4-awq", "int4-hqq"):
        algo = name.split("-")[1]
        assert arts[name]["recipe"]["algorithm"] == algo and q["settings"][name]["algorithm"] == algo
        g = onnx.load(str(d / f"model.{name}.onnx"), load_external_data=False).graph
        assert sum(n.op_type == "MatMulNBits" for n in g.node) == 11  # 10 projections and the head
        assert q["metrics"][name]["quantize_seconds"] >= 0
    assert q["settings"]["int4-gptq"]["symmetric"] is False and q["settings"]["int4-rtn"]["symmetric"] is True
    assert q["metrics"]["int4-awq"]["scaled_inputs"] >= 1
    g = onnx.load(str(d / "model.nf4.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulBnb4" for n in g.node) == 10
    for name, a in arts.items():
        m = a["metrics"]
        assert m["task"]["metric"] == "perplexity" and np.isfinite(m["task"]["value"])
        assert m["decode_tokens_per_s"] > 0 and 0 <= m["top1_agreement"] <= 1
        gr = m["greedy_vs_fp32"]
        assert gr["prompts"] == len(gr["matching_prefix"]) >= 1 and all(0 <= p <= gr["tokens"] for p in gr["matching_prefix"])
        if name == "fp32":
            assert gr["identical"] == gr["prompts"]
    # a random Llama has no structure to lose: every method stays within a few percent of fp32
    assert all(abs(a["metrics"]["task"]["relative_vs_fp32"]) < 0.05 for a in arts.values())


def test_awq_scales_fold_into_the_graph_without_changing_what_it_computes(algo_build):
    """AWQ's 1/s goes into the RMSNorm weights and the up-projections' output columns, s into the
    weights: the scaled float model computes what fp32 does, logits and cache alike."""
    from pathlib import Path

    from edgeq.pipeline.ops.int4 import output_projection
    from edgeq.pipeline.runners.lm_runtime import KVModel

    src = Path(algo_build["build_dir"]) / "model.fp32.onnx"
    model = onnx.load(str(src))
    groups = wo.quantizable_groups(model, [output_projection(model)])
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 200, size=(1, n)).astype(np.int64) for n in (9, 17, 5)]
    stats = wo.collect_stats(model, groups, rows, want_h=False, want_sample=True, sample_rows=16)
    # every token but each prompt's first (the attention sink, left out of AWQ's statistics)
    assert all(st.tokens == 31 - 3 and 1 <= len(st.rows()) <= 16 for st in stats.values())
    inits = {i.name: i for i in model.graph.initializer}
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for g in groups.values() for n in g}
    before = {k: v.copy() for k, v in weights.items()}
    clips, report = wo.awq_apply(model, groups, inits, weights, stats, 16, False)
    # per layer: q/k/v after the input norm, gate/up after the post-attention norm, down after up*gate
    # are scaled; o_proj (after attention) has nowhere to fold 1/s
    assert report["scaled_inputs"] == 3 * report["unscaled_inputs"] > 0
    assert sum(not np.allclose(weights[k], before[k]) for k in weights) >= report["scaled_inputs"]
    assert set(clips) == set(weights)
    for g in groups.values():
        for n in g:
            t = inits[n.input[1]]
            t.CopyFrom(numpy_helper.from_array(weights[n.name], t.name))

    def run(m):
        lm = KVModel(ort.InferenceSession(m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m),
                                          providers=["CPUExecutionProvider"]))
        return lm.forward(rows[1], lm.empty_past(1), 0)[0]

    ref, got = run(src), run(model)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()))


def test_summary_table_compares_the_methods(algo_build):
    from edgeq.summary import json_summary, summary_table

    table = summary_table(algo_build).splitlines()
    head = table[1].split()
    assert head[:8] == ["artifact", "precision", "size", "MB", "size", "x", "perplexity", "ppl"]
    assert {"top1", "greedy", "tok/s", "quant"} <= set(head)
    rows = {line.split()[0]: line.split() for line in table[3:9]}
    assert set(rows) == {"fp32", "int4-rtn", "int4-gptq", "int4-awq", "int4-hqq", "nf4"}
    assert rows["nf4"][1] == "nf4" and rows["int4-gptq"][1] == "int4"
    js = {a["name"]: a["metrics"] for a in json_summary(algo_build)["artifacts"]}
    for m in js.values():  # what --json gives CI for a causal LM
        assert {"task", "top1_agreement", "decode_tokens_per_s", "prefill_p50_ms", "greedy_vs_fp32"} <= set(m)
    assert js["int4-gptq"]["greedy_vs_fp32"] == next(
        a for a in algo_build["artifacts"] if a["name"] == "int4-gptq")["metrics"]["greedy_vs_fp32"]


@pytest.mark.parametrize("args,message", [
    (["--int4-algo", "gptq", "--block-size", "48"], "--block-size must be a power of two from 16 to 256"),
    (["--int4-algo", "spqr"], "unknown --int4-algo 'spqr' (choose from: rtn, gptq, awq, hqq, kquant, gguf)"),
    (["--int4-algo", "gguf"], "--int4-algo gguf repacks a GGUF file's own quantized weights; tiny-llama is not a .gguf"),
    (["--int4-algo", "gptq", "--mode", "dynamic"], "this build makes no int4 artifact (add --mode int4)"),
    (["--mode", "nf4", "--target", "coreml"], "--mode nf4: ONNX Runtime has MatMulBnb4 kernels only on the CPU and CUDA"),
    (["--mode", "static"], "mode static is not built for causal language models"),
])
def test_bad_int4_settings_are_one_line_exit_2(tiny_llama, tmp_path, monkeypatch, capsys, args, message):
    code, err = _edgeq(monkeypatch, capsys, ["build", str(tiny_llama), "--out", str(tmp_path), *args])
    assert code == 2 and err.count("\n") == 1 and err.startswith("edgeq: error: ") and message in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_calibrated_algorithms_are_for_causal_lms(tiny_bert, tmp_path, monkeypatch, capsys):
    code, err = _edgeq(monkeypatch, capsys, ["build", str(tiny_bert), "--out", str(tmp_path), "--mode", "int4",
                                             "--int4-algo", "awq"])
    assert code == 2 and "--int4-algo awq is for causal language models" in err, err


def _edgeq(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """`edgeq ARGS` in this process, as a user's shell runs it: (exit code, stderr)."""
    import sys

    from edgeq import cli

    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)  # keep this process's own handlers
    monkeypatch.setattr(sys, "argv", ["edgeq", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err
