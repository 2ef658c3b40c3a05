"""Stage 7, package: the build directory becomes a self-describing artifact folder.

Records sha256 and size of every file (models, tokenizer, config, calibration ranges, intermediates)
for the manifest, which the build writes last: a directory with a manifest.json is complete.
"""
from __future__ import annotations

from edgeq.core import BuildContext, Files, StageResult, sha256_file


def file_records(ctx: BuildContext) -> list[dict]:
    records = []
    for p in sorted(ctx.build_dir.rglob("*")):
        rel = p.relative_to(ctx.build_dir).as_posix()
        if p.is_file() and rel != Files.MANIFEST and not p.name.startswith("."):
            records.append({"path": rel, "sha256": sha256_file(p), "size_bytes": p.stat().st_size})
    return records


def run(ctx: BuildContext) -> StageResult:
    records = file_records(ctx)
    by_path = {r["path"]: r for r in records}
    for a in ctx.artifacts:
        a.metrics.setdefault("size_bytes", by_path[a.path]["size_bytes"])
    ctx.facts["files"] = records
    total = sum(r["size_bytes"] for r in records)
    shipped = [a.path for a in ctx.artifacts] + [r["path"] for r in records
                                                  if r["path"].startswith(Files.TOKENIZER_DIR + "/")]
    return StageResult(settings={"layout": "artifacts/<model>/<target>/"}, outputs=shipped,
                       metrics={"files": len(records), "total_bytes": total})
