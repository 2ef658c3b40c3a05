"""A user's own Q/DQ model as input (issue 19): a QAT export by torch.onnx (FakeQuantize written as
QuantizeLinear/DequantizeLinear, float weights) and ONNX Runtime's static QDQ (int8 weights) are
built as `int8-qdq` with their own scales and zero points, beside a float reference made by taking
the Q/DQ nodes out (pipeline/ops/qdq.py); models with integer operators are refused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import run_build
from foreign_exports import export_qdq

from edgeq.pipeline.ops import qdq

FEEDS = ("input_ids", "attention_mask", "token_type_ids")


def _run(model, feeds: dict) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _scales(model) -> list[bytes]:
    """Every DequantizeLinear's and every activation QuantizeLinear's scale and zero point."""
    consts = qdq._constants(model)
    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" or (n.op_type == "QuantizeLinear" and n.input[0] not in consts):
            out.append(n.op_type.encode() + b"".join(consts[i].tobytes() for i in n.input[1:] if i))
    return sorted(out)


@pytest.fixture(scope="module")
def qat_export(tiny_bert, tmp_path_factory) -> Path:
    return export_qdq(tiny_bert, tmp_path_factory.mktemp("qat-export") / "model.onnx")


@pytest.fixture(scope="module")
def qdq_build(qat_export, tmp_path_factory) -> dict:
    return run_build(qat_export, tmp_path_factory.mktemp("qdq-out"), target="x86_64", modes=("static",))


def test_qat_export_is_kept_with_its_scales(qat_export, qdq_build):
    by = {a["name"]: a for a in qdq_build["artifacts"]}
    assert set(by) == {"fp32", "int8-qdq", "int8-static"}  # the given model is always built, beside what is asked
    bdir = Path(qdq_build["build_dir"])
    given, art = onnx.load(str(qat_export)), onnx.load(str(bdir / "model.int8-qdq.onnx"))
    assert _scales(art) == _scales(given)  # the user's scales and zero points, all of them
    ref = np.load(qat_export.parent / "reference.npz")
    feeds = {k: ref[k] for k in FEEDS}
    # the same computation: the weights quantized once here give exactly what the given graph computes
    np.testing.assert_array_equal(_run(art, feeds), _run(given, feeds))
    np.testing.assert_allclose(_run(given, feeds), ref["fake_quantized"], atol=1e-5)
    recipe = by["int8-qdq"]["recipe"]
    assert recipe["mode"] == "qdq" and by["int8-qdq"]["precision"] == "int8"
    assert recipe["weights_quantized_at_build"] == 12  # 2 layers x 6 Linear
    assert recipe["weight_types"] == {"int8": 12} and recipe["activation_types"] == {"uint8": 8}
    assert recipe["weight_per_channel"] is True and recipe["weight_symmetric"] is True
    assert recipe["activation_symmetric"] is False
    consts = qdq._constants(art)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in consts for n in art.graph.node)
    assert (bdir / "model.int8-qdq.onnx").stat().st_size < 0.85 * qat_export.stat().st_size
    # the float reference: no Q/DQ node left, and it computes the float model PyTorch had
    export = next(s for s in qdq_build["stages"] if s["stage"] == "export")
    removed = export["settings"]["qdq_removed"]
    assert (removed["activation_pairs"], removed["float_weights"]) == (8, 12)
    assert not _ops(bdir / "model.fp32.onnx") & {"QuantizeLinear", "DequantizeLinear"}
    np.testing.assert_allclose(_run(bdir / "model.fp32.onnx", feeds), ref["float"], atol=1e-4)
    # evaluated, benchmarked and packaged like every other artifact
    assert 0.9 < by["int8-qdq"]["metrics"]["cosine"] <= 1.0 + 1e-6
    assert by["int8-qdq"]["metrics"]["latency_p50_ms"] > 0
    assert any(f["path"] == "model.int8-qdq.onnx" for f in qdq_build["files"])


def test_onnxruntime_qdq_model_with_int8_weights(qdq_build, tmp_path):
    """ORT's own static QDQ (int8 weight initializers, symmetric int8 activations, as TensorRT
    takes them): nothing to quantize at build time, and the float reference holds its de-quantized
    weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    bdir = Path(qdq_build["build_dir"])
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(5, 300, (2, 10)), "attention_mask": np.ones((2, 10), np.int64),
                "token_type_ids": np.zeros((2, 10), np.int64)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    src = tmp_path / "given"
    src.mkdir()
    for f in (bdir / "tokenizer").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    float_model = bdir / "model.fp32.onnx"  # the QAT export's float reference, fused (its weights constants)
    quantize_static(str(float_model), str(src / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"], extra_options={"ActivationSymmetric": True})
    m = run_build(src / "model.onnx", tmp_path / "out", target="x86_64")
    by = {a["name"]: a for a in m["artifacts"]}
    assert set(by) == {"fp32", "int8-qdq"}
    recipe = by["int8-qdq"]["recipe"]
    assert by["int8-qdq"]["precision"] == "int8" and recipe["weights_quantized_at_build"] == 0
    assert set(recipe["activation_types"]) == {"int8"} and recipe["activation_symmetric"] is True
    assert _scales(onnx.load(str(Path(m["build_dir"]) / "model.int8-qdq.onnx"))) == _scales(onnx.load(str(src / "model.onnx")))
    export = next(s for s in m["stages"] if s["stage"] == "export")
    given = onnx.load(str(src / "model.onnx"))
    inits = {i.name for i in given.graph.initializer}
    weights = sum(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in given.graph.node)
    assert weights >= 6  # at least each layer's attention output and FFN MatMuls
    assert export["settings"]["qdq_removed"]["dequantized_weights"] == weights
    feeds = {k: v for k, v in batches[0].items()}
    ref = _run(float_model, feeds)
    got = _run(Path(m["build_dir"]) / "model.fp32.onnx", feeds)
    err = float(np.abs(ref - got).max())
    assert 0 < err < 0.05 * float(np.abs(ref).max())  # de-quantized int8 weights: close to the float ones, not equal


def test_quantized_inputs_refused_exit_2(qat_export, qdq_build, tmp_path):
    bdir = Path(qdq_build["build_dir"])
    bad = tmp_path / "bad"
    bad.mkdir()
    m = onnx.load(str(qat_export))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in qdq._constants(m))
    m.graph.output.append(helper.make_tensor_value_info(q.output[0], onnx.TensorProto.UINT8, ["b", "s", 32]))
    onnx.save(m, str(bad / "model.onnx"))
    tok = ["--tokenizer", str(bdir / "tokenizer")]
    for args, message in [
        ([str(bdir / "model.int8-static.onnx"), *tok], "is already quantized (DynamicQuantizeLinear"),
        ([str(bdir / "model.fp32.onnx"), *tok, "--mode", "qdq"], "--mode qdq keeps a Q/DQ model as it is given"),
        ([str(bad / "model.onnx"), *tok], "cannot make the float model of this Q/DQ graph: QuantizeLinear"),
    ]:
        out = tmp_path / "out"
        r = subprocess.run([sys.executable, "-m", "edgeq", "build", *args, "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not list(out.rglob("manifest.json")) and not list(out.rglob("*.onnx"))


def test_float_reference_keeps_the_relu_the_quantizer_folded(tmp_path):
    """ONNX Runtime's QDQ quantizer drops a Conv's ReLU6 when the output's range is [0, 6]: the Q/DQ
    pair then does the clamping, and the float reference must keep it (as a Clip), or it computes
    another function. Biases are int32 there, counted apart from the weights."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from tiny_cnn import factory

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    float_path, qdq_path = tmp_path / "cnn.onnx", tmp_path / "cnn-qdq.onnx"
    with torch.no_grad():
        torch.onnx.export(factory(), x[:1], str(float_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "b"}})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x.numpy()}])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    given = onnx.load(str(qdq_path))
    assert "Clip" not in {n.op_type for n in given.graph.node}  # folded into the Q/DQ ranges
    facts = qdq.describe(given)
    assert facts["quantized_biases"] == 4 and facts["weight_types"] == {"int8": 4}
    stripped, counts = qdq.strip(given)
    onnx.checker.check_model(stripped)
    assert counts["clamping_pairs"] >= 3  # the three ReLU6 outputs at least
    assert not {n.op_type for n in stripped.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    feeds = {"input": x.numpy()}
    ref, got, quantized = _run(float_path, feeds), _run(stripped, feeds), _run(given, feeds)
    # de-quantized weights: closer to the float model than the Q/DQ model is, and not equal to it
    assert 0 < np.abs(got - ref).max() < np.abs(quantized - ref).max()


def _graph(nodes, inits, outputs=("y",), opset=17, inputs=(("x", [1, 3]),), extra_inputs=()):
    from onnx import TensorProto, numpy_helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs] + list(extra_inputs)
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["a", "b"]) for o in outputs]
    g = helper.make_graph(nodes, "g", ins, outs, [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _same(model, x) -> tuple[np.ndarray, np.ndarray]:
    stripped, _ = qdq.strip(model)
    onnx.checker.check_model(stripped)
    return _run(stripped, {"x": x}), x


def test_strip_on_hand_built_graphs():
    s, z = np.float32(0.1), np.uint8(128)
    x = np.array([[-3.0, 0.5, 3.0]], np.float32)
    # a DequantizeLinear output that is a graph output, and one Q read by two DQs
    m = _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d2"]),
                helper.make_node("Relu", ["d2"], ["y2"])], {"s": s, "z": z}, outputs=("y", "y2"))
    stripped, counts = qdq.strip(m)
    got = ort.InferenceSession(stripped.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[1], np.maximum(x, 0))
    assert counts == {"activation_pairs": 2} and not stripped.graph.initializer  # scales pruned
    # the range 0..127 of a QAT fake quantization: torch.onnx writes Q -> Clip(0, 127) -> DQ; kept as a clamp
    m = _graph([helper.make_node("QuantizeLinear", ["x", "s", "z0"], ["q"]),
                helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
                helper.make_node("DequantizeLinear", ["c", "s", "z0"], ["y"])],
               {"s": s, "z0": np.uint8(0), "lo": np.uint8(0), "hi": np.uint8(127)})
    got, _ = _same(m, np.array([[-1.0, 5.0, 20.0]], np.float32))
    np.testing.assert_allclose(got, [[0.0, 5.0, 12.7]], rtol=1e-6)
    # opset 21's output_dtype, no zero point: int8 around 0, not uint8 from 0 (no clamp)
    m = _graph([helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=onnx.TensorProto.INT8),
                helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], {"s": s}, opset=21)
    got, x0 = _same(m, x)
    np.testing.assert_array_equal(got, x0)
    assert qdq.describe(m)["activation_types"] == {"int8": 1} and qdq.describe(m)["activation_symmetric"] is True
    # a per-channel int8 weight on a non-square matrix, listed as a graph input too (old exporters):
    # de-quantized exactly as ONNX Runtime's DequantizeLinear does, and the input entry goes with it
    w = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    ws = np.array([0.5, 0.25, 0.125, 2.0], np.float32)
    wz = np.array([0, 1, -1, 2], np.int8)
    winput = helper.make_tensor_value_info("w", onnx.TensorProto.INT8, [3, 4])
    m = _graph([helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=1),
                helper.make_node("MatMul", ["x", "wf"], ["y"])], {"w": w, "ws": ws, "wz": wz}, extra_inputs=[winput])
    stripped, counts = qdq.strip(m)
    assert counts == {"dequantized_weights": 1} and [i.name for i in stripped.graph.input] == ["x"]
    dq = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["o"], axis=1)], "dq", [],
        [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [3, 4])],
        [onnx.numpy_helper.from_array(v, k) for k, v in {"w": w, "ws": ws, "wz": wz}.items()]),
        opset_imports=[helper.make_opsetid("", 17)])
    from onnx import numpy_helper
    ort_values = ort.InferenceSession(dq.SerializeToString()).run(None, {})[0]
    np.testing.assert_array_equal(numpy_helper.to_array(next(i for i in stripped.graph.initializer if i.name == "wf")),
                                  ort_values)


def test_unstrippable_graphs_are_named():
    s, z = np.float32(0.1), np.uint8(128)
    cases = {
        "differs from its QuantizeLinear's": _graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s2", "z"], ["y"])], {"s": s, "s2": np.float32(0.2), "z": z}),
        "is not a constant": _graph(
            [helper.make_node("Constant", [], ["zc"], value=onnx.numpy_helper.from_array(np.int32(128))),
             helper.make_node("Cast", ["zc"], ["zz"], to=onnx.TensorProto.UINT8),
             helper.make_node("QuantizeLinear", ["x", "s", "zz"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zz"], ["y"])], {"s": s}),
        "opset 12": _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], {"s": s, "z": z}, opset=12),
        "is read by Relu": _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                                   helper.make_node("Relu", ["q"], ["y"])], {"s": s, "z": z}),
    }
    for message, model in cases.items():
        why = qdq.unstrippable(model)
        assert why and message in why, (message, why)
