"""Target profiles: one declarative TOML file per device class in this folder.

A profile decides everything that differs between devices: quantization format and types, which ops
are quantized, whether fp16 compute exists, execution providers, opset and packaging. Adding a target
is adding a file; this module only loads and validates them.
"""
from __future__ import annotations

import tomllib
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from importlib import resources
from typing import Any

from edgeq.core import EdgeqError

QUANT_TYPES = {"int8", "uint8"}
MODES = ("static", "dynamic", "fp16", "hybrid", "int4", "nf4", "qat", "qdq")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
PACKAGE_KEYS = {"ort_format": bool, "ort_optimization_style": str, "ort_target_platform": str,
                "reduced_ops": bool, "mobile_readme": bool}
FORMATS = {"QDQ", "QOperator"}
FALLBACKS = ("float", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")


@dataclass(frozen=True)
class StaticRecipe:
    format: str = "QDQ"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    op_types: tuple[str, ...] = ("MatMul",)
    keep_float_after: tuple[str, ...] = ()
    calibration: str = "minmax"
    # b <- b - dW.E[x] for Conv/Gemm biases after quantization (pipeline/ops/bias_correction.py)
    bias_correction: bool = False
    # The first N Conv/Gemm/MatMul nodes (graph order), with the activation each feeds, stay float
    keep_float_first: int = 0
    # What the nodes static int8 leaves out become: "float", or "dynamic" -- int8 with per-inference
    # activation scales, [dynamic]'s recipe (smoothing included) -- for the kept-float nodes and the
    # op types QDQ cannot express (ORT's fused Attention). Only for EPs that run ORT's dynamic
    # int8 kernels (the CPU EP); NPUs and GPU EPs would run them on the CPU.
    fallback: str = "float"
    # SmoothQuant (pipeline/ops/smooth.py) on the statically quantized nodes too, 0 = off: the calibrate
    # stage then measures the smoothed activations' ranges in a second pass.
    smooth_alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("static.format", self.format, FORMATS)
        _check_unit("static.smooth_alpha", self.smooth_alpha)
        _check_choice("static.fallback", self.fallback, FALLBACKS)
        _check_choice("static.activation_type", self.activation_type, QUANT_TYPES)
        _check_choice("static.weight_type", self.weight_type, QUANT_TYPES)
        _check_choice("static.calibration", self.calibration, CALIBRATION_METHODS)
        if not self.op_types:
            raise ValueError("static.op_types must name at least one operator type")
        if self.keep_float_first < 0:
            raise ValueError("static.keep_float_first must be 0 or more")
        if self.activation_symmetric and self.activation_type == "uint8":
            # ORT would put the zero point at 128 and waste half the range of a non-negative tensor
            # while gaining nothing: symmetric activations are for int8 kernels (TensorRT, NPUs).
            raise ValueError("static.activation_symmetric needs activation_type = 'int8'")


@dataclass(frozen=True)
class DynamicRecipe:
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)
    # SmoothQuant's migration strength (pipeline/ops/smooth.py); 0 = off. Needs a calibration pass
    # (per-channel |max| of the smoothed activations), so dynamic builds then calibrate too.
    smooth_alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("dynamic.weight_type", self.weight_type, QUANT_TYPES)
        _check_unit("dynamic.smooth_alpha", self.smooth_alpha)
        if not self.op_types:
            raise ValueError("dynamic.op_types must name at least one operator type")


@dataclass(frozen=True)
class Fp16Recipe:
    keep_io_types: bool = True  # model inputs/outputs stay fp32 unless asked
    # ops left in fp32 (their inputs are cast at the boundary); empty means onnxruntime's default list
    op_block_list: tuple[str, ...] = ()


