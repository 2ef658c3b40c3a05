"""The build's configuration: the typed `BuildConfig` every stage reads, how the options of
`edgeq build` resolve into it (checked once, before anything is written), the option list the CLI
shows, and edgeq.toml.

`resolve_config` checks the model, the data and the target and fills in the target's defaults; the
sections' `__post_init__` reject values no build can use. `edgeq config [options]` writes the
effective options as edgeq.toml; `edgeq build --config edgeq.toml` replays them, with options given
on the command line taking precedence. The file's keys are the long options of `edgeq build` with
underscores (`calib_samples`, `eval`, `modes`); paths are relative to the file's folder. An unknown
key, or a value of the wrong type, is a one-line user error.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgeq import intake
from edgeq.core import EdgeqError, load_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LM_MODES = ("dynamic", "int4")  # what a causal LM is built as (its activations get no static ranges)
LM_ALLOWED = LM_MODES + ("nf4",)  # nf4 on request
BLOCK_SIZES = (16, 32, 64, 128, 256)
# --int4-algo: how int4 weights are chosen (pipeline/ops/int4.py, pipeline/ops/weight_only.py)
INT4_ALGOS = ("rtn", "gptq", "awq", "hqq", "kquant", "gguf")
# --int4-symmetric/--int4-asymmetric unset: each algorithm's grid as measured best on SmolLM2-135M
# (README, "Weight-only int4 methods"); hqq and kquant choose their own (float) offsets, gguf
# carries the file's grids over.
INT4_SYMMETRIC = {"rtn": True, "gptq": False, "awq": False, "hqq": False, "kquant": False, "gguf": True}
# the default for a float checkpoint: the algorithm measured best (README's method table)
INT4_DEFAULT_FLOAT = "gptq"


def _at_least(label: str, value, lo) -> None:
    if value < lo:
        raise EdgeqError(f"{label} must be at least {lo}, got {value}")


def _positive(label: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise EdgeqError(f"{label} must be a positive number, got {value}")


BUDGET_METRICS = ("cosine", "task", "retrieval")  # what --max-accuracy-drop limits
EMBEDDING_PRECISIONS = ("int8", "binary")  # --embedding-precision

@dataclass(frozen=True)
class Fp16Options:
    keep_io_types: bool  # fp16 artifacts take and return fp32 (the target's default, off with --fp16-io)
    op_block_list: list[str]  # ops left fp32; empty: onnxruntime's default list


@dataclass(frozen=True)
class Calibration:
    path: str
    method: str  # minmax, entropy, percentile, distribution
    samples: int
    batch_size: int = 16
    text_field: str = "text"
    percentile: float = 99.999

    def __post_init__(self) -> None:
        from edgeq.targets import CALIBRATION_METHODS

        if self.method not in CALIBRATION_METHODS:
            raise EdgeqError(f"unknown calibration method '{self.method}' (choose from: {', '.join(CALIBRATION_METHODS)})")
        _at_least("--calib-samples", self.samples, 1)
        if not 0 < self.percentile <= 100:
            raise EdgeqError(f"--percentile must be in (0, 100], got {self.percentile}")


@dataclass(frozen=True)
class Qat:
    """--mode qat: distillation fine-tuning with the static recipe's fake quantization (pipeline/ops/qat.py)."""
    steps: int = 400
    lr: float = 1e-5  # Adam, the Linear weights and biases
    scale_lr: float = 1e-2  # Adam, the log of each learnt static activation scale
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("--qat-steps", self.steps, 1)
        _at_least("--qat-batch-size", self.batch_size, 1)
        _at_least("--qat-seed", self.seed, 0)
        for label, v in (("--qat-lr", self.lr), ("--qat-scale-lr", self.scale_lr)):
            if not (math.isfinite(v) and 0 < v < 1):
                raise EdgeqError(f"{label} must be between 0 and 1 (an Adam learning rate), got {v}")


@dataclass(frozen=True)
class Evaluation:
    path: str
    samples: int | None  # None: all of a labelled set, 120 lines of plain text (calib.DEFAULT_TEXT_SAMPLES)
    embedding_precisions: tuple[str, ...] = ()  # "int8", "binary": vector-store codes measured on retrieval

    def __post_init__(self) -> None:
        if self.samples is not None:
            _at_least("--eval-samples", self.samples, 1)


@dataclass(frozen=True)
class Benchmark:
    batch_size: int
    seq_len: int  # prompt length for a causal LM
    runs: int
    warmup: int
    threads: int  # 0: all cores
    new_tokens: int | None = None  # causal LMs: tokens generated per run
    torch_baseline: bool = False  # PyTorch dynamic int8 of the HF model measured beside the artifacts

    def __post_init__(self) -> None:
        if self.new_tokens is not None:
            _at_least("--new-tokens", self.new_tokens, 1)
        for label, v, lo in (("--runs", self.runs, 1), ("--seq-len", self.seq_len, 1),
                             ("--batch-size", self.batch_size, 1), ("--warmup", self.warmup, 0),
                             ("--threads", self.threads, 0)):
            _at_least(label, v, lo)


