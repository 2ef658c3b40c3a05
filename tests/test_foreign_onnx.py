"""Bring-your-own ONNX from other exporters (issue 17, part 2): a BERT encoder with the
sentence-transformers pooling and normalisation inside the graph, four outputs, exported by
torch.onnx with and without dynamo at several opsets, with generic or no node names. Static,
dynamic and hybrid int8 must build on each, quantize what they say they quantize, and be evaluated
on the sentence embedding (tests/foreign_exports.py makes the exports)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_build
from foreign_exports import OUTPUTS, export_pooled

from edgeq.pipeline.ops.outputs import primary_output

# (exporter, opset, node names). torch's dynamo exporter writes opset 18 whatever is asked below
# it (onnx's version converter fails on this graph's Reduce ops), so its row is opset 18.
# TorchScript at 18 is the case the issue reported: ORT's BERT fusions work, symbolic shape
# inference fails on the normalisation's Expand, and ONNX's inference cannot type the fused ops.
VARIANTS = [("torchscript", 14, "generic"), ("torchscript", 16, "none"), ("torchscript", 17, "generic"),
            ("torchscript", 18, "generic"), ("dynamo", 18, "generic")]


def _export(src: Path, dst: Path, exporter: str, opset: int, names: str) -> Path:
    path = export_pooled(src, dst / "model.onnx", dynamo=exporter == "dynamo", opset=opset,
                         generic_names=names == "generic")
    if names == "none":
        m = onnx.load(str(path))
        for n in m.graph.node:
            n.name = ""
        onnx.save(m, str(path))
    return path


def _stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["stage"] == name)


def _dq_fed(model, node_names) -> dict[str, bool]:
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    return {k: producer.get(nodes[k].input[0]) == "DequantizeLinear" for k in node_names if k in nodes}


@pytest.mark.parametrize("exporter,opset,names", VARIANTS, ids=[f"{e}-opset{o}-{n}" for e, o, n in VARIANTS])
def test_foreign_export_builds_static_dynamic_hybrid(tiny_bert, tmp_path, exporter, opset, names):
    src = _export(tiny_bert, tmp_path / "export", exporter, opset, names)
    m = run_build(src, tmp_path / "out", target="x86_64", modes=("static", "dynamic", "hybrid"))
    by = {a["name"]: a for a in m["artifacts"]}
    assert set(by) == {"fp32", "int8-static", "int8-dynamic", "int8-hybrid"}
    # evaluated on the normalised sentence embedding, found by structure (names are generic or absent)
    assert m["model"]["evaluated_output"] == "normalized_embedding"
    assert _stage(m, "optimize")["settings"]["primary_output"]["name"] == "normalized_embedding"
    for name in ("int8-static", "int8-dynamic", "int8-hybrid"):
        assert by[name]["metrics"]["cosine"] > 0.98, (name, by[name]["metrics"])
    build = Path(m["build_dir"])
    # what static says it quantized, it quantized: every MatMul not kept float reads a DequantizeLinear
    q = _stage(m, "quantize")["metrics"]["static"]
    assert not [k for k in q["kept_float"] if "left it float" in k["reason"]], q["kept_float"]
    static = onnx.load(str(build / "model.int8-static.onnx"))
    kept = {k["node"] for k in q["kept_float"]} | set(q.get("dynamic_nodes", []))
    matmuls = [n.name for n in static.graph.node if n.op_type == "MatMul" and n.name not in kept]
    fed = _dq_fed(static, matmuls)
    assert sum(fed.values()) >= q["quantized_nodes"] > 0, fed
    # every node of every artifact has a unique name
    for a in m["artifacts"]:
        g = onnx.load(str(build / a["path"]), load_external_data=False).graph
        assert all(n.name for n in g.node) and len({n.name for n in g.node}) == len(g.node), a["name"]


def _graph(outputs_order):
    """tokens [B,S,4] -> (pooler: Gather CLS -> Tanh), (mean pool: ReduceSum axis 1 -> Div),
    (normalised: / ReduceL2); outputs in the given order, named o0.. (no name says which is which)."""
    B, S, H = "batch", "sequence", 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, H])
    w = helper.make_tensor("w", TensorProto.FLOAT, [H, H], np.eye(H, dtype=np.float32).reshape(-1).tolist())
    axes1 = helper.make_tensor("axes1", TensorProto.INT64, [1], [1])
    axes_last = helper.make_tensor("axes_last", TensorProto.INT64, [1], [-1])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["tokens"]),
        helper.make_node("Gather", ["tokens", "zero"], ["cls"], axis=1),
        helper.make_node("Tanh", ["cls"], ["pooler"]),
        helper.make_node("ReduceSum", ["tokens", "axes1"], ["summed"], keepdims=0),
        helper.make_node("ReduceMean", ["tokens", "axes_last"], ["ln_mean"], keepdims=1),  # a LayerNorm's mean: not pooling
        helper.make_node("Sub", ["tokens", "ln_mean"], ["centred"]),
        helper.make_node("Div", ["summed", "seqlen"], ["emb"]),
        helper.make_node("ReduceL2", ["emb", "axes_last"], ["norm"], keepdims=1),
        helper.make_node("Div", ["emb", "norm"], ["normalized"]),
    ]
    seqlen = helper.make_tensor("seqlen", TensorProto.FLOAT, [], [8.0])
    shapes = {"tokens": [B, S, H], "pooler": [B, H], "emb": [B, H], "normalized": [B, H], "centred": [B, S, H]}
    renamed = {t: f"o{i}" for i, t in enumerate(outputs_order)}
    for n in nodes:
        n.output[:] = [renamed.get(o, o) for o in n.output]
        n.input[:] = [renamed.get(i, i) for i in n.input]
    outs = [helper.make_tensor_value_info(renamed[t], TensorProto.FLOAT, shapes[t]) for t in outputs_order]
    g = helper.make_graph(nodes, "g", [x], outs, [w, axes1, axes_last, zero, seqlen])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("order", [("tokens", "pooler", "emb", "normalized"), ("normalized", "pooler", "tokens", "emb"),
                                   ("pooler", "emb", "tokens", "normalized")])
def test_primary_output_is_the_normalised_pooled_embedding_in_any_order(order):
    name, why = primary_output(_graph(order), "feature-extraction")
    assert name == f"o{order.index('normalized')}", (order, name, why)
    assert "pooled" in why


def test_primary_output_without_pooling_is_the_token_output_not_the_pooler():
    name, why = primary_output(_graph(("pooler", "centred")), "feature-extraction")
    assert name == "o1" and "token-level" in why


def test_primary_output_for_a_classifier_and_by_name():
    g = _graph(("pooler", "emb"))
    assert primary_output(g, "text-classification")[0] == "o0"
    assert primary_output(g, "feature-extraction", "o0") == ("o0", "chosen with --output")
    from edgeq.core import EdgeqError

    with pytest.raises(EdgeqError, match=r"--output 'nope': the model has no such output \(it has: o0, o1\)"):
        primary_output(g, "feature-extraction", "nope")


def test_output_option_picks_and_is_checked(tiny_bert, tmp_path):
    src = _export(tiny_bert, tmp_path / "export", "torchscript", 14, "generic")
    cmd = [sys.executable, "-m", "edgeq", "build", str(src), "--target", "x86_64", "--mode", "dynamic",
           "--out", str(tmp_path / "out"), "--runs", "3", "--warmup", "1", "--calib-samples", "16",
           "--eval-samples", "8"]
    bad = subprocess.run(cmd + ["--output", "logits"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"edgeq: error: --output 'logits': model.onnx has no such output (it has: {', '.join(OUTPUTS)})"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))
    ok = subprocess.run(cmd + ["--output", "token_embeddings", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    m = json.loads(next(p for p in (tmp_path / "out").rglob("manifest.json")).read_text())
    assert m["model"]["evaluated_output"] == "token_embeddings"
    assert _stage(m, "optimize")["settings"]["primary_output"]["why"] == "chosen with --output"
    assert m["config"]["output"] == "token_embeddings"


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_minilm_foreign_export_static_fidelity(tmp_path, exporter):
    """The real all-MiniLM-L6-v2, pooled and normalised inside the graph, opset 18, generic names:
    static int8 quantizes every MatMul its plan names and keeps the default build's fidelity."""
    from edgeq.intake import default_model_dir

    src = _export(default_model_dir(), tmp_path / "export", exporter, 18, "generic")
    m = run_build(src, tmp_path / "out", target="x86_64", modes=("static", "dynamic"), eval_samples=60)
    by = {a["name"]: a["metrics"] for a in m["artifacts"]}
    assert m["model"]["evaluated_output"] == "normalized_embedding"
    assert by["int8-static"]["cosine"] >= 0.99 and by["int8-dynamic"]["cosine"] >= 0.99, by
    q = _stage(m, "quantize")["metrics"]["static"]
    assert q["quantized_nodes"] >= 12 and not [k for k in q["kept_float"] if "left it float" in k["reason"]]