@dataclass(frozen=True)
class Smoothing:
    """Which int8 nodes a build smooths (pipeline/ops/smooth.py); see Target.smoothing."""

    dynamic: bool  # dynamically quantized nodes, with [dynamic] smooth_alpha
    static: bool  # statically quantized nodes, with the static recipe's smooth_alpha

    @property
    def measured(self) -> bool:
        """Whether the calibrate stage measures the per-channel |max| that smoothing needs."""
        return self.dynamic or self.static


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str  # "x86_64", "aarch64", or "any" (GPU/NPU targets)
    execution_providers: tuple[str, ...]
    fp16_compute: bool
    opset: int
    static: StaticRecipe
    dynamic: DynamicRecipe
    fp16: Fp16Recipe = Fp16Recipe()
    modes: tuple[str, ...] = ("static", "dynamic")
    package: dict[str, Any] = field(default_factory=dict)
    # Static int8 of image models (CNNs): other ops, and often other types, than transformers.
    static_vision: StaticRecipe = field(default_factory=lambda: VISION_DEFAULT)
    # Keep onnxruntime.transformers' fused SkipLayerNormalization, or write it back as Sum +
    # LayerNormalization where ONNX Runtime's CPU kernel for the fused op is the slower one.
    fused_skip_layernorm: bool = True

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            # the name becomes a directory under --out: no separators, no dot-names
            raise ValueError(f"name must be letters, digits, '.', '_' or '-' and not start with '.', got {self.name!r}")
        if not self.execution_providers:
            raise ValueError("execution_providers must list at least one provider")
        # qdq is not a default: it is the given model's own quantization, made when the input has it
        if not self.modes or any(m not in MODES or m == "qdq" for m in self.modes):
            raise ValueError(f"modes must be a non-empty subset of {[m for m in MODES if m != 'qdq']}, got {list(self.modes)}")
        if self.arch not in ("x86_64", "aarch64", "any"):
            raise ValueError(f"arch must be x86_64, aarch64 or any, got {self.arch!r}")
        for k, v in self.package.items():
            if k not in PACKAGE_KEYS or not isinstance(v, PACKAGE_KEYS[k]):
                raise ValueError(f"package.{k}: unknown key or wrong type (known: {sorted(PACKAGE_KEYS)})")
        if self.package.get("ort_optimization_style", "Fixed") not in ("Fixed", "Runtime"):
            raise ValueError("package.ort_optimization_style must be 'Fixed' or 'Runtime'")
        if self.package.get("ort_target_platform", "arm") not in ("arm", "amd64"):
            raise ValueError("package.ort_target_platform must be 'arm' or 'amd64'")
        if not 13 <= self.opset <= 23:
            # per-channel QDQ needs opset 13; the exporters we use stop at 23
            raise ValueError(f"opset must be between 13 and 23, got {self.opset}")

    def static_for(self, family: str | None) -> StaticRecipe:
        """The static int8 recipe for a model family ("vision" or anything else)."""
        return self.static_vision if family == "vision" else self.static

    def smoothing(self, family: str | None, modes) -> "Smoothing":
        """What a build of these modes smooths with SmoothQuant: the dynamic int8 nodes when
        [dynamic] smooth_alpha is on and a dynamic artifact is built, or a static one whose
        fallback is dynamic; the static int8 nodes when [static] smooth_alpha is on. A causal LM
        has only its dynamic artifact to smooth (int4 is weight-only)."""
        modes = set(modes)
        if family == "causal-lm":
            return Smoothing(dynamic=self.dynamic.smooth_alpha > 0 and "dynamic" in modes, static=False)
        static = self.static_for(family)
        return Smoothing(
            dynamic=self.dynamic.smooth_alpha > 0 and (
                "dynamic" in modes or (bool({"static", "qat"} & modes) and static.fallback == "dynamic")),
            static=bool({"static", "qat"} & modes) and static.smooth_alpha > 0)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _check_unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{key} must be within [0, 1], got {value}")


