"""Stage 1, export: a Hugging Face model directory becomes ONNX through optimum's exporter, and the
ONNX outputs are checked against PyTorch's on real text. A given .onnx file is checked with
onnx.checker and used as is.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np

from edgeq.core import (
    BuildContext, EdgeqError, Files, StageResult, atomic_write_json, external_location, model_tensors, onnx_files,
    read_json_object, sha256_file,
)

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


# config.json keys edgeq reads itself, with the JSON types they must have (null: as if absent)
_CONFIG_TYPES = {"architectures": (list, "a list of class names"), "model_type": (str, "a string"),
                 "is_encoder_decoder": (bool, "true or false"), "max_position_embeddings": (int, "an integer")}


def read_hf_config(model_dir: Path) -> dict:
    """A model folder's config.json, as a user error when it is missing, not a JSON object, or one
    of the keys edgeq reads has the wrong type (`"architectures": 5` would otherwise surface as a
    TypeError deep in the build)."""
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise EdgeqError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    data = read_json_object(cfg)
    for key, (typ, what) in _CONFIG_TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        wrong = not isinstance(value, typ) or (typ is int and isinstance(value, bool))
        if key == "architectures" and not wrong:
            wrong = not all(isinstance(a, str) for a in value)
        if key == "max_position_embeddings" and not wrong:
            wrong, what = value < 1, "a positive integer"
        if wrong:
            raise EdgeqError(f"{cfg}: '{key}' must be {what}, got {_show_json(value)}")
    return data


def _show_json(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_onnx(path: Path) -> None:
    """A given .onnx, as a user error if it is not a valid model. First its external data, read
    from the protobuf alone: every location must name a file inside the model's folder, and the
    byte ranges must lie inside those files; nothing outside the folder is opened. Then onnx.checker
    on the path (so models with external data and >2 GB work)."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError for a damaged protobuf, OSError...
        why = _first_line(e) if str(e).strip() else type(e).__name__
        raise EdgeqError(f"{path} is not a valid ONNX model: {why}") from None
    check_external_data(path, proto)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises ValidationError, DecodeError, OSError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeqError(f"{path} is not a valid ONNX model: {first}") from None


def _fixed_nbytes(tensor) -> int | None:
    """Bytes of a tensor's data when its element type has a whole-byte size (None: strings, packed
    sub-byte types, unknown types)."""
    from onnx import TensorProto, helper

    try:
        if TensorProto.DataType.Name(tensor.data_type) in _NOT_WHOLE_BYTES:
            return None
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # undefined or unknown type, or one numpy lacks
        return None
    n = 1
    for d in tensor.dims:
        if d < 0:
            return None
        n *= d
    return n * itemsize


_NOT_WHOLE_BYTES = {"UNDEFINED", "STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2"}


def check_external_data(model_path: Path, proto) -> list[Path]:
    """The external-data files of a model (each once), after checking every reference: its
    location a relative path without '..' that resolves (symlinks followed) to a regular file inside
    the model's folder, its offset and length numbers within that file. A user error otherwise."""
    from onnx import TensorProto

    root = model_path.parent.resolve()
    files: dict[str, Path] = {}
    for t in model_tensors(proto):
        if t.data_location != TensorProto.EXTERNAL:  # what neither onnx nor ONNX Runtime reads from a file
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{model_path}: tensor {t.name!r}: external data location {loc!r}"
        if not loc:
            raise EdgeqError(f"{model_path}: tensor {t.name!r} uses external data but names no location")
        real, problem = external_location(root, loc)
        if problem:
            raise EdgeqError(f"{where} {problem}")
        try:
            st = real.stat()
        except OSError as e:  # missing, a name too long, no permission...
            why = "external data file missing" if isinstance(e, FileNotFoundError) else e.strerror
            raise EdgeqError(f"{where}: {why}") from None
        if not stat.S_ISREG(st.st_mode):
            raise EdgeqError(f"{where}: not a regular file")
        size = st.st_size
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else None
        except ValueError:
            raise EdgeqError(f"{where}: offset/length are not integers") from None
        expected = _fixed_nbytes(t)
        if offset < 0 or (length is not None and length < 0):
            raise EdgeqError(f"{where}: negative offset or length")
        if length is not None and expected is not None and length != expected:
            raise EdgeqError(f"{where}: length {length} bytes, but a tensor of its type and shape has {expected}")
        needed = length if length is not None else expected or 0
        if offset + needed > size:
            raise EdgeqError(f"{where}: bytes {offset}..{offset + needed} lie beyond the end of the file "
                             f"({size} bytes)")
        files.setdefault(str(real), root / loc)
    return list(files.values())


_PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "feature_extractor_config.json", "image_processor_config.json")
_CODE_KEYS = ("auto_map", "custom_pipelines")


def check_model_safety(model_dir: Path, trust_remote_code: bool = False, allow_pickle: bool = False, *,
                       tokenizer_only: bool = False) -> None:
    """Refuse, before anything loads it, a Hugging Face folder that would run code from the folder:
    a config naming custom Python classes (auto_map: transformers imports the folder's .py files
    with trust_remote_code) unless `trust_remote_code`; pickle-based weights (pytorch_model.bin,
    .pt, .pth, .ckpt, .pkl: unpickling can run code) when no safetensors weights are there to load
    instead, unless `allow_pickle`. `tokenizer_only`: the folder only lends its tokenizer (an .onnx
    model's, --tokenizer): only code the tokenizer would run counts, and weights are not read."""
    model_dir = Path(model_dir)
    if not trust_remote_code:
        for name in _CODE_CONFIGS:
            f = model_dir / name
            if not f.is_file() or (tokenizer_only and name not in ("config.json", "tokenizer_config.json")):
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # unreadable or invalid: transformers cannot use it either
                continue
            if not isinstance(data, dict):
                continue
            for key in _CODE_KEYS:
                value = data.get(key)
                if tokenizer_only and name == "config.json":  # the model's classes are not loaded
                    value = value.get("AutoTokenizer") if key == "auto_map" and isinstance(value, dict) else None
                if value:
                    code = _code_refs(value)
                    raise EdgeqError(f"{f}: '{key}' names custom code{f' ({code})' if code else ''} that "
                                     "transformers would import and run; pass --trust-remote-code if you trust it")
    if not allow_pickle and not tokenizer_only and not _has_safetensors(model_dir):
        pickles = sorted({p.name for pat in _PICKLE_WEIGHTS for p in model_dir.glob(pat) if p.is_file()})
        if pickles:
            raise EdgeqError(f"{model_dir / pickles[0]}: pickle-based weights (loading them can run code) and no "
                             ".safetensors weights beside them; pass --allow-pickle if you trust them")


def _has_safetensors(model_dir: Path) -> bool:
    return (any(p.is_file() for p in model_dir.glob("*.safetensors"))
            or (model_dir / "model.safetensors.index.json").is_file())


def _code_refs(value) -> str:
    """The class references of an auto_map, for the message: 'modeling_x.MyModel, ...'."""
    refs: list[str] = []

    def walk(v):
        if isinstance(v, str):
            refs.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(value)
    text = ", ".join(dict.fromkeys(" ".join(r.split()) for r in refs if r.strip()))
    return text if len(text) <= 120 else text[:117] + "..."


