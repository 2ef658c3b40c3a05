"""Stage 5, precision: float16 artifacts for targets with fp16 compute (GPU, ARMv8.2+, NPUs).

Uses onnxruntime.transformers' converter, which knows the contrib ops of fused transformer graphs
(Attention, SkipLayerNormalization...) and inserts Cast nodes at the boundaries of ops it keeps in
fp32. Model inputs and outputs keep their fp32 type unless `--fp16-io` is given, so an app feeding
the fp32 model can feed this one unchanged.
"""
from __future__ import annotations

from edgeq.core import Artifact, BuildContext, Files, StageResult, model_size_bytes


def to_fp16(src, dst, keep_io_types: bool, op_block_list: list[str] | None = None) -> dict:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    kw = {"keep_io_types": keep_io_types}
    if op_block_list:
        kw["op_block_list"] = list(op_block_list)
    model.convert_float_to_float16(**kw)
    model.topological_sort()
    model.save_model_to_file(str(dst))
    onnx.checker.check_model(str(dst))
    g = model.model.graph
    fp16 = sum(1 for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT16)
    return {"casts": sum(1 for n in g.node if n.op_type == "Cast"), "fp16_initializers": fp16,
            "fp32_initializers": sum(1 for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT)}


def run(ctx: BuildContext) -> StageResult:
    cfg = ctx.config["fp16"]
    out = ctx.path(Files.model("fp16"))
    stats = to_fp16(ctx.path(Files.FP32), out, cfg["keep_io_types"], cfg["op_block_list"])
    settings = {"keep_io_types": cfg["keep_io_types"], "op_block_list": cfg["op_block_list"] or "onnxruntime default",
                "converter": "onnxruntime.transformers OnnxModel.convert_float_to_float16"}
    ctx.artifacts.append(Artifact(name="fp16", path=Files.model("fp16"), precision="fp16",
                                  recipe={"mode": "fp16", **settings}))
    return StageResult(settings=settings, outputs=[Files.model("fp16")],
                       metrics={**stats, "size_bytes": model_size_bytes(out)})