@dataclass(frozen=True)
class Vision:
    input_shape: list[int] | None  # N,C,H,W; None: the factory's edgeq_input_shape
    preprocess: dict  # as given (--preprocess); the export stage fills in the model's defaults
    eval_is_calibration_folder: bool  # no --eval: other views of the calibration photos


@dataclass(frozen=True)
class Int4:
    block_size: int
    symmetric: bool | None  # None: each algorithm's own (INT4_SYMMETRIC)
    accuracy_level: int  # MatMulNBits compute type: 4 = int8 activations, 0 = as the input
    embeddings: bool  # the token embedding table too (GatherBlockQuantized)
    algorithms: tuple[str, ...] = ("rtn",)  # one int4 artifact each
    # the output projection (LM head) at 8 bits: a small LM's logits are what 4 bits hurt most
    # (measured in the README); llama.cpp's k-quant mixes likewise keep output.weight wider
    head_bits: int = 8

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise EdgeqError(f"--block-size must be a power of two from 16 to 256 ({', '.join(map(str, BLOCK_SIZES))}), "
                             f"got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeqError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")
        if not self.algorithms:
            raise EdgeqError("--int4-algo needs at least one algorithm")
        for a in self.algorithms:
            if a not in INT4_ALGOS:
                raise EdgeqError(f"unknown --int4-algo {a!r} (choose from: {', '.join(INT4_ALGOS)})")
        if self.head_bits not in (4, 8):
            raise EdgeqError(f"int4 head_bits must be 4 or 8, got {self.head_bits}")

    def symmetric_for(self, algo: str) -> bool:
        return INT4_SYMMETRIC[algo] if self.symmetric is None else self.symmetric

    def artifact(self, algo: str) -> str:
        """The artifact's name: `int4` for a build of one algorithm, `int4-<algo>` for several."""
        return "int4" if len(self.algorithms) == 1 else f"int4-{algo}"


@dataclass(frozen=True)
class Gates:
    max_accuracy_drop: float | None
    min_speedup: float | None
    max_size_mb: float | None

    def __post_init__(self) -> None:
        _positive("--min-speedup", self.min_speedup)
        _positive("--max-size-mb", self.max_size_mb)

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in (("max_accuracy_drop", self.max_accuracy_drop), ("min_speedup", self.min_speedup),
                                  ("max_size_mb", self.max_size_mb)) if v is not None}


