"""Shared types of the pipeline: the build context, the typed results stages hand on, the manifest,
artifacts and errors.

Stages never import each other (tests/test_layout.py checks it); everything they share lives here.
A stage reads what earlier stages wrote into the build directory (file names in `Files`) and the
typed results on the context (`ModelFacts`, `CalibrationResult`), and returns a `StageResult` that
the build records in the manifest.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

MANIFEST_SCHEMA = "edgeq.manifest/1"


class Interrupted(BaseException):
    """Raised by the CLI's SIGINT/SIGTERM handlers. Not KeyboardInterrupt: click would print a blank
    line for that; a BaseException still unwinds every `finally`."""


class EdgeqError(Exception):
    """An error the user can cause and fix (bad path, corrupt file, unknown target...).

    The CLI prints its message as one line on stderr and exits with `exit_code`, never a traceback.
    """

    exit_code = 2


class Files:
    """Names of the files stages exchange inside a build directory."""

    EXPORT_DIR = "work/export"
    EXPORTED = "work/export/model.onnx"
    FUSED = "work/model.fused.onnx"
    FP32 = "model.fp32.onnx"
    QAT_FP32 = "work/model.qat-fp32.onnx"  # the fp32 graph with --mode qat's fine-tuned weights
    QAT_RANGES = "calibration/ranges-qat.json"  # the calibration cache with --mode qat's learnt ranges
    GIVEN_QDQ = "work/export/model.given-qdq.onnx"  # a Q/DQ model as the user gave it (EXPORTED: its float reference)
    CALIB_DIR = "calibration"
    LM_ABSMAX = "calibration/absmax.npz"  # a causal LM's SmoothQuant statistics (it has no ranges)
    TOKENIZER_DIR = "tokenizer"
    MODEL_CONFIG = "config.json"
    BENCH_INPUTS = "work/bench_inputs.npz"
    MANIFEST = "manifest.json"

    @staticmethod
    def ranges(method: str) -> str:
        return f"calibration/ranges-{method}.json"

    @staticmethod
    def input_means(method: str) -> str:
        """Per-channel input means of Conv/Gemm nodes, for bias correction, beside the ranges."""
        return f"calibration/ranges-{method}.means.npz"

    @staticmethod
    def absmax(method: str) -> str:
        """Per-channel |max| of the inputs SmoothQuant smooths, keyed by node, beside the ranges."""
        return f"calibration/ranges-{method}.absmax.npz"

    @staticmethod
    def model(name: str) -> str:
        return f"model.{name}.onnx"


@dataclass
class Artifact:
    """One model file the build ships, with the recipe that made it and its measured metrics."""

    name: str  # "fp32", "int8-static", "int8-dynamic"
    path: str  # relative to the build directory
    precision: str  # "fp32", "int8"
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # other encodings of the same model: {"ort": "model.x.ort"}


@dataclass
class StageResult:
    settings: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


@dataclass
class ModelFacts:
    """What the export and optimize stages learn about the model, for every stage after them."""

    task: str | None = None  # "feature-extraction", "text-classification", "image-classification", ...
    hf_config: dict[str, Any] = field(default_factory=dict)  # the model's config.json ({} when none)
    preprocess: dict[str, Any] | None = None  # an image model's preprocessing (calib.images)
    input_names: list[str] = field(default_factory=list)  # of the fp32 artifact (optimize)
    input_specs: dict[str, dict] = field(default_factory=dict)  # {name: {"dtype", "rank"}}
    output_names: list[str] = field(default_factory=list)
    primary_output: str | None = None  # the output evaluation compares (pipeline/ops/outputs.py); None: the first


@dataclass
class CalibrationResult:
    """What the calibrate stage measured, and for what. The quantize and precision stages follow it
    rather than re-deciding: what it smoothed is what they smooth."""

    method: str | None = None  # minmax, entropy, ...; None when no activation ranges were measured (LMs)
    ranges_path: Path | None = None  # ORT's calibration cache format
    means_path: Path | None = None  # per-channel input means (bias correction); None when off
    absmax_path: Path | None = None  # per-channel |max| for SmoothQuant; None when nothing is smoothed
    static_smoothed: list[str] = field(default_factory=list)  # nodes static int8 smooths (ranges measured smoothed)


@dataclass
class BuildContext:
    """Everything a stage may read. Built once by `edgeq.build` from the resolved config."""

    config: Any  # edgeq.config.BuildConfig: fully resolved and validated
    target: Any  # edgeq.targets.Target
    build_dir: Path  # where stages write (a staging directory until the build completes)
    artifacts: list[Artifact] = field(default_factory=list)
    model: ModelFacts = field(default_factory=ModelFacts)
    tokenizer: Any = None  # the model's tokenizer (export); None for image models and tokenizer-less .onnx
    calibration: CalibrationResult | None = None  # None when the calibrate stage did not run
    files: list[dict] = field(default_factory=list)  # every file of the build with sha256 and size (package)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)
    progress: bool = False

    @property
    def model_name(self) -> str:
        return self.config.name

    @property
    def model_kind(self) -> str:  # "hf", "onnx", "gguf" or "module"
        return self.config.model_kind

    @property
    def model_path(self) -> Path:
        return Path(self.config.model)

    @property
    def family(self) -> str:  # "encoder", "causal-lm" or "vision"
        return self.config.family

    @property
    def static(self):
        """The target's static int8 recipe for this model's family (image models have their own)."""
        return self.target.static_for(self.config.family)

    @property
    def smoothing(self):
        """What this build smooths (targets.Smoothing): decided once, from the target and the modes."""
        return self.target.smoothing(self.config.family, self.config.modes)

    def track(self, items, total: int, label: str):
        """Yield `items`, drawing a one-line progress counter on a terminal (nothing otherwise)."""
        if not self.progress or total <= 1:
            yield from items
            return
        for i, item in enumerate(items, 1):
            sys.stderr.write(f"\r  {label} {i}/{total}")
            sys.stderr.flush()
            yield item
        sys.stderr.write("\r" + " " * (len(label) + 2 * len(str(total)) + 4) + "\r")
        sys.stderr.flush()

    def path(self, rel: str) -> Path:
        return self.build_dir / rel

    def artifact(self, name: str) -> Artifact:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise KeyError(name)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensors(graph) -> Iterator:
    """Every TensorProto of a graph or function that may hold data: initializers, sparse
    initializers (values and indices), tensor attributes, and the same in every subgraph."""
    yield from getattr(graph, "initializer", ())
    for sp in getattr(graph, "sparse_initializer", ()):
        yield from (sp.values, sp.indices)
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (sp.values, sp.indices)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def model_tensors(proto) -> Iterator:
    """Every tensor of a model that may hold data (its graph's, and its functions')."""
    yield from _tensors(proto.graph)
    for f in proto.functions:
        yield from _tensors(f)


def external_location(root: Path, location: str) -> tuple[Path | None, str | None]:
    """(the resolved file, None) for an external-data location that names a path inside `root` (a
    resolved folder), else (None, why not): absolute, drive-letter, '..' or NUL in it, unresolvable,
    or a symlink out."""
    if (not location or location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location) or "\0" in location
            or ".." in re.split(r"[\\/]", location)):
        return None, "is outside the model's folder (only relative paths inside it are read)"
    try:
        real = (root / location).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a bad name
        return None, "cannot be resolved"
    if not real.is_relative_to(root):
        return None, f"is outside the model's folder (a symlink to {real})"
    return real, None


def onnx_files(model_path: Path) -> list[Path]:
    """The .onnx file and the external-data files it references (each once; they may not exist).

    Never a path outside the model's folder: callers size and copy these files, so a location that
    `external_location` refuses is a user error. (pipeline.export.check_onnx checks a user's model
    fully, before anything reads it.)"""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    root = model_path.parent.resolve()
    files, seen = [model_path], set()
    for tensor in model_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location in seen:
            continue
        seen.add(location)
        _, problem = external_location(root, location)
        if problem:
            raise EdgeqError(f"{model_path}: external data location {location!r} {problem}")
        files.append(model_path.parent / location)
    return files


def model_size_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in onnx_files(model_path) if p.exists())


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def json_text(obj: Any, **kw) -> str:
    """Strict JSON: NaN and infinities (a timing with no sample, a ratio of nothing) become null,
    which every JSON reader parses (bare NaN is not JSON)."""
    return json.dumps(_finite(obj), allow_nan=False, default=_json_default, **kw)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    try:
        import numpy as np

        if isinstance(obj, np.floating):
            return _finite(float(obj))
        if isinstance(obj, np.ndarray):
            return _finite(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return obj


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("edgeq", "onnx", "onnxruntime", "optimum", "optimum-onnx", "torch", "transformers",
                 "tokenizers", "numpy", "click"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; empty where there is none. ARM Linux
    names the flags "Features"."""
    model, flags = "", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")) and flags is None:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags or set()


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo has none)."""
    return _cpuinfo()[1]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count()}
    if os.path.exists("/proc/cpuinfo"):
        model, flags = _cpuinfo()
        info["cpu"] = model
        info["cpu_features"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c"})
    return info


def artifact_dict(a: Artifact) -> dict[str, Any]:
    return asdict(a)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, manifest.json), as a user error if not."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeqError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# What differs between two builds of the same inputs and config: timestamps, timings, the machine
# and anything measured with a clock. The manifest keeps these in its "run" section, so that the rest
# (and the published bundle, which leaves "run" out) is byte-identical from build to build.
_VOLATILE_KEYS = frozenset({
    "created_utc", "build_seconds", "build_dir", "machine", "host_machine", "seconds", "reused", "benchmark",
    "execution_providers", "primary_provider", "throughput_per_s", "peak_rss_mb", "speedup_vs_fp32",
    "ep_coverage", "notes", "gates", "parity", "remote_benchmarks", "resumed", "cache", "op_profile",
})
_VOLATILE_SUFFIXES = ("_ms", "_per_s", "_seconds")
_LIST_IDS = ("name", "stage", "step", "node")
_INPUT_SECTIONS = ("config", "target", "versions", "tool", "schema")


def _volatile(key: str) -> bool:
    return key in _VOLATILE_KEYS or key.endswith(_VOLATILE_SUFFIXES) or key.startswith("latency")


def split_volatile(obj: Any) -> tuple[Any, Any]:
    """(stable part, volatile part) of a manifest subtree. The volatile part mirrors the structure
    (lists of records are keyed by their name/stage/step, else their index) and holds only the
    volatile keys; `merge_volatile` puts them back."""
    if isinstance(obj, dict):
        stable, vol = {}, {}
        for k, v in obj.items():
            if _volatile(k):
                vol[k] = v
                continue
            stable[k], sub = split_volatile(v)
            if sub:
                vol[k] = sub
        return stable, vol
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        stable, vol = [], {}
        for i, x in enumerate(obj):
            st, sub = split_volatile(x)
            stable.append(st)
            if sub:
                vol[_list_id(x, i)] = sub
        return stable, vol
    return obj, None


def _list_id(record: dict, index: int) -> str:
    for k in _LIST_IDS:
        if isinstance(record.get(k), (str, int)) and not isinstance(record.get(k), bool):
            return f"{k}={record[k]}"
    return f"#{index}"


def merge_volatile(stable: Any, vol: Any) -> Any:
    if not vol:
        return stable
    if isinstance(stable, dict) and isinstance(vol, dict):
        out = dict(stable)
        for k, v in vol.items():
            out[k] = merge_volatile(out[k], v) if k in out and not _volatile(k) else v
        return out
    if isinstance(stable, list) and isinstance(vol, dict):
        return [merge_volatile(x, vol.get(_list_id(x, i))) if isinstance(x, dict) else x
                for i, x in enumerate(stable)]
    return stable


def manifest_for_disk(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as written: the stable content first, the volatile values under "run"."""
    merged = merge_volatile({k: v for k, v in manifest.items() if k != "run"}, manifest.get("run"))
    # the build's inputs are stable by definition (the config's benchmark settings are not timings)
    stable, vol = split_volatile({k: v for k, v in merged.items() if k not in _INPUT_SECTIONS})
    return {k: merged[k] if k in _INPUT_SECTIONS else stable[k] for k in merged
            if k in _INPUT_SECTIONS or k in stable} | {"run": vol or {}}


