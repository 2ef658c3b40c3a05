"""Checkpoint and resume: after each stage the build records its input key, the stage records, the
typed results on the context and the files it left; an interrupted build with the same key resumes
after the last stage whose checkpoint and files are intact.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeq import __version__
from edgeq.core import (
    Artifact, BuildContext, CalibrationResult, Files, ModelFacts, artifact_dict, atomic_write_json, library_versions,
    onnx_files, sha256_file, sha256_json,
)

CHECKPOINTS = ".checkpoints"


def build_key(config, profile) -> str:
    """What a build's results depend on: the resolved config (less where it writes), the target
    profile, the tool's and libraries' versions, and the bytes of the model and of the data."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("out", "options")}
    inputs = {"model": fingerprint(config.model, config.model_kind),
              "calibration": fingerprint(config.calibration.path),
              "evaluation": fingerprint(config.evaluation.path)}
    if config.tokenizer:
        inputs["tokenizer"] = fingerprint(config.tokenizer)
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


def save(ctx: BuildContext, key: str, index: int, records: list[dict]) -> None:
    """The checkpoint after stage `index`: the stage records so far, the typed results on the
    context, the artifacts and every file's size and mtime. The tokenizer is an object: only whether
    there was one is saved (restore loads it from the build's tokenizer/ folder)."""
    state = {"model": asdict(ctx.model), "calibration": asdict(ctx.calibration) if ctx.calibration else None,
             "files": ctx.files, "tokenizer": ctx.tokenizer is not None}
    record = {"key": key, "index": index, "records": records, "state": json.loads(json.dumps(state, default=str)),
              "artifacts": [artifact_dict(a) for a in ctx.artifacts], "files": _snapshot(ctx.build_dir)}
    atomic_write_json(ctx.build_dir / CHECKPOINTS / f"{index:02d}.json", record)


def resume_point(partial: Path, key: str) -> list[dict]:
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
        if (not isinstance(cp, dict) or cp.get("key") != key or not isinstance(cp.get("files"), dict)
                or not isinstance(cp.get("state"), dict)):  # an older edgeq's checkpoint: start over
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


def restore(ctx: BuildContext, cp: dict) -> None:
    """The context as the checkpoint `cp` left it."""
    state = cp["state"]
    ctx.model = ModelFacts(**state["model"])
    cal = state["calibration"]
    ctx.calibration = None if cal is None else CalibrationResult(
        **{k: Path(v) if k.endswith("_path") and v is not None else v for k, v in cal.items()})
    ctx.files = state["files"]
    ctx.artifacts[:] = [Artifact(**a) for a in cp["artifacts"]]
    ctx.tokenizer = None
    if state["tokenizer"]:
        from transformers import AutoTokenizer

        ctx.tokenizer = AutoTokenizer.from_pretrained(str(ctx.path(Files.TOKENIZER_DIR)), local_files_only=True)
