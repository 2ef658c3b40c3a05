"""Stage 2, optimize: onnxruntime.transformers fusions (attention, layer norm, GELU, embeddings) where
the model type has them, then onnxruntime.quantization's pre-processing (symbolic shape inference,
which the quantizer needs). The result is the fp32 artifact every other artifact is compared with.

Fusions run with opt_level=0: ONNX Runtime's own graph optimizations are left for load time on the
device, so the saved graph stays portable across execution providers.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from edgeq.core import Artifact, BuildContext, Files, StageResult, onnx_files

# Hugging Face model types whose graphs onnxruntime.transformers' "bert" fusions understand.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "albert"}
_LARGE = 1_800_000_000  # protobuf's limit is 2 GiB: larger models keep weights in external data


def fusion_plan(hf_config: dict) -> dict:
    """Which onnxruntime.transformers optimizer settings apply to this model (or none)."""
    mtype = hf_config.get("model_type")
    if mtype in BERT_LIKE:
        heads = hf_config.get("num_attention_heads", hf_config.get("n_heads", 0))
        hidden = hf_config.get("hidden_size", hf_config.get("dim", 0))
        return {"model_type": "bert", "num_heads": int(heads), "hidden_size": int(hidden)}
    if not hf_config:
        # A bare .onnx: try the BERT fusions with head count and width detected from the graph; they
        # only rewrite the patterns they recognise.
        return {"model_type": "bert", "num_heads": 0, "hidden_size": 0}
    return {}


def unfuse_skip_layernorm(path: Path) -> int:
    """Rewrite com.microsoft SkipLayerNormalization(x, skip, gamma[, beta[, bias]]) as
    Sum(x, skip[, bias]) -> LayerNormalization(gamma[, beta]) in the model at `path`; returns how
    many. Not done where the node's mean/inverse-std outputs are read. Sum rather than Add: ONNX
    Runtime's SkipLayerNormFusion matches Add + LayerNormalization and would fuse it back at load
    time. Written by hand because no library offers the reverse of a fusion."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 17:
        return 0  # LayerNormalization is an ONNX op from opset 17 on
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    nodes, count = [], 0
    for n in model.graph.node:
        if (n.op_type != "SkipLayerNormalization" or n.domain != "com.microsoft"
                or any(o and o in used for o in n.output[1:3])):
            nodes.append(n)
            continue
        x, skip, gamma, beta, bias = (list(n.input) + [""] * 5)[:5]
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        summed = n.output[3] if len(n.output) > 3 and n.output[3] else f"{n.name}/sum_output"
        nodes.append(helper.make_node("Sum", [x, skip] + ([bias] if bias else []), [summed], name=f"{n.name}/Sum"))
        nodes.append(helper.make_node("LayerNormalization", [summed, gamma] + ([beta] if beta else []),
                                      [n.output[0]], name=f"{n.name}/LayerNorm", axis=-1, epsilon=eps))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))
    return count


def op_histogram(model) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def run(ctx: BuildContext) -> StageResult:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = ctx.path(Files.EXPORTED)
    fused = ctx.path(Files.FUSED)
    out = ctx.path(Files.FP32)
    before = onnx.load(str(src), load_external_data=False)
    large = sum(p.stat().st_size for p in src.parent.iterdir() if p.is_file()) > _LARGE
    plan = fusion_plan(ctx.model.hf_config) if ctx.family not in ("causal-lm", "vision") else {}
    fused_ops: dict[str, int] = {}
    notes = []
    if ctx.family == "causal-lm":
        # Weight-only quantizers need neither the transformer fusions nor the pre-processing (shape
        # inference) that static quantization does. The one rewrite is the attention fusion, which
        # decode speed needs (pipeline/ops/lm_fusion.py); it is kept only if it computes what the export does.
        for f in onnx_files(src):  # model.onnx and its external data, if any
            shutil.copyfile(f, out if f == src else out.parent / f.name)
        fused_ops, notes, plan = _fuse_decoder(ctx, out, large)
        return _record(ctx, before, out, plan, fused_ops, "none (weight-only quantization needs no shape inference)",
                       notes, large)
    if plan:
        with _quiet():
            fused_ops = _fuse(src, fused, plan, large)
        if fused_ops is None:
            notes.append("onnxruntime.transformers fusions failed; continuing with the unfused graph")
            fused_ops = {}
            fused = src
        elif not ctx.target.fused_skip_layernorm and fused_ops.get("SkipLayerNormalization") and not large:
            n = unfuse_skip_layernorm(fused)
            if n:
                notes.append(f"{n} SkipLayerNormalization written back as Sum + LayerNormalization (the faster "
                             f"kernels on {ctx.target.name}; see the target profile)")
    else:
        notes.append("no onnxruntime.transformers fusions for " + (
            "an image model" if ctx.family == "vision"
            else f"model type {ctx.model.hf_config.get('model_type')!r}"))
        fused = src
    # Image models get ONNX Runtime's basic (EP-independent) optimizations saved into the graph:
    # constant folding turns TF-style "same" padding (Shape/Slice/Pad chains computed at run time)
    # into Conv pads. Left in, each chain sits between a DequantizeLinear and a QuantizeLinear, and
    # static int8 ran slower than fp32 (measured in the README, "Fold the padding into the convolutions").
    skip_opt = ctx.family != "vision"
    if not skip_opt:
        notes.append("onnxruntime basic graph optimizations applied (constant folding, Pad fused into Conv)")
    with _private_cwd(ctx.build_dir), _quiet():
        try:
            quant_pre_process(str(fused), str(out), skip_optimization=skip_opt, save_as_external_data=large)
            shape_inference = "symbolic"
        except Exception as e:  # symbolic shape inference gives up on some graphs; ONNX's is enough then
            notes.append(f"symbolic shape inference failed ({type(e).__name__}); used ONNX shape inference")
            quant_pre_process(str(fused), str(out), skip_optimization=skip_opt, skip_symbolic_shape=True,
                              save_as_external_data=large)
            shape_inference = "onnx"
    if not large:
        notes += _finish_graph(out)
    return _record(ctx, before, out, plan, fused_ops, shape_inference, notes, large)