def stable_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What two builds of the same inputs and config agree on, byte for byte (the published manifest)."""
    return {k: v for k, v in manifest_for_disk(manifest).items() if k != "run"}


def write_manifest(build_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(build_dir) / Files.MANIFEST, manifest_for_disk(manifest))


def load_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest of a complete build directory, as a user error when there is none."""
    path = Path(build_dir) / Files.MANIFEST
    if not Path(build_dir).is_dir():
        raise EdgeqError(f"artifact directory not found: {build_dir}")
    if not path.is_file():
        raise EdgeqError(f"{build_dir} is not a complete edgeq build (no {Files.MANIFEST})")
    manifest = read_json_object(path)
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise EdgeqError(f"{path}: not an edgeq manifest (schema {MANIFEST_SCHEMA} expected)")
    run = manifest.pop("run", None)
    if run is not None and not isinstance(run, dict):
        raise EdgeqError(f"{path}: not an edgeq manifest (its run section is not an object)")
    problem = _manifest_problem(manifest)
    if problem:
        raise EdgeqError(f"{path}: not an edgeq manifest ({problem})")
    try:  # the in-memory view: volatile values back in place (readers see one record per artifact)
        return merge_volatile(manifest, run)
    except (KeyError, TypeError, AttributeError):
        raise EdgeqError(f"{path}: not an edgeq manifest (its run section does not match the rest)") from None


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the shape of manifest `m` that inspect, report, publish, generate and
    bench read (None: nothing). A hand-edited or truncated-and-patched manifest is refused here in
    one line, not met as a KeyError deep inside a command."""
    for key in ("tool", "model", "target", "config"):
        if not isinstance(m.get(key), dict):
            return f"its {key} section is missing or not an object"
    for key, ids in (("stages", ("stage",)), ("artifacts", ("name", "path")), ("files", ("path", "sha256"))):
        items = m.get(key)
        if not isinstance(items, list) or (key != "stages" and not items):
            return f"its {key} section is missing or not a list"
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k) for k in ids):
                return f"{key}[{i}] is not an object with {' and '.join(ids)}"
            if "path" in ids and not _inside(item["path"]):
                return f"{key}[{i}] has path {item['path']!r} outside the build"
            for sub in ("metrics", "settings", "recipe", "formats"):
                if sub in item and not isinstance(item[sub], dict):
                    return f"{key}[{i}].{sub} is not an object"
        if key == "files" and not all(isinstance(f.get("size_bytes"), int) for f in items):
            return "a files entry has no size_bytes"
    return None


def _inside(rel: str) -> bool:
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def update_manifest(build_dir: Path, section: str, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """Record the result of a post-build command (parity, remote benchmark...) in the manifest:
    manifest[section][key] = record, written atomically. Returns the updated manifest."""
    manifest = load_manifest(build_dir)
    manifest.setdefault(section, {})[key] = record
    write_manifest(build_dir, manifest)
    return manifest


def last_json_line(stdout: str) -> dict | None:
    """The last line of a runner's output that is a JSON object (other lines, e.g. from a login
    script or a library, may come first)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def run_json(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run a runner script (bench_runner.py, parity_runner.py, natively or under an emulator):
    its JSON result, or {"error": ...} saying why there is none."""
    import subprocess

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    out = last_json_line(proc.stdout)
    if out is not None:
        return out
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited {proc.returncode}"
    return {"error": f"runner {how}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}