def _check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {sorted(allowed)}, got {value!r}")


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def load(name: str) -> Target:
    """A bundled profile by name, or a user's own profile file (a path ending in .toml)."""
    if name.endswith(".toml"):
        path = Path(name).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeqError(f"cannot read target profile {path}: {getattr(e, 'strerror', None) or e}") from None
        return parse(text, source=str(path))
    if name not in available():
        raise EdgeqError(f"unknown target '{name}' (available: {', '.join(available())}, or a .toml profile file)")
    text = resources.files(__name__).joinpath(f"{name}.toml").read_text()
    return parse(text, source=f"targets/{name}.toml")


# Image models: the convolutions and the activations after them. Clip/Relu must be quantized with
# the Conv: ORT then folds them into the Conv output's quantization range ([0, 6] after ReLU6)
# instead of quantizing the wide pre-activation range (measured in the README, "Quantize the Clip
# (ReLU6) with each convolution").
VISION_OPS = ("Conv", "Gemm", "MatMul", "Clip", "Relu")
# Image models: bias correction, and the first three weighted layers kept float; each step raises
# top-1 agreement with fp32 (measured step by step in the README, "Image models from a PyTorch factory").
# Early layers see the image through few channels (the stem: 27 weights per filter), so each
# weight's rounding error weighs most there, and they cost little to keep (a small share of the
# MACs). Percentile ranges (99.999) then do better than MinMax.
VISION_DEFAULT = StaticRecipe(op_types=VISION_OPS, bias_correction=True, keep_float_first=3,
                              calibration="percentile")
_SCALARS = {"str": str, "bool": bool, "int": int, "float": (int, float)}
_NESTED = {"static": "StaticRecipe", "dynamic": "DynamicRecipe", "fp16": "Fp16Recipe", "package": "dict[str, Any]",
           "static_vision": "StaticRecipe"}


def _checked(cls, table: Any, prefix: str) -> dict[str, Any]:
    """The keyword arguments for `cls` from a TOML table, every key and value type checked (TOML's
    arrays become tuples): a misspelt key or a string where a list belongs is an error."""
    if not isinstance(table, dict):
        raise ValueError(f"[{prefix.rstrip('.')}] must be a table")
    known = {f.name: f.type for f in fields(cls)}
    kw = {}
    for key, value in table.items():
        where = f"{prefix}{key}"
        typ = known.get(key)
        if typ is None or typ in _NESTED.values():
            raise ValueError(f"unknown key '{where}'")
        if typ == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"'{where}' must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, _SCALARS[typ]) or (typ in ("int", "float") and isinstance(value, bool)):
            raise ValueError(f"'{where}' must be a {typ}, got {type(value).__name__} {value!r}")
        kw[key] = float(value) if typ == "float" else value
    return kw


def parse(text: str, source: str = "<profile>") -> Target:
    try:
        raw = tomllib.loads(text)
        sub = {k: raw.pop(k, {}) for k in _NESTED}
        if not isinstance(sub["package"], dict):
            raise ValueError("[package] must be a table")
        top = _checked(Target, raw, "")
        missing = [f.name for f in fields(Target) if f.name not in top and f.name not in _NESTED
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"missing key(s): {', '.join(missing)}")
        static = StaticRecipe(**_checked(StaticRecipe, sub["static"], "static."))
        # [static_vision] defaults to the target's [static] types and format with the image-model ops
        vision = {**asdict(static), "op_types": VISION_OPS, "keep_float_after": (),
                  **{k: getattr(VISION_DEFAULT, k)
                     for k in ("bias_correction", "keep_float_first", "calibration", "fallback", "smooth_alpha")},
                  **_checked(StaticRecipe, sub["static_vision"], "static_vision.")}
        return Target(static=static,
                      static_vision=StaticRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in vision.items()}),
                      dynamic=DynamicRecipe(**_checked(DynamicRecipe, sub["dynamic"], "dynamic.")),
                      fp16=Fp16Recipe(**_checked(Fp16Recipe, sub["fp16"], "fp16.")),
                      package=sub["package"], **top)
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as e:
        raise EdgeqError(f"invalid target profile {source}: {e}") from None