@dataclass(frozen=True)
class BuildConfig:
    """A build, fully resolved: what `edgeq build` runs and the manifest records (`to_dict`)."""

    model: str  # a path, or package.module:factory
    model_kind: str  # "hf", "onnx", "gguf", "module"
    family: str  # "encoder", "causal-lm", "vision"
    name: str  # the output folder under --out
    target: str  # the profile's name
    target_profile: str  # what --target gave: a name or a .toml path
    modes: tuple[str, ...]
    task: str | None
    tokenizer: str | None
    max_length: int  # tokens per calibration/evaluation sample
    max_accuracy_drop: float | None  # the hybrid search's budget (0.01 when hybrid is asked without one)
    budget_metric: str  # "cosine", "task" or "retrieval"
    fp16: Fp16Options
    calibration: Calibration
    evaluation: Evaluation
    benchmark: Benchmark
    gates: Gates
    out: str
    vision: Vision | None = None
    int4: Int4 | None = None
    qat: Qat | None = None  # --mode qat's training settings
    trust_remote_code: bool = False
    allow_pickle: bool = False
    export_atol: float = 1e-3
    target_reason: str | None = None  # why this target, when --target was not given (intake.host_target)
    output: str | None = None  # --output: the graph output evaluation compares (default: pipeline/ops/outputs.py)
    options: dict[str, Any] = field(default_factory=dict)  # every option's effective value (edgeq.toml)

    def __post_init__(self) -> None:
        from edgeq.targets import MODES

        for m in self.modes:
            if m not in MODES:
                raise EdgeqError(f"unknown mode '{m}' (choose from: {', '.join(MODES)})")
        if self.budget_metric not in BUDGET_METRICS:
            raise EdgeqError(f"--budget-metric must be one of {', '.join(BUDGET_METRICS)}, got {self.budget_metric!r}")
        if self.max_accuracy_drop is not None and not 0 < self.max_accuracy_drop < 1:
            raise EdgeqError(f"--max-accuracy-drop must be between 0 and 1 (a cosine drop), got {self.max_accuracy_drop}")
        _at_least("--max-length", self.max_length, 2)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the manifest records (and the build key hashes)."""
        from dataclasses import asdict

        bench = asdict(self.benchmark)
        if bench["new_tokens"] is None:
            bench.pop("new_tokens")
        return {
            "model": self.model, "model_kind": self.model_kind, "family": self.family, "name": self.name,
            "target": self.target, "target_profile": self.target_profile,
            **({"target_reason": self.target_reason} if self.target_reason else {}), "modes": list(self.modes),
            **({"output": self.output} if self.output else {}),
            "task": self.task, "tokenizer": self.tokenizer, "max_length": self.max_length,
            "export_atol": self.export_atol, "max_accuracy_drop": self.max_accuracy_drop,
            "budget_metric": self.budget_metric, "fp16": asdict(self.fp16), "calibration": asdict(self.calibration),
            "evaluation": asdict(self.evaluation), "benchmark": bench,
            **({"vision": asdict(self.vision)} if self.vision else {}),
            **({"int4": asdict(self.int4)} if self.int4 else {}),
            **({"qat": asdict(self.qat)} if self.qat else {}),
            "gates": asdict(self.gates), "trust_remote_code": self.trust_remote_code,
            "allow_pickle": self.allow_pickle, "out": self.out, "options": dict(self.options),
        }


def resolve_config(model: str | None = None, target: str | None = None, modes: tuple[str, ...] = (),
                   calib: str | None = None, eval_path: str | None = None, out: str = "artifacts",
                   calib_method: str | None = None, calib_samples: int = 256, eval_samples: int | None = None,
                   text_field: str = "text", task: str | None = None, tokenizer: str | None = None,
                   name: str | None = None, runs: int | None = None, warmup: int = 10, threads: int = 0,
                   max_length: int = 128, seq_len: int = 128, batch_size: int = 1,
                   percentile: float = 99.999, fp16_io: bool = False,
                   max_accuracy_drop: float | None = None, budget_metric: str = "cosine",
                   block_size: int = 32, accuracy_level: int = 4, new_tokens: int = 32,
                   input_shape: tuple[int, ...] | None = None, preprocess: str | None = None,
                   min_speedup: float | None = None, max_size_mb: float | None = None,
                   trust_remote_code: bool = False, allow_pickle: bool = False,
                   output: str | None = None, int4_algos: tuple[str, ...] = (),
                   int4_symmetric: bool | None = None, torch_baseline: bool | None = None,
                   embedding_precisions: tuple[str, ...] = (), qat_steps: int | None = None,
                   qat_lr: float | None = None, qat_scale_lr: float | None = None,
                   qat_batch_size: int | None = None, qat_seed: int | None = None) -> BuildConfig:
    """Check every user input before anything is written; return the fully resolved config.

    The model, the data and the target are checked here (files exist, parse, fit the model); the
    sections reject impossible values as they are made. The config keeps, under `options`, every
    option's effective value (what `edgeq config` writes as edgeq.toml and `--config` replays)."""
    given_model = model
    from edgeq import targets
    from edgeq.calib import check_readable, default_calibration_path, default_eval_path, read_eval_set, read_texts

    if model is None:
        model_path, name = intake.default_model_dir(), name or intake.DEFAULT_MODEL_NAME
        kind = intake.model_kind(model_path)
    elif intake.MODULE_RE.fullmatch(model) and not Path(model).exists():
        kind, model_path = "module", intake.check_factory(model)
        name = name or model.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    else:
        model_path = Path(model).expanduser().resolve()
        kind = intake.model_kind(model_path)
    tname, target_reason = (target, None) if target else intake.host_target()
    if tname.endswith(".toml"):
        tname = str(Path(tname).expanduser().resolve())
    profile = targets.load(tname)
    family = "vision" if kind == "module" else intake.family(model_path, kind)
    if family == "vision":
        from edgeq.calib.images import parse_preprocess

        preprocess_given = parse_preprocess(preprocess)
        if input_shape is not None and (len(input_shape) != 4 or min(input_shape) < 1):
            raise EdgeqError(f"--input-shape must be 4 positive sizes (batch, channels, height, width), got {input_shape}")
        if calib is None:
            raise EdgeqError("an image model needs calibration photos: --calib FOLDER (python -m edgeq.calib.images "
                             "DIR copies the photos that ship with scikit-image)")
        if budget_metric != "cosine":
            raise EdgeqError(f"--budget-metric {budget_metric} is not supported for image models yet (the budget is on cosine)")
        modes = tuple(modes) or ("static",)
    if runs is None:
        runs = 5 if family == "causal-lm" else 100  # a causal-LM run is a prefill plus --new-tokens steps
    if family == "causal-lm" and budget_metric == "retrieval":
        raise EdgeqError("--budget-metric retrieval is for embedding models; a causal LM's budget is its perplexity")
    if family == "causal-lm":
        modes = tuple(modes) or LM_MODES
        wrong = [m for m in modes if m not in LM_ALLOWED]
        if wrong:
            raise EdgeqError(f"mode {', '.join(wrong)} is not built for causal language models "
                             f"(they get {', '.join(LM_ALLOWED)}: a decoder's activation ranges are not calibrated)")
    # A Q/DQ .onnx (a QAT export, say) is built as `int8-qdq`, kept as it is, beside its float
    # reference (pipeline/ops/qdq.py); other modes asked for are built from that reference.
    if kind == "onnx":  # already through onnx.checker (intake.family); read once for the checks below
        import onnx

        onnx_proto = onnx.load(str(model_path), load_external_data=False)
    given_qdq = kind == "onnx" and intake.quantized_form(onnx_proto, model_path.name) == "qdq"
    if "qdq" in modes and not given_qdq:
        raise EdgeqError("--mode qdq keeps a Q/DQ model as it is given: it needs an .onnx with "
                         f"QuantizeLinear/DequantizeLinear nodes, and {model_path.name if kind != 'module' else model} has none")
    if given_qdq:
        intake.check_qdq(onnx_proto, model_path.name)
        if family == "causal-lm":
            raise EdgeqError(f"{model_path.name} is a Q/DQ causal LM: edgeq builds causal LMs from float weights "
                             "(dynamic int8, int4); give it the float model")
        modes = tuple(dict.fromkeys(("qdq",) + tuple(modes)))
    algos = tuple(dict.fromkeys(a.strip().lower() for v in int4_algos for a in v.split(",") if a.strip()))
    if int4_algos and not algos:
        raise EdgeqError(f"--int4-algo needs an algorithm (choose from: {', '.join(INT4_ALGOS)})")
    if (algos or int4_symmetric is not None) and "int4" not in (tuple(modes) or profile.modes):
        raise EdgeqError("--int4-algo and --int4-symmetric/--int4-asymmetric choose how --mode int4 is made; "
                         "this build makes no int4 artifact (add --mode int4)")
    if not algos:
        algos = ("gguf",) if kind == "gguf" else (INT4_DEFAULT_FLOAT,) if family == "causal-lm" else ("rtn",)
    if "gguf" in algos and kind != "gguf":
        raise EdgeqError("--int4-algo gguf repacks a GGUF file's own quantized weights; "
                         f"{model_path.name} is not a .gguf file (choose from: {', '.join(a for a in INT4_ALGOS if a != 'gguf')})")
    calibrated = [a for a in algos if a in ("gptq", "awq")]
    if calibrated and family != "causal-lm":
        raise EdgeqError(f"--int4-algo {calibrated[0]} is for causal language models (it calibrates on "
                         "generated prompts); an encoder's int4 is rtn, hqq or kquant")
    if "nf4" in modes:
        primary = profile.execution_providers[0]
        if primary not in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            raise EdgeqError(f"--mode nf4: ONNX Runtime has MatMulBnb4 kernels only on the CPU and CUDA EPs; target "
                             f"{profile.name} runs on {primary}, where it would fall back to the CPU (use --mode int4)")
    int4 = Int4(block_size=block_size, symmetric=int4_symmetric, accuracy_level=accuracy_level, embeddings=True,
                algorithms=algos) if family == "causal-lm" or "int4" in modes or "nf4" in modes else None
    # --max-accuracy-drop is the hybrid search's budget and a gate; a causal LM gets no hybrid artifact,
    # only the gate (on perplexity, relative to fp32's)
    hybrid_wanted = max_accuracy_drop is not None and family != "causal-lm"
    modes = tuple(dict.fromkeys(tuple(modes or profile.modes) + (("hybrid",) if hybrid_wanted else ())))
    gate_accuracy = max_accuracy_drop
    if "hybrid" in modes and max_accuracy_drop is None:
        max_accuracy_drop = 0.01
    gates = Gates(max_accuracy_drop=gate_accuracy, min_speedup=min_speedup, max_size_mb=max_size_mb)
    method = (calib_method or profile.static_for(family).calibration).lower()
    calib_file = Path(calib).expanduser().resolve() if calib else default_calibration_path()
    calibration = Calibration(path=str(calib_file), method=method, samples=calib_samples, batch_size=16,
                              text_field=text_field, percentile=percentile)
    # an image model without --eval is evaluated on other views of its calibration photos
    eval_file = (Path(eval_path).expanduser().resolve() if eval_path else
                 calib_file if family == "vision" else default_eval_path())
    if family == "vision":
        from edgeq.calib.images import image_files

        for f, what in ((calib_file, "calibration"), (eval_file, "evaluation")):
            image_files(f, what)  # a folder with images, or a user error now
    # Read the data now (text is cheap to read) so a bad file fails before anything is written.
    eval_kind = None
    for f, what, n in () if family == "vision" else ((calib_file, "calibration", calib_samples),
                                                      (eval_file, "evaluation", eval_samples)):
        check_readable(f, what)
        intake.data_format(f, what)
        if f.suffix.lower() == ".npz":
            if family == "causal-lm":
                raise EdgeqError(f"{what} data for a language model is text (.txt or .jsonl), not .npz")
            if what == "evaluation" and budget_metric != "cosine":
                raise EdgeqError(f"--budget-metric {budget_metric} needs labelled evaluation data (--eval JSONL); "
                                 ".npz has no labels")
            continue
        if what == "evaluation":
            eval_kind = read_eval_set(f, limit=None, text_field=text_field).kind  # a bad label fails now
            if budget_metric == "task" and eval_kind == "text":
                raise EdgeqError(f"--budget-metric task needs labelled evaluation data (--eval JSONL with "
                                 f"text+label, text1+text2+score or query+positive); {f.name} has no labels")
            if budget_metric == "retrieval" and eval_kind != "retrieval":
                raise EdgeqError(f"--budget-metric retrieval needs a retrieval set (--eval JSONL with query+positive "
                                 f"and document lines; python -m edgeq.calib.gensim_data DIR writes one); "
                                 f"{f.name} is {'plain text' if eval_kind == 'text' else 'a ' + eval_kind + ' set'}")
        else:
            read_texts(f, limit=n, text_field=text_field, what=what)
    if tokenizer and not Path(tokenizer).is_dir():
        raise EdgeqError(f"tokenizer directory not found: {tokenizer}")
    if tokenizer or kind == "onnx":  # a folder that only supplies the tokenizer: its code counts, not weights
        intake.check_model_safety(Path(tokenizer) if tokenizer else model_path.parent,
                           trust_remote_code=trust_remote_code, tokenizer_only=True)
    if kind == "hf":
        intake.check_model_safety(model_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        hf_config = intake.check_hf_model(model_path, Path(tokenizer) if tokenizer else model_path, family)
        positions = hf_config.get("max_position_embeddings")
        for label, v in (("--seq-len", seq_len), ("--max-length", max_length)):
            if isinstance(positions, int) and v > positions:
                raise EdgeqError(f"{label} {v} exceeds the model's {positions} positions (max_position_embeddings)")
        archs = [a for a in hf_config.get("architectures") or [] if isinstance(a, str)]
        classifier = task == "text-classification" or (task is None and any(a.endswith("ForSequenceClassification")
                                                                             for a in archs))
        if eval_kind == "retrieval" and classifier:
            raise EdgeqError(f"{eval_file.name} is a retrieval set, scored on embeddings; {model_path.name} is a "
                             "text classifier (its output is class logits): evaluate it on text+label JSONL")
    if kind == "onnx":  # already through onnx.checker: intake.family() reads its inputs
        text_data = calib_file.suffix.lower() != ".npz" or eval_file.suffix.lower() != ".npz"
        tok_dir = Path(tokenizer) if tokenizer else model_path.parent
        if text_data and not any((tok_dir / f).is_file() for f in intake.TOKENIZER_FILES):
            raise EdgeqError(f"{model_path.name} has no tokenizer beside it and the data is text: "
                             "pass --tokenizer DIR, or calibration/evaluation tensors as .npz")
    if output is not None:
        if family == "causal-lm":
            raise EdgeqError("--output is for encoders and image models: a causal LM is evaluated on its logits")
        if kind == "onnx":
            outs = [o.name for o in onnx_proto.graph.output]
            if output not in outs:
                raise EdgeqError(f"--output {output!r}: {model_path.name} has no such output (it has: {', '.join(outs)})")
    _at_least("--new-tokens", new_tokens, 1)  # an option of every build, used by causal LMs
    emb_prec = tuple(dict.fromkeys(p.strip().lower() for v in embedding_precisions for p in v.split(",") if p.strip()))
    bad = [p for p in emb_prec if p not in EMBEDDING_PRECISIONS]
    if bad or (embedding_precisions and not emb_prec):
        raise EdgeqError(f"--embedding-precision {bad[0] if bad else '(empty)'}: choose from {', '.join(EMBEDDING_PRECISIONS)}")
    if emb_prec and (family != "encoder" or eval_kind != "retrieval"):
        raise EdgeqError("--embedding-precision measures vector-store codes on a retrieval task: it needs an "
                         "embedding model and a retrieval --eval set (query+positive and document lines)")
    evaluation = Evaluation(path=str(eval_file), samples=eval_samples, embedding_precisions=emb_prec)
    hf_encoder = kind == "hf" and family == "encoder"
    if torch_baseline and not hf_encoder:
        raise EdgeqError("--torch-baseline measures PyTorch's dynamic int8 of a Hugging Face encoder: "
                         f"{model_path.name} is {'a causal LM' if family == 'causal-lm' else 'not a Hugging Face model directory'}")
    qat_given = {k: v for k, v in (("steps", qat_steps), ("lr", qat_lr), ("scale_lr", qat_scale_lr),
                                   ("batch_size", qat_batch_size), ("seed", qat_seed)) if v is not None}
    if qat_given and "qat" not in modes:
        raise EdgeqError("--qat-steps/--qat-lr/--qat-scale-lr/--qat-batch-size/--qat-seed set how --mode qat "
                         "fine-tunes; this build makes no int8-qat artifact (add --mode qat)")
    if "qat" in modes and not hf_encoder:
        raise EdgeqError("--mode qat fine-tunes the PyTorch model: it needs a Hugging Face encoder directory; "
                         f"{model_path.name} is {'a causal LM' if family == 'causal-lm' else 'an image model' if family == 'vision' else 'not one (an .onnx is quantized as it is given)'}")
    qat = Qat(**qat_given) if "qat" in modes else None
    cpu_first = profile.execution_providers[0] == "CPUExecutionProvider"
    benchmark = Benchmark(batch_size=batch_size, seq_len=seq_len, runs=runs, warmup=warmup, threads=threads,
                          new_tokens=new_tokens if family == "causal-lm" else None,
                          torch_baseline=bool(torch_baseline if torch_baseline is not None else hf_encoder and cpu_first))
    name = name or intake.model_name(model_path, kind)
    if not targets.NAME_RE.fullmatch(name):
        # the name becomes a directory under --out: no separators, no '.'/'..', nothing absolute
        raise EdgeqError(f"model name {name!r} can't be a folder name: use letters, digits, '.', '_', '-' (--name)")
    out_dir = intake.writable_dir(Path(out).expanduser().resolve())
    return BuildConfig(
        model=str(model_path), model_kind=kind, family=family, name=name, target=profile.name,
        target_profile=tname, modes=tuple(modes), task=task, tokenizer=tokenizer, max_length=max_length,
        max_accuracy_drop=max_accuracy_drop, budget_metric=budget_metric,
        fp16=Fp16Options(keep_io_types=profile.fp16.keep_io_types and not fp16_io,
                         op_block_list=list(profile.fp16.op_block_list)),
        calibration=calibration, evaluation=evaluation, benchmark=benchmark, gates=gates, out=str(out_dir),
        vision=Vision(input_shape=list(input_shape) if input_shape else None, preprocess=preprocess_given,
                      eval_is_calibration_folder=eval_file == calib_file) if family == "vision" else None,
        int4=(int4 or Int4(block_size=block_size, symmetric=int4_symmetric, accuracy_level=accuracy_level,
                           embeddings=True, algorithms=algos))
        if "int4" in modes or "nf4" in modes else None, qat=qat,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, target_reason=target_reason, output=output,
        options={
            "model": given_model if given_model is None else str(model_path) if kind != "module" else model,
            "target": tname,
            "modes": list(modes), "calib": str(calib_file) if calib else None,
            "eval": str(eval_file) if eval_path else None, "out": str(out_dir),
            "calib_method": method, "calib_samples": calib_samples, "eval_samples": eval_samples,
            "percentile": percentile, "text_field": text_field, "task": task, "tokenizer":
                str(Path(tokenizer).expanduser().resolve()) if tokenizer else None,
            "name": name, "runs": runs, "warmup": warmup, "threads": threads, "seq_len": seq_len,
            "max_length": max_length, "batch_size": batch_size, "fp16_io": fp16_io,
            "max_accuracy_drop": gate_accuracy, "budget_metric": budget_metric, "block_size": block_size,
            "accuracy_level": accuracy_level, "new_tokens": new_tokens,
            **({"torch_baseline": torch_baseline} if torch_baseline is not None else {}),
            **({"embedding_precisions": list(embedding_precisions)} if embedding_precisions else {}),
            **{f"qat_{k}": v for k, v in qat_given.items()},
            **({"int4_algos": list(int4_algos)} if int4_algos else {}),
            **({"int4_symmetric": int4_symmetric} if int4_symmetric is not None else {}),
            "input_shape": list(input_shape) if input_shape else None, "preprocess": preprocess,
            "min_speedup": min_speedup, "max_size_mb": max_size_mb,
            "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle,
            **({"output": output} if output else {}),
        },
    )


# The options of `edgeq build`, shared with `edgeq config` (which resolves them without building).
# Each is also a key of edgeq.toml, named like its long option with underscores (`eval` for --eval).
BUILD_OPTIONS = [
    click.argument("model", required=False),
    click.option("--target", "-t", help="Target profile (see `edgeq targets`) or a profile .toml; default: "
                                        "from this CPU's features (x86_64-vnni with VNNI/AMX, x86_64, arm64), "
                                        "or $EDGEQ_TARGET."),
    click.option("--mode", "-m", "modes", multiple=True,
                 help="static, dynamic (int8), fp16, hybrid, int4, nf4 (4-bit NormalFloat, MatMulBnb4) "
                      "(repeatable; default: the target's modes, dynamic and int4 for a causal LM)."),
    click.option("--calib", type=str, help="Calibration data: .txt (a sample per line), .jsonl or .npz. Default: "
                                           "bundled set."),
    click.option("--eval", "eval_path", type=str,
                 help="Held-out evaluation data (same formats). JSONL with text+label or text1+text2+score adds a "
                      "task metric (accuracy, Spearman). Default: bundled set."),
    click.option("--calib-method", help="minmax, entropy, percentile or distribution (default: the target's)."),
    click.option("--calib-samples", type=int, default=256, show_default=True, help="Calibration samples to use."),
    click.option("--eval-samples", type=int,
                 help="Evaluation samples to use (default: 120 lines of text, every sample of labelled JSONL)."),
    click.option("--percentile", type=float, default=99.999, show_default=True, help="For --calib-method percentile."),
    click.option("--text-field", default="text", show_default=True, help="Text field of JSONL data."),
    click.option("--task", type=click.Choice(["feature-extraction", "text-classification"]),
                 help="Default: from config.json."),
    click.option("--tokenizer", help="Tokenizer directory, for an .onnx model without one beside it."),
    click.option("--output", help="The model output evaluation compares, by name (default: chosen by graph "
                                  "structure: a pooled sentence embedding, else the first token-level output)."),
    click.option("--name", help="Model name used for the output folder."),
    click.option("--out", "-o", default="artifacts", show_default=True, help="Output root."),
    click.option("--runs", type=int, help="Timed runs per artifact (default 100; 5 generations for a causal LM)."),
    click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per artifact first."),
    click.option("--threads", type=int, default=0, help="Intra-op threads for benchmarks (0: all cores)."),
    click.option("--seq-len", type=int, default=128, show_default=True, help="Benchmark sequence length."),
    click.option("--max-length", type=int, default=128, show_default=True,
                 help="Tokens per calibration/evaluation sample (longer text is truncated)."),
    click.option("--batch-size", type=int, default=1, show_default=True, help="Benchmark batch size."),
    click.option("--fp16-io", is_flag=True, help="fp16 artifacts take and return fp16 (default: fp32 I/O)."),
    click.option("--max-accuracy-drop", type=float,
                 help="Gate, and budget of an int8-hybrid artifact (static int8 with the most sensitive nodes in "
                      "fp16/fp32 until the drop vs fp32 is within it): 1 - cosine, the task metric's drop with "
                      "--budget-metric task, or a causal LM's relative perplexity increase (e.g. 0.01)."),
    click.option("--min-speedup", type=float,
                 help="Gate: an artifact must be at least this many times as fast as fp32 (latency p50; decode "
                      "tokens/s for a causal LM)."),
    click.option("--max-size-mb", type=float, help="Gate: an artifact's model file(s) at most this many MB."),
    click.option("--block-size", type=int, default=32, show_default=True,
                 help="int4: weights per quantization block (16, 32, 64, 128, 256)."),
    click.option("--int4-algo", "int4_algos", multiple=True,
                 help="int4: how the 4-bit weights are chosen: rtn, gptq, awq, hqq, kquant, gguf (the exact repack "
                      "of a .gguf's own grids); repeatable or comma-separated, one artifact each (int4-<algo>). "
                      "Default: gguf for a .gguf file, else gptq for a causal LM, rtn otherwise."),
    click.option("--int4-symmetric/--int4-asymmetric", "int4_symmetric", default=None,
                 help="int4: a symmetric grid (zero point 8) or a 4-bit zero point per block (default: each "
                      "algorithm's best measured: symmetric for rtn, asymmetric for gptq and awq)."),
    click.option("--accuracy-level", type=int, default=4, show_default=True,
                 help="int4: MatMulNBits compute type (4: int8 activations, the fast CPU path; 0: as the input)."),
    click.option("--new-tokens", type=int, default=32, show_default=True,
                 help="Causal LM benchmark: tokens generated after the --seq-len prompt."),
    click.option("--input-shape", help="Image model from a factory: input size as N,C,H,W (default: the factory's "
                                       "edgeq_input_shape)."),
    click.option("--preprocess", help="Image preprocessing, e.g. resize=256,crop=224,mean=127,std=128 (default: the "
                                      "factory's edgeq_preprocess, else ImageNet's)."),
    click.option("--budget-metric", type=click.Choice(BUDGET_METRICS), default="cosine", show_default=True,
                 help="What --max-accuracy-drop limits: cosine vs fp32, the task metric of labelled --eval data "
                      "(accuracy, Spearman, nDCG@10) as an absolute drop, or retrieval: 1 - recall@10 against "
                      "fp32's own ranking of a retrieval --eval set."),
    click.option("--torch-baseline/--no-torch-baseline", "torch_baseline", default=None,
                 help="Measure PyTorch's dynamic int8 (torch.ao.quantization.quantize_dynamic on Linear layers) of a "
                      "Hugging Face encoder beside the artifacts, interleaved, torch threads matched: a baseline "
                      "row, not an artifact (default: on for an encoder directory on a CPU target)."),
    click.option("--embedding-precision", "embedding_precisions", multiple=True,
                 help="Retrieval --eval set: also measure every artifact's retrieval with its embeddings stored as a "
                      "vector store would keep them: int8 (per-dimension ranges calibrated on the calibration "
                      "texts) or binary (one bit per dimension); repeatable or comma-separated."),
    click.option("--qat-steps", type=int, help="--mode qat: fine-tuning steps (batches), default 400."),
    click.option("--qat-lr", type=float, help="--mode qat: Adam learning rate of the weights, default 1e-5."),
    click.option("--qat-scale-lr", type=float, help="--mode qat: Adam learning rate of the learnt activation "
                                                    "scales (their logs), default 1e-2."),
    click.option("--qat-batch-size", type=int, help="--mode qat: calibration texts a step, default 16."),
    click.option("--qat-seed", type=int, help="--mode qat: seed of the data order (the build is deterministic "
                                              "for a seed on one machine), default 0."),
    click.option("--trust-remote-code", is_flag=True,
                 help="Allow a Hugging Face model's own Python code (auto_map) to run. Off: such a model is refused."),
    click.option("--allow-pickle", is_flag=True,
                 help="Allow pickle checkpoints (pytorch_model.bin, .pt): loading one can run code. Off: only "
                      "safetensors weights are read."),
    click.option("--config", "config_file", type=str,
                 help="An edgeq.toml (written by `edgeq config`) giving these options; options on the command "
                      "line override it."),
]


def build_options(f):
    for decorator in reversed(BUILD_OPTIONS):
        f = decorator(f)
    return f


# file key -> parameter name of `edgeq build`, where they differ
_KEY_TO_PARAM = {"eval": "eval_path", "mode": "modes", "int4_algo": "int4_algos", "embedding_precision": "embedding_precisions"}
_PARAM_TO_KEY = {"eval_path": "eval", "int4_algos": "int4_algo", "embedding_precisions": "embedding_precision"}
_NOT_IN_FILE = {"config_file"}
PATH_KEYS = ("model", "calib", "eval", "tokenizer", "out", "target")
HEADER = ("# edgeq build configuration: `edgeq build --config edgeq.toml` replays it; options given on the\n"
          "# command line override it. Paths are relative to this file's folder. Written by `edgeq config`.\n")


def read_config_file(source: str | tuple[dict, Path], command: click.Command) -> dict[str, Any]:
    """{parameter name: value} from an edgeq.toml path (or already-parsed options and their base
    folder), each value checked and converted by the build option's own type."""
    if isinstance(source, tuple):
        data, base, label = source[0], source[1], "the build's options"
    else:
        path = Path(source).expanduser()
        label = str(source)
        if not path.is_file():
            raise EdgeqError(f"config file not found: {source}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise EdgeqError(f"{label}: not valid TOML ({' '.join(str(e).split())})") from None
        except OSError as e:
            raise EdgeqError(f"{label}: cannot read it ({e.strerror})") from None
        base = path.resolve().parent
    params = {p.name: p for p in command.params if p.name not in _NOT_IN_FILE}
    known = sorted(_PARAM_TO_KEY.get(n, n) for n in params if n in _build_params(command))
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _KEY_TO_PARAM.get(key, key)
        if name not in params or name not in _build_params(command):
            hint = " (options belong at the top level, not in a [table])" if isinstance(value, dict) else ""
            raise EdgeqError(f"{label}: unknown key '{key}'{hint} (known: {', '.join(known)})")
        out[name] = _convert(label, key, value, params[name], base)
    return out


def _build_params(command: click.Command) -> set[str]:
    names = set()
    for deco in BUILD_OPTIONS:  # the decorators carry the parameter they add
        probe = deco(lambda: None)
        names.update(p.name for p in getattr(probe, "__click_params__", []))
    return names - _NOT_IN_FILE


def _convert(label: str, key: str, value: Any, param: click.Parameter, base: Path) -> Any:
    def bad(why: str) -> EdgeqError:
        return EdgeqError(f"{label}: key '{key}': {why}")

    if isinstance(param, click.Option) and param.is_flag:
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {_show(value)}")
        return value
    if key == "input_shape" and isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad(f"expected a list of integers, got {_show(value)}")
        value = ",".join(str(v) for v in value)
    if param.multiple:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad(f"expected a list of strings, got {_show(value)}")
        return tuple(values)
    if isinstance(value, (dict, list, bool)) or not isinstance(value, (str, int, float)):
        raise bad(f"expected a {param.type.name}, got {_show(value)}")
    try:
        value = param.type.convert(value, param, None)
    except click.BadParameter as e:
        raise bad(" ".join(e.format_message().split())) from None
    if key in PATH_KEYS and isinstance(value, str):
        value = _from_base(key, value, base)
    return value


def _from_base(key: str, value: str, base: Path) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if key == "model" and intake.MODULE_RE.fullmatch(value) and not (base / p).exists():
        return value  # package.module:factory
    if key == "target" and not value.endswith(".toml"):
        return value  # a profile name
    return str(base / p)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_toml(options: dict[str, Any], base: Path) -> str:
    """The resolved options as edgeq.toml text: unset options left out (the default model and data
    are the bundled ones), paths relative to `base` where they are inside it."""
    import tomli_w

    doc = {}
    for name, value in options.items():
        if value is None:
            continue
        key = _PARAM_TO_KEY.get(name, name)
        if key in PATH_KEYS and isinstance(value, str) and Path(value).is_absolute():
            value = _relative(Path(value), base)
        doc[key] = value
    return HEADER + tomli_w.dumps(doc)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix() or "."
    except ValueError:
        return str(path)


def options_from_build(build_dir: Path) -> tuple[dict, Path]:
    """The options a finished build used, for `edgeq config --from-build`."""
    manifest = load_manifest(build_dir)
    options = (manifest.get("config") or {}).get("options")
    if not isinstance(options, dict):
        raise EdgeqError(f"{build_dir}: its manifest has no recorded options (built by an older edgeq)")
    data = {_PARAM_TO_KEY.get(k, k): v for k, v in options.items() if v is not None}
    return data, Path(os.sep)
