"""Hybrid precision: graph surgery (revert to float, fp16 islands) and the budgeted search."""
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.pipeline.ops import hybrid, quantizer


def _run(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def qdq(tiny_build, tmp_path_factory):
    """The tiny BERT's fp32 artifact and a full static int8 QDQ model of it (every MatMul)."""
    from edgeq import targets

    b = Path(tiny_build["build_dir"])
    out = tmp_path_factory.mktemp("qdq") / "full.onnx"
    quantizer.quantize_static_recipe(b / "model.fp32.onnx", out, targets.load("x86_64").static,
                                  b / "calibration/ranges-minmax.json", "minmax")
    feeds = dict(np.load(b / "work/bench_inputs.npz"))
    return onnx.load(str(b / "model.fp32.onnx")), onnx.load(str(out)), feeds


def test_revert_everything_gives_back_fp32(qdq):
    fp32, full, feeds = qdq
    names = hybrid.quantized_nodes(full, {"MatMul"})
    assert len(names) == 6
    back = hybrid.revert(full, fp32, names, {"MatMul"})
    onnx.checker.check_model(back)
    ops = Counter(n.op_type for n in back.graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    np.testing.assert_array_equal(_run(back, feeds), _run(fp32, feeds))
    assert np.abs(_run(full, feeds) - _run(fp32, feeds)).max() > 0  # the int8 model did differ


def test_revert_one_node_reads_float_input_and_original_weight(qdq):
    fp32, full, feeds = qdq
    names = hybrid.quantized_nodes(full, {"MatMul"})
    m = hybrid.revert(full, fp32, names[:1], {"MatMul"})
    node = next(n for n in m.graph.node if n.name == names[0])
    orig = next(n for n in fp32.graph.node if n.name == names[0])
    assert list(node.input) == list(orig.input)
    inits = {i.name: i for i in m.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(inits[orig.input[1]]),
                                  numpy_helper.to_array(next(i for i in fp32.graph.initializer
                                                              if i.name == orig.input[1])))
    assert hybrid.quantized_nodes(m, {"MatMul"}) == names[1:]
    onnx.checker.check_model(m)
    assert np.isfinite(_run(m, feeds)).all()


def test_fp16_islands_are_valid(qdq):
    fp32, full, feeds = qdq
    names = hybrid.quantized_nodes(full, {"MatMul"})
    m = hybrid.revert(full, fp32, names[:2], {"MatMul"}, fp16=True)
    onnx.checker.check_model(m, full_check=True)  # includes topological order and types
    for n in (n for n in m.graph.node if n.name in names[:2]):
        inits = {i.name: i for i in m.graph.initializer}
        assert inits[n.input[1]].data_type == TensorProto.FLOAT16  # weight in fp16
        producer = {o: x for x in m.graph.node for o in x.output}[n.input[0]]
        assert producer.op_type == "Cast"  # activation cast at the island's edge
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [i.type.tensor_type.elem_type
                                                                     for i in fp32.graph.input]
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    out = _run(m, feeds)
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_fp16_island_never_casts_shape_inputs():
    """MatMul -> Reshape -> Resize inside one island: the int64 shape and the float32 scales of
    Resize keep their types, the tensor between island nodes stays fp16, Casts only at the edges."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "shape")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Reshape", ["m", "shape"], ["r"], name="rs"),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], name="rz", mode="nearest")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, shape, scales]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    hybrid.to_fp16_islands(model, {"mm", "rs", "rz"})
    onnx.checker.check_model(model, full_check=True)
    g = {n.name: n for n in model.graph.node}
    assert g["rs"].input[1] == "shape" and g["rz"].input[2] == "scales"
    assert g["rs"].input[0] == "m_fp16" and g["rz"].input[0] == "r_fp16"
    assert Counter(n.op_type for n in model.graph.node)["Cast"] == 2
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    np.testing.assert_array_equal(_run(model, feeds), np.repeat(np.repeat(feeds["x"].reshape(1, 1, 2, 2), 2, 2), 2, 3))


@pytest.mark.parametrize("target, fallback", [("x86_64", "fp32"), ("arm64", "fp16")])
def test_budgeted_search_records_curve_and_kept_nodes(tiny_bert, tmp_path, target, fallback):
    from conftest import run_build

    # the tiny random model barely moves under int8: a tiny budget forces fallback steps
    m = run_build(tiny_bert, tmp_path, target=target, modes=("static",), max_accuracy_drop=1e-9)
    h = next(s for s in m["stages"] if s["stage"] == "precision")["metrics"]["hybrid"]
    assert len(h["sensitivity"]) == 6
    drops = [s["cosine_drop"] for s in h["sensitivity"]]
    assert drops == sorted(drops, reverse=True)
    curve = h["curve"]
    assert [c["step"] for c in curve] == list(range(len(curve))) and len(curve) >= 2
    assert [c["kept_nodes"] for c in curve] == list(range(len(curve)))
    assert all("latency_p50_ms" in c and "cosine" in c and c["size_bytes"] > 0 for c in curve)
    chosen = curve[h["chosen_step"]]
    assert chosen["meets_budget"]
    assert not any(c["meets_budget"] for c in curve[:-1])  # the search stops at the first step within budget
    art = {a["name"]: a for a in m["artifacts"]}["int8-hybrid"]
    assert art["precision"] == f"int8+{fallback}"
    assert [k["node"] for k in art["recipe"]["kept"]] == [s["node"] for s in h["sensitivity"]][: h["chosen_step"]]
    assert all(k["precision"] == fallback and "cosine drop" in k["reason"] for k in art["recipe"]["kept"])
    b = Path(m["build_dir"])
    model = onnx.load(str(b / art["path"]))
    onnx.checker.check_model(model)
    if fallback == "fp16" and h["chosen_step"]:
        assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert not list((b / "work" / "hybrid").glob("step-*.onnx"))[1:]  # only the chosen step is kept
    assert art["metrics"]["cosine"] > 0.99 and "latency_p50_ms" in art["metrics"]


def test_max_accuracy_drop_must_be_a_fraction(tiny_bert, tmp_path):
    from edgeq.config import resolve_config
    from edgeq.core import EdgeqError

    with pytest.raises(EdgeqError, match="between 0 and 1"):
        resolve_config(model=str(tiny_bert), out=str(tmp_path), max_accuracy_drop=5)
    cfg = resolve_config(model=str(tiny_bert), out=str(tmp_path), modes=("hybrid",))
    assert cfg.max_accuracy_drop == 0.01 and list(cfg.modes) == ["hybrid"]


def test_inspect_reports_node_precisions_and_ranking(tiny_bert, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import run_build
    from edgeq.commands.inspect import inspect_build, render

    m = run_build(tiny_bert, tmp_path, target="arm64", max_accuracy_drop=1e-9)
    b = Path(m["build_dir"])
    rep = inspect_build(b)
    assert rep["artifacts"]["fp32"]["counts"] == {"fp32": 15}
    static = {r["node"]: r["precision"] for r in rep["artifacts"]["int8-static"]["weighted_nodes"]}
    assert sorted(static.values()).count("int8") == 4  # 6 MatMuls, the 2 after GELU kept float
    assert all(static[k["node"]] == "fp32" for k in rep["artifacts"]["int8-static"]["kept"])
    hyb = rep["artifacts"]["int8-hybrid"]
    kept = [k["node"] for k in hyb["kept"]]
    prec = {r["node"]: r["precision"] for r in hyb["weighted_nodes"]}
    assert all(prec[n] == "fp16" for n in kept) and list(prec.values()).count("int8") == 6 - len(kept)
    assert [s["node"] for s in rep["sensitivity"]][: len(kept)] == kept
    assert "sensitivity (cosine lost" in render(rep) and "<- kept" in render(rep)
    dyn = {r["op_type"] for r in rep["artifacts"]["int8-dynamic"]["weighted_nodes"] if r["precision"] == "int8"}
    assert {"QAttention", "DynamicQuantizeMatMul"} <= dyn or {"QAttention", "MatMulInteger"} <= dyn
    r = subprocess.run([sys.executable, "-m", "edgeq", "inspect", str(b), "--json", "-a", "int8-hybrid"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and list(json.loads(r.stdout)["artifacts"]) == ["int8-hybrid"]
    r = subprocess.run([sys.executable, "-m", "edgeq", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("edgeq: error:") and len(r.stderr.splitlines()) == 1