def run(ctx: BuildContext) -> StageResult:
    out_dir = ctx.path(Files.EXPORT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.model_kind == "onnx":
        return _take_onnx(ctx, out_dir)
    if ctx.config.get("family") == "causal-lm":
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

    spec = str(ctx.config["model"])
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
    vcfg = ctx.config["vision"]
    shape = vcfg["input_shape"] or getattr(factory, "edgeq_input_shape", None) or getattr(model, "edgeq_input_shape", None)
    if not shape:
        raise EdgeqError(f"{spec}: no input shape: pass --input-shape N,C,H,W (or give the factory an "
                         "edgeq_input_shape attribute)")
    declared = getattr(factory, "edgeq_preprocess", None) or getattr(model, "edgeq_preprocess", None) or {}
    pre = resolve_preprocess({**declared, **vcfg["preprocess"]}, list(shape))
    ctx.facts.update(task="image-classification", hf_config={}, tokenizer=None, preprocess=pre)
    arrays, _, _ = image_arrays(Path(ctx.config["calibration"]["path"]), pre, "input", 4, CALIB_VIEWS, "calibration")
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
    atol = float(ctx.config.get("export_atol", 1e-3))
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
        cache = Path(ctx.config["out"]) / ctx.model_name / ".cache" / "hf-from-gguf"
        model_dir, digest = causal_lm.hf_dir_from_gguf(src, cache, ctx.log)
        settings["converted_from_gguf"] = str(model_dir)
        metrics["gguf_sha256"] = digest
    else:
        model_dir = src
        metrics["weights_sha256"] = _weights_sha256(model_dir)
    ctx.facts["hf_config"] = read_hf_config(model_dir)
    ctx.facts["task"] = "text-generation"
    _save_tokenizer(ctx, Path(ctx.config["tokenizer"]) if ctx.config.get("tokenizer") else model_dir, required=True)
    try:
        with _quiet_libraries():
            causal_lm.export(model_dir, out_dir, ctx.target.opset,
                             trust_remote_code=bool(ctx.config.get("trust_remote_code", False)))
    except Exception as e:
        raise EdgeqError(f"cannot export {src.name}: {type(e).__name__}: {_first_line(e)}") from None
    for f in ("config.json", "generation_config.json"):
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, ctx.path(f))
    with _quiet_libraries():
        check = causal_lm.validate(model_dir, out_dir / "model.onnx", ctx.facts["tokenizer"],
                                   read_texts(default_eval_path(), limit=4, what="evaluation"),
                                   trust_remote_code=bool(ctx.config.get("trust_remote_code", False)))
    atol = float(ctx.config.get("export_atol", 1e-3)) * 10  # logits of a 50k vocabulary, not hidden states
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
    tok_dir = Path(ctx.config["tokenizer"]) if ctx.config.get("tokenizer") else src.parent
    has_tokenizer = any((tok_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    _save_tokenizer(ctx, tok_dir, required=has_tokenizer)
    cfg = tok_dir / "config.json"
    ctx.facts["hf_config"] = read_hf_config(tok_dir) if cfg.is_file() else {}
    if ctx.facts["hf_config"]:
        shutil.copyfile(cfg, ctx.path(Files.MODEL_CONFIG))
    ctx.facts["task"] = ctx.config.get("task") or (infer_task(ctx.facts["hf_config"]) if ctx.facts["hf_config"]
                                                   else "feature-extraction")
    return StageResult(
        settings={"source": str(src), "kind": "onnx"},
        outputs=[Files.EXPORTED],
        metrics={"source_sha256": sha256_file(src), "checker": "passed"},
    )


def _save_tokenizer(ctx: BuildContext, model_dir: Path, required: bool) -> None:
    from transformers import AutoTokenizer

    trust = bool(ctx.config.get("trust_remote_code", False))
    check_model_safety(model_dir, trust_remote_code=trust, tokenizer_only=True)  # a tokenizer's own code
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust)
    except Exception as e:
        if required:
            raise EdgeqError(f"cannot load a tokenizer from {model_dir}: {type(e).__name__}: {_first_line(e)}") from None
        ctx.facts["tokenizer"] = None
        return
    tok.save_pretrained(str(ctx.path(Files.TOKENIZER_DIR)))
    ctx.facts["tokenizer"] = tok


def _export_hf(ctx: BuildContext, out_dir: Path) -> StageResult:
    from optimum.exporters.onnx import main_export

    model_dir = ctx.model_path
    hf_config = read_hf_config(model_dir)
    task = ctx.config.get("task") or infer_task(hf_config)
    if task not in SUPPORTED_TASKS:
        raise EdgeqError(f"task '{task}' is not supported yet (supported: {', '.join(SUPPORTED_TASKS)})")
    ctx.facts["hf_config"] = hf_config
    ctx.facts["task"] = task
    opset = ctx.target.opset
    # optimum would infer library "sentence_transformers" for sentence-transformers dirs and export
    # pooled outputs through a different code path; the plain transformers export keeps
    # last_hidden_state, which we pool ourselves (mean over the attention mask).
    try:
        with _quiet_libraries():
            main_export(
                str(model_dir), output=str(out_dir), task=task, opset=opset, library_name="transformers",
                do_validation=False, local_files_only=True, device="cpu",
                trust_remote_code=bool(ctx.config.get("trust_remote_code", False)),
            )
    except Exception as e:
        # The exporter raises whatever the model's files provoke (truncated weights: SafetensorError,
        # unknown architecture: KeyError/ValueError...): the model is the cause, so a user error.
        raise EdgeqError(f"cannot export {model_dir.name}: {type(e).__name__}: {_first_line(e)}") from None
    shutil.copyfile(model_dir / "config.json", ctx.path(Files.MODEL_CONFIG))
    _save_tokenizer(ctx, Path(ctx.config["tokenizer"]) if ctx.config.get("tokenizer") else model_dir, required=True)
    diff = _validate_against_torch(ctx, model_dir, out_dir / "model.onnx", task)
    atol = float(ctx.config.get("export_atol", 1e-3))
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
                                trust_remote_code=bool(ctx.config.get("trust_remote_code", False))).eval()
    texts = read_texts(default_eval_path(), limit=8, what="evaluation")
    enc = ctx.facts["tokenizer"](texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
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