def _finish_graph(path: Path) -> list[str]:
    """Two things later stages need of every graph, which exports from other tools may lack; the
    model at `path` is rewritten only when one was missing (an optimum export has both).

    - A unique name on every node: the quantizers select nodes by name (nodes_to_quantize,
      nodes_to_exclude), and an unnamed node can be neither chosen nor kept float.
    - An element type on every float tensor: calibration and ORT's quantizers only touch tensors
      whose type is known. When symbolic shape inference gives up (sentence-transformers' pooling
      Expand, on some exports) ONNX's own inference takes over, and it has no schemas for the
      com.microsoft ops the fusions made (Attention, SkipLayerNormalization): every tensor after the
      first fused op stays untyped, and static int8 found "no MatMul nodes". ONNX Runtime types
      those ops on load, so the missing types (and shapes) are read from a session that lists the
      untyped tensors as outputs. Written by hand: neither onnx nor onnxruntime.quantization
      offers type inference through contrib ops."""
    import onnx

    model = onnx.load(str(path))
    notes = []
    names, renamed = set(), 0
    taken = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in names:
            base = f"{n.op_type}_{i}"
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            n.name = name
            taken.add(name)
            renamed += 1
        names.add(n.name)
    if renamed:
        notes.append(f"{renamed} nodes without a (unique) name named by op type and position")
    typed = _types_from_onnxruntime(model)
    if typed:
        model.graph.value_info.extend(typed)
        notes.append(f"{len(typed)} tensor types ONNX's shape inference left unknown taken from ONNX Runtime's")
    if renamed or typed:
        onnx.save(model, str(path))
    return notes


def _types_from_onnxruntime(model) -> list:
    import onnx
    import onnxruntime as ort

    vi = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    known = {v.name for v in vi if v.type.tensor_type.elem_type} | {i.name for i in model.graph.initializer}
    missing = [o for n in model.graph.node for o in n.output if o and o not in known]
    if not missing:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in missing)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor stays there
    so.log_severity_level = 4
    try:
        outs = {o.name: o for o in ort.InferenceSession(probe.SerializeToString(), so,
                                                         providers=["CPUExecutionProvider"]).get_outputs()}
    except Exception:  # the graph does not load: the later stages say so in their own words
        return []
    T = onnx.TensorProto
    by_type = {"tensor(float)": T.FLOAT, "tensor(float16)": T.FLOAT16, "tensor(double)": T.DOUBLE,
               "tensor(int64)": T.INT64, "tensor(int32)": T.INT32, "tensor(int8)": T.INT8,
               "tensor(uint8)": T.UINT8, "tensor(bool)": T.BOOL}
    typed = []
    for name in missing:
        o = outs.get(name)
        if o is None or o.type not in by_type:
            continue
        shape = None if o.shape is None else [d if isinstance(d, (int, str)) else None for d in o.shape]
        typed.append(onnx.helper.make_tensor_value_info(name, by_type[o.type], shape))
    return typed


