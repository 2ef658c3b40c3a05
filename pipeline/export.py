"""Stage 1, export: a Hugging Face model directory becomes ONNX through optimum's exporter, and the
ONNX outputs are checked against PyTorch's on real text. A given .onnx file is checked with
onnx.checker and used as is.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from edgeq.core import BuildContext, EdgeqError, Files, ModelFacts, StageResult, atomic_write_json, onnx_files, sha256_file
from edgeq.intake import check_model_safety, check_onnx, read_hf_config

# Architectures -> optimum task. Everything else in an encoder config exports as feature extraction.
_TASK_BY_ARCH_SUFFIX = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
}
SUPPORTED_TASKS = ("feature-extraction", "text-classification")


def infer_task(config: dict) -> str:
    archs = config.get("architectures")
    for arch in archs if isinstance(archs, list) else []:
        for suffix, task in _TASK_BY_ARCH_SUFFIX.items():
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    return "feature-extraction"


def run(ctx: BuildContext) -> StageResult:
    out_dir = ctx.path(Files.EXPORT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.model_kind == "onnx":
        return _take_onnx(ctx, out_dir)
    if ctx.family == "causal-lm":
        return _export_causal_lm(ctx, out_dir)
    if ctx.model_kind == "module":
        return _export_module(ctx, out_dir)
    return _export_hf(ctx, out_dir)


def _export_module(ctx: BuildContext, out_dir: Path) -> StageResult:
    """`package.module:factory` -> an nn.Module -> torch.onnx.export (the TorchScript exporter:
    for the CNNs here it gives the plain Conv/Clip graph, with batch norm folded), checked against
    PyTorch on real photos of the calibration folder."""
    import importlib

    import onnxruntime as ort
    import torch

    from edgeq.calib.images import CALIB_VIEWS, image_arrays, resolve_preprocess

    spec = str(ctx.config.model)
    module_name, attr = spec.split(":", 1)
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except Exception as e:  # the user's module: whatever it raises on import
        raise EdgeqError(f"cannot import {spec}: {type(e).__name__}: {_first_line(e)}") from None
    if not callable(factory):
        raise EdgeqError(f"{spec} is not callable (expected a function returning a torch.nn.Module)")
    try:
        model = factory()
    except Exception as e:
        raise EdgeqError(f"{spec}() failed: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise EdgeqError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    vcfg = ctx.config.vision
    shape = vcfg.input_shape or getattr(factory, "edgeq_input_shape", None) or getattr(model, "edgeq_input_shape", None)
    if not shape:
        raise EdgeqError(f"{spec}: no input shape: pass --input-shape N,C,H,W (or give the factory an "
                         "edgeq_input_shape attribute)")
    declared = getattr(factory, "edgeq_preprocess", None) or getattr(model, "edgeq_preprocess", None) or {}
    pre = resolve_preprocess({**declared, **vcfg.preprocess}, list(shape))
    ctx.model = ModelFacts(task="image-classification", hf_config={}, preprocess=pre)
    ctx.tokenizer = None
    arrays, _, _ = image_arrays(Path(ctx.config.calibration.path), pre, "input", 4, CALIB_VIEWS, "calibration")
    x = arrays["input"]
    opset = ctx.target.opset
    path = out_dir / "model.onnx"
    try:
        with _quiet_libraries(), torch.no_grad():
            torch.onnx.export(model, torch.from_numpy(x[:1]), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"], do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:
        raise EdgeqError(f"cannot export {spec}: {type(e).__name__}: {_first_line(e)}") from None
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    if isinstance(ref, (tuple, list)):
        ref = ref[0]
    ref = ref.numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    diff = float(np.abs(ref - got).max())
    atol = ctx.config.export_atol
    if diff > atol:
        raise EdgeqError(f"export validation failed: ONNX differs from PyTorch by {diff:.2e} (> atol {atol:g})")
    atomic_write_json(ctx.path("preprocess.json"), pre)
    params = sum(p.numel() for p in model.parameters())
    return StageResult(
        settings={"source": spec, "kind": "module", "task": "image-classification", "opset": opset,
                  "exporter": "torch.onnx.export (TorchScript)", "input_shape": list(shape), "atol": atol,
                  "preprocess": pre},
        outputs=[Files.EXPORTED, "preprocess.json"],
        metrics={"validation_samples": int(x.shape[0]), "max_abs_diff": diff, "parameters": int(params),
                 "top1_match": bool((ref.argmax(1) == got.argmax(1)).all())},
    )


def _export_causal_lm(ctx: BuildContext, out_dir: Path) -> StageResult:
    """A decoder-only LM (a Hugging Face folder, or a GGUF file converted to one) exported with its
    key/value cache, then checked against PyTorch: logits on real text, and greedy generation."""
    from edgeq.calib import default_eval_path, read_texts
    from edgeq import causal_lm

    src = ctx.model_path
    settings = {"source": str(src), "kind": ctx.model_kind, "task": "text-generation",
                "exporter": f"optimum.exporters.onnx.main_export (task {causal_lm.EXPORT_TASK})"}
    metrics: dict = {}
    if ctx.model_kind == "gguf":
        cache = Path(ctx.config.out) / ctx.model_name / ".cache" / "hf-from-gguf"
        model_dir, digest = causal_lm.hf_dir_from_gguf(src, cache, ctx.log)
        settings["converted_from_gguf"] = str(model_dir)
        metrics["gguf_sha256"] = digest
    else:
        model_dir = src
        metrics["weights_sha256"] = _weights_sha256(model_dir)
    ctx.model = ModelFacts(task="text-generation", hf_config=read_hf_config(model_dir))
    _save_tokenizer(ctx, Path(ctx.config.tokenizer) if ctx.config.tokenizer else model_dir, required=True)
    try:
        with _quiet_libraries():
            causal_lm.export(model_dir, out_dir, ctx.target.opset,
                             trust_remote_code=ctx.config.trust_remote_code)
    except Exception as e:
        raise EdgeqError(f"cannot export {src.name}: {type(e).__name__}: {_first_line(e)}") from None
    for f in ("config.json", "generation_config.json"):
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, ctx.path(f))
    with _quiet_libraries():
        check = causal_lm.validate(model_dir, out_dir / "model.onnx", ctx.tokenizer,
                                   read_texts(default_eval_path(), limit=4, what="evaluation"),
                                   trust_remote_code=ctx.config.trust_remote_code)
    atol = ctx.config.export_atol * 10  # logits of a 50k vocabulary, not hidden states
    if check["max_abs_diff"] > atol:
        raise EdgeqError(f"export validation failed: ONNX logits differ from PyTorch by {check['max_abs_diff']:.2e} "
                         f"(> atol {atol:g})")
    if not check["greedy_match"]:
        bad = next(g for g in check["greedy"] if not g["match"])
        raise EdgeqError(f"export validation failed: greedy generation from {bad['prompt']!r} departs from "
                         f"PyTorch's after {bad['matching_prefix']} of {bad['tokens']} tokens")
    return StageResult(settings={**settings, "opset": causal_lm.lm_opset(ctx.target.opset), "atol": atol},
                       outputs=[Files.EXPORTED, Files.TOKENIZER_DIR, Files.MODEL_CONFIG],
                       metrics={**check, **metrics})


def _take_onnx(ctx: BuildContext, out_dir: Path) -> StageResult:
    src = ctx.model_path
    check_onnx(src)  # every external-data location is a file inside src's folder
    for f in onnx_files(src):  # the .onnx plus its external-data files, at the same relative paths
        rel = f.relative_to(src.parent)
        if not f.is_file():
            raise EdgeqError(f"{src}: external data file missing: {rel}")
        dst = out_dir / ("model.onnx" if f == src else rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    # Tokenizer and config beside the .onnx (e.g. an optimum export dir), or given with --tokenizer.
    tok_dir = Path(ctx.config.tokenizer) if ctx.config.tokenizer else src.parent
    has_tokenizer = any((tok_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    _save_tokenizer(ctx, tok_dir, required=has_tokenizer)
    cfg = tok_dir / "config.json"
    hf_config = read_hf_config(tok_dir) if cfg.is_file() else {}
    if hf_config:
        shutil.copyfile(cfg, ctx.path(Files.MODEL_CONFIG))
    task = ctx.config.task or (infer_task(hf_config) if hf_config else "feature-extraction")
    ctx.model = ModelFacts(task=task, hf_config=hf_config)
    settings, outputs = {"source": str(src), "kind": "onnx"}, [Files.EXPORTED]
    if "qdq" in ctx.config.modes:  # config: the given model has Q/DQ nodes
        settings["qdq_removed"] = _float_reference(ctx)
        outputs.append(Files.GIVEN_QDQ)
    return StageResult(settings=settings, outputs=outputs,
                       metrics={"source_sha256": sha256_file(src), "checker": "passed"})


def _float_reference(ctx: BuildContext) -> dict:
    """A Q/DQ model as given: copied to Files.GIVEN_QDQ (from which the quantize stage makes
    int8-qdq), and Files.EXPORTED replaced by its float reference, the graph with its Q/DQ nodes
    taken out (pipeline/ops/qdq.py), which the build goes on from as from any float .onnx."""
    import onnx

    from edgeq.pipeline.ops import qdq

    exported, given = ctx.path(Files.EXPORTED), ctx.path(Files.GIVEN_QDQ)
    shutil.copyfile(exported, given)
    stripped, counts = qdq.strip(onnx.load(str(exported)))  # config checked that it can (intake.check_qdq)
    try:
        onnx.checker.check_model(stripped)
    except Exception as e:  # onnx raises ValidationError and others
        raise EdgeqError(f"{ctx.model_path.name}: its graph without Q/DQ nodes is not a valid model: "
                         f"{_first_line(e)}") from None
    onnx.save(stripped, str(exported))
    return {**counts, "how": "the given Q/DQ graph with its QuantizeLinear/DequantizeLinear nodes taken out: "
                              "activation pairs become the float tensor (a Clip where the pair's range clamps: "
                              "from 0, or narrowed by an integer Clip), weights their float (or de-quantized) values"}


def _save_tokenizer(ctx: BuildContext, model_dir: Path, required: bool) -> None:
    from transformers import AutoTokenizer

    trust = ctx.config.trust_remote_code
    check_model_safety(model_dir, trust_remote_code=trust, tokenizer_only=True)  # a tokenizer's own code
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust)
    except Exception as e:
        if required:
            raise EdgeqError(f"cannot load a tokenizer from {model_dir}: {type(e).__name__}: {_first_line(e)}") from None
        ctx.tokenizer = None
        return
    tok.save_pretrained(str(ctx.path(Files.TOKENIZER_DIR)))
    ctx.tokenizer = tok


def _export_hf(ctx: BuildContext, out_dir: Path) -> StageResult:
    from optimum.exporters.onnx import main_export

    model_dir = ctx.model_path
    hf_config = read_hf_config(model_dir)
    task = ctx.config.task or infer_task(hf_config)
    if task not in SUPPORTED_TASKS:
        raise EdgeqError(f"task '{task}' is not supported yet (supported: {', '.join(SUPPORTED_TASKS)})")
    ctx.model = ModelFacts(task=task, hf_config=hf_config)
    opset = ctx.target.opset
    # optimum would infer library "sentence_transformers" for sentence-transformers dirs and export
    # pooled outputs through a different code path; the plain transformers export keeps
    # last_hidden_state, which we pool ourselves (mean over the attention mask).
    try:
        with _quiet_libraries():
            main_export(
                str(model_dir), output=str(out_dir), task=task, opset=opset, library_name="transformers",
                do_validation=False, local_files_only=True, device="cpu",
                trust_remote_code=ctx.config.trust_remote_code,
            )
    except Exception as e:
        # The exporter raises whatever the model's files provoke (truncated weights: SafetensorError,
        # unknown architecture: KeyError/ValueError...): the model is the cause, so a user error.
        raise EdgeqError(f"cannot export {model_dir.name}: {type(e).__name__}: {_first_line(e)}") from None
    shutil.copyfile(model_dir / "config.json", ctx.path(Files.MODEL_CONFIG))
    _save_tokenizer(ctx, Path(ctx.config.tokenizer) if ctx.config.tokenizer else model_dir, required=True)
    diff = _validate_against_torch(ctx, model_dir, out_dir / "model.onnx", task)
    atol = ctx.config.export_atol
    if diff["max_abs_diff"] > atol:
        raise EdgeqError(f"export validation failed: ONNX differs from PyTorch by {diff['max_abs_diff']:.2e} "
                         f"(> atol {atol:g})")
    return StageResult(
        settings={"source": str(model_dir), "kind": "hf", "task": task, "opset": opset,
                  "exporter": "optimum.exporters.onnx.main_export", "atol": atol},
        outputs=[Files.EXPORTED, Files.TOKENIZER_DIR, Files.MODEL_CONFIG],
        metrics={**diff, "weights_sha256": _weights_sha256(model_dir)},
    )


@contextlib.contextmanager
def _quiet_libraries():
    """The exporter's tracer and deprecation warnings say nothing actionable to an edgeq user."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _weights_sha256(model_dir: Path) -> dict[str, str]:
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file())
    return {p.name: sha256_file(p) for p in files}


def _validate_against_torch(ctx: BuildContext, model_dir: Path, onnx_path: Path, task: str) -> dict:
    """Run PyTorch and the exported ONNX on the same real sentences; report the largest difference
    of the primary output over real (unpadded) tokens."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from edgeq.calib import default_eval_path, read_texts

    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = cls.from_pretrained(str(model_dir), local_files_only=True,
                                trust_remote_code=ctx.config.trust_remote_code).eval()
    texts = read_texts(default_eval_path(), limit=8, what="evaluation")
    enc = ctx.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: enc[n].numpy().astype(np.int64) for n in names}
    with torch.no_grad():
        ref = model(**{n: enc[n] for n in names})
    ref = (ref.logits if task == "text-classification" else ref.last_hidden_state).numpy()
    got = sess.run(None, feeds)[0]
    if task == "feature-extraction":
        mask = enc["attention_mask"].numpy().astype(bool)
        ref, got = ref[mask], got[mask]
    d = np.abs(ref - got)
    return {"validation_samples": len(texts), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}

