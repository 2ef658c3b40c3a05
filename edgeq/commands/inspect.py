"""`edgeq inspect`: which precision each node of each artifact computes in, and the sensitivity
ranking the hybrid search measured (from the manifest).

A node's precision is read off the graph itself, not from the recipe: integer kernels (QLinearMatMul,
MatMulInteger, QAttention...) and QDQ weighted nodes (activation and weight from DequantizeLinear)
are int8 (MatMulNBits: int4, or int8 at 8 bits; MatMulBnb4: nf4), a node computing on fp16 tensors is fp16, anything else float32. Q/DQ and Cast nodes only
convert and are not counted.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgeq.core import EdgeqError, load_manifest
from edgeq.intake import INTEGER_OPS

CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"}
WEIGHTED = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "EmbedLayerNormalization", "MatMulNBits",
            "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearConv", "ConvInteger",
            "QEmbedLayerNormalization", "QGemm", "MatMulIntegerToFloat"}


def node_precisions(model) -> list[dict[str, str]]:
    import onnx

    g = model.graph
    dtype: dict[str, int] = {i.name: i.data_type for i in g.initializer}
    dtype.update({i.name: i.type.tensor_type.elem_type for i in g.input})
    producer = {o: n for n in g.node for o in n.output}
    rows = []
    for n in g.node:  # graphs are topologically sorted: producers come first
        ins = [dtype.get(i) for i in n.input if i]
        if n.op_type == "Cast":
            out_type = next(a.i for a in n.attribute if a.name == "to")
        elif n.op_type == "DequantizeLinear":
            out_type = onnx.TensorProto.FLOAT
        elif n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            out_type = ins[2] if len(ins) > 2 and ins[2] else onnx.TensorProto.UINT8
        else:
            floats = [t for t in ins if t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
            out_type = floats[0] if floats else onnx.TensorProto.FLOAT
        for o in n.output:
            dtype[o] = out_type
        if n.op_type in CONVERSIONS:
            continue
        if n.op_type == "MatMulNBits":
            precision = "int8" if any(a.name == "bits" and a.i == 8 for a in n.attribute) else "int4"
        elif n.op_type == "MatMulBnb4":
            precision = "nf4"
        elif n.op_type in INTEGER_OPS or (
                # a QDQ node runs as an integer kernel when its activation and weight are quantized;
                # other ops merely read a de-quantized tensor and compute in float
                n.op_type in WEIGHTED and len(n.input) > 1
                and all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input[:2])):
            precision = "int8"
        elif onnx.TensorProto.FLOAT16 in ins:
            precision = "fp16"
        else:
            precision = "fp32"
        rows.append({"node": n.name, "op_type": n.op_type, "precision": precision})
    return rows


def inspect_build(build_dir: Path, artifact: str | None = None) -> dict[str, Any]:
    import onnx

    manifest = load_manifest(build_dir)
    arts = [a for a in manifest["artifacts"] if artifact in (None, a["name"])]
    if not arts:
        names = ", ".join(a["name"] for a in manifest["artifacts"])
        raise EdgeqError(f"no artifact '{artifact}' in {build_dir} (artifacts: {names})")
    out: dict[str, Any] = {"build_dir": str(build_dir), "artifacts": {}}
    for a in arts:
        path = Path(build_dir) / a["path"]
        if not path.is_file():
            raise EdgeqError(f"{build_dir} is incomplete: {a['path']} is missing")
        rows = node_precisions(onnx.load(str(path), load_external_data=False))
        out["artifacts"][a["name"]] = {
            "path": a["path"], "precision": a["precision"],
            "counts": dict(Counter(r["precision"] for r in rows)),
            "weighted_nodes": [r for r in rows if r["op_type"] in WEIGHTED], "nodes": rows,
            "kept": a.get("recipe", {}).get("kept") or a.get("recipe", {}).get("kept_float") or [],
        }
    stage = next((s for s in manifest["stages"] if s["stage"] == "precision"), {})
    hyb = (stage.get("metrics") or {}).get("hybrid") or {}
    out["sensitivity"] = hyb.get("sensitivity", [])
    out["curve"] = hyb.get("curve", [])
    return out


def render(report: dict[str, Any]) -> str:
    lines = []
    for name, a in report["artifacts"].items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(a["counts"].items()))
        lines.append(f"{name} ({a['path']}): {counts}")
        kept = {k["node"]: k.get("reason", "") for k in a["kept"]}
        for r in a["weighted_nodes"]:
            why = f"  <- kept: {kept[r['node']]}" if r["node"] in kept else ""
            lines.append(f"  {r['precision']:5s} {r['op_type']:24s} {r['node']}{why}")
    if report["sensitivity"]:
        lines.append("sensitivity (cosine lost when the node alone is quantized, most sensitive first):")
        for i, s in enumerate(report["sensitivity"], 1):
            lines.append(f"  {i:3d}. {s['cosine_drop']:.5f}  {s['node']}")
    if report["curve"]:
        lines.append("accuracy/latency curve (nodes kept in higher precision -> cosine, speedup):")
        for c in report["curve"]:
            sp = f"{c['speedup_vs_fp32']:.2f}x" if "speedup_vs_fp32" in c else "-"
            ok = "within budget" if c["meets_budget"] else ""
            lines.append(f"  step {c['step']:2d}: {c['kept_nodes']:3d} kept, cosine {c['cosine']:.4f}, {sp} {ok}")
    elif not report["sensitivity"]:
        lines.append("no sensitivity ranking in this build (build with --max-accuracy-drop to measure one)")
    return "\n".join(lines)