@contextlib.contextmanager
def _quiet():
    """Symbolic shape inference, run by the fusions and the pre-processing, prints its failures
    ("failed in shape inference <class ...>") and the fusions log a warning after them; the stage's
    note says it in one line instead."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _private_cwd(parent: Path):
    """ONNX Runtime's symbolic shape inference, when it gives up, saves sym_shape_infer_temp.onnx and
    its weights into the current directory: the user's, where a planted symlink of that name would
    be written through. It runs in an empty folder of the build's own instead."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(dir=parent, prefix=".cwd-") as d:
        os.chdir(d)
        try:
            yield
        finally:
            os.chdir(old)


def _record(ctx: BuildContext, before, out: Path, plan: dict, fused_ops: dict, shape_inference: str,
            notes: list[str], large: bool) -> StageResult:
    import onnx

    after = onnx.load(str(out), load_external_data=False)
    ctx.model.input_names = [i.name for i in after.graph.input]
    ctx.model.input_specs = {
        i.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
                 "rank": len(i.type.tensor_type.shape.dim) if i.type.tensor_type.HasField("shape") else None}
        for i in after.graph.input}
    ctx.model.output_names = [o.name for o in after.graph.output]
    settings = {}
    if len(after.graph.output) > 1 or ctx.config.output:
        from edgeq.pipeline.ops.outputs import primary_output

        name, why = primary_output(after, ctx.model.task, ctx.config.output)
        ctx.model.primary_output = name
        settings["primary_output"] = {"name": name, "why": why}
    ctx.artifacts.append(Artifact(name="fp32", path=Files.FP32, precision="fp32",
                                  recipe={"fusions": plan or None}))
    return StageResult(
        settings={"fusion": plan or None, "opt_level": 1 if ctx.family == "vision" else 0, "shape_inference": shape_inference,
                  "external_data": large, **settings},
        outputs=[Files.FP32],
        metrics={"nodes_before": len(before.graph.node), "nodes_after": len(after.graph.node),
                 "fused_ops": {k: v for k, v in fused_ops.items() if v}, "ops_after": op_histogram(after),
                 "notes": notes},
    )


def _fuse_decoder(ctx: BuildContext, out: Path, large: bool) -> tuple[dict[str, int], list[str], dict]:
    """The exported decoder's attention fused into GroupQueryAttention in place at `out`, when its
    config allows and the fused graph matches the export (logits and cache over a prompt and four
    greedy steps); otherwise `out` stays the export. Returns (fused op counts, notes, plan)."""
    import os

    import onnx

    from edgeq.pipeline.ops import lm_fusion
    from edgeq.causal_lm import session

    cfg = ctx.model.hf_config
    why = lm_fusion.fusable(cfg) or ("the model keeps its weights in external data" if large else None)
    if why:
        return {}, [f"attention kept as exported: {why}"], {}
    model = onnx.load(str(out))
    n = lm_fusion.fuse_group_query_attention(model, cfg)
    if not n:
        return {}, ["attention kept as exported: the graph lacks the expected q/k/v/o projection nodes"], {}
    tmp = out.with_name(f".{out.stem}.fused.onnx")
    onnx.save(model, str(tmp))
    del model
    try:
        check = lm_fusion.check_fused(session(out), session(tmp), int(cfg.get("vocab_size") or 2))
    except Exception as e:  # an ORT build without the op, or a graph it rejects: keep the export
        tmp.unlink(missing_ok=True)
        return {}, [f"attention kept as exported: the fused graph fails to run "
                    f"({str(e).strip().splitlines()[0][:200]})"], {}
    tol = 1e-3 * max(1.0, check["logit_scale"])
    if not (check["greedy_same"] and check["max_logit_diff"] <= tol and check["max_cache_diff"] <= tol):
        tmp.unlink(missing_ok=True)
        return {}, [f"attention kept as exported: the fused graph's logits differ by {check['max_logit_diff']:.2g} "
                    f"(cache {check['max_cache_diff']:.2g}, greedy tokens {'equal' if check['greedy_same'] else 'differ'})"], {}
    os.replace(tmp, out)
    return ({"GroupQueryAttention": n},
            [f"{n} attention blocks fused into GroupQueryAttention; logits within "
             f"{check['max_logit_diff']:.1g} of the export's (scale {check['logit_scale']:.0f}), same greedy tokens"],
            {"model_type": cfg.get("model_type"), "attention": "GroupQueryAttention"})


def _fuse(src: Path, dst: Path, plan: dict, large: bool) -> dict[str, int] | None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # the optimizer logs at WARNING for every pattern it does not find; its statistics say it better
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        opts = FusionOptions(plan["model_type"])
        model = optimize_model(str(src), model_type=plan["model_type"], num_heads=plan["num_heads"],
                               hidden_size=plan["hidden_size"], optimization_options=opts, opt_level=0)
        model.save_model_to_file(str(dst), use_external_data_format=large)
        return model.get_fused_operator_statistics()
    except Exception:
        dst.unlink(missing_ok=True)
        return None
