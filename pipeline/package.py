"""Stage 8, package: the build directory becomes a self-describing artifact folder (with ORT-format
models, the reduced-operator config and an artifact README for mobile targets, see mobile.py).

Records sha256 and size of every file (models, tokenizer, config, calibration ranges, intermediates)
for the manifest, which the build writes last: a directory with a manifest.json is complete.
"""
from __future__ import annotations

from edgeq.core import BuildContext, Files, StageResult, sha256_file


def file_records(ctx: BuildContext) -> list[dict]:
    records = []
    for p in sorted(ctx.build_dir.rglob("*")):
        rel = p.relative_to(ctx.build_dir).as_posix()
        # hidden names (the build's checkpoints, temp files) are bookkeeping, not part of the build
        if p.is_file() and rel != Files.MANIFEST and not any(part.startswith(".") for part in rel.split("/")):
            records.append({"path": rel, "sha256": sha256_file(p), "size_bytes": p.stat().st_size})
    return records


def run(ctx: BuildContext) -> StageResult:
    from edgeq.pipeline import mobile

    pkg = ctx.target.package
    metrics: dict = {}
    if pkg.get("ort_format"):
        metrics["ort"] = mobile.convert_to_ort(ctx)
    if pkg.get("mobile_readme"):
        metrics["readme"] = mobile.write_readme(ctx)
    records = file_records(ctx)
    by_path = {r["path"]: r for r in records}
    for a in ctx.artifacts:
        a.metrics.setdefault("size_bytes", by_path[a.path]["size_bytes"])
    ctx.facts["files"] = records
    total = sum(r["size_bytes"] for r in records)
    shipped = [a.path for a in ctx.artifacts] + [f for a in ctx.artifacts for f in a.formats.values()]
    shipped += [r["path"] for r in records if r["path"].startswith(Files.TOKENIZER_DIR + "/")
                or r["path"] in (mobile.REDUCED_OPS, mobile.ARTIFACT_README)]
    return StageResult(settings={"layout": "artifacts/<model>/<target>/", "ort_format": bool(pkg.get("ort_format")),
                                 "mobile_readme": bool(pkg.get("mobile_readme"))},
                       outputs=shipped, metrics={**metrics, "files": len(records), "total_bytes": total})
