"""`edgeq build`: run the stages of the registry (edgeq.pipeline.STAGES) in order on a resolved
BuildConfig, under a lock, and hand the finished build directory over atomically.

Stages write into a staging directory beside the final one; only a build that finished every stage
and wrote its manifest replaces `artifacts/<model>/<target>/`. A failed or interrupted build leaves
the previous complete build (if any) untouched and nothing that looks complete (edgeq.checkpoint
resumes it). Calibration ranges are cached beside the builds (`<out>/<model>/.cache/`) and reused
while model, data and calibration settings match.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgeq import __version__, checkpoint
from edgeq.core import (
    MANIFEST_SCHEMA, BuildContext, EdgeqError, Files, Interrupted, StageResult, artifact_dict, library_versions, machine_info,
    write_manifest,
)
from edgeq.gates import check_gates

_HOST = "".join(c if c.isalnum() else "_" for c in platform.node())[:40] or "host"


def build(config, log: Callable[[str], None] | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run every stage; return the manifest (also written to <build dir>/manifest.json).

    Stages write into `<out>/<model>/.<target>.partial/`, under a lock that keeps a second build out of
    it. After each stage a checkpoint records the build's input key (config, target profile, library
    versions, model and data fingerprints), the stage's results and the files it left. A build that
    is interrupted or fails keeps its partial directory (which never looks complete: no manifest, a
    hidden name) once a stage has finished; the next build with the same inputs resumes after the
    last stage whose checkpoint and files are intact. Only a finished build replaces
    `<out>/<model>/<target>/`, in one rename.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    final = Path(config.out) / config.name / config.target
    partial = final.parent / f".{final.name}.partial"
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with build_lock(final):
            _recover_handover(final)
            _remove_abandoned(final)
            return _build_locked(config, final, partial, log, fresh)
    finally:
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # only when empty: a first build that failed early leaves nothing


def _build_locked(config, final: Path, partial: Path, log, fresh: bool) -> dict[str, Any]:
    from edgeq import targets
    from edgeq.pipeline import STAGES

    profile = targets.load(config.target_profile)
    key = checkpoint.build_key(config, profile)
    checkpoints = [] if fresh else checkpoint.resume_point(partial, key)
    if not checkpoints and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(config=config, target=profile, build_dir=partial, log=log, progress=sys.stderr.isatty())
    records = []
    if checkpoints:
        checkpoint.restore(ctx, checkpoints[-1])
        records = list(checkpoints[-1]["records"])
        log(f"resuming the interrupted build in {partial.name}: {', '.join(r['stage'] for r in records if 'seconds' in r)}"
            " done")
    started = dt.datetime.now(dt.timezone.utc)
    t_build = time.perf_counter()
    try:
        # Library code prints progress to stdout; stdout belongs to `--json`.
        with contextlib.redirect_stdout(sys.stderr):
            for i, stage in enumerate(STAGES, 1):
                if i <= len(records):
                    if "seconds" in records[i - 1]:
                        log(f"[{i}/{len(STAGES)}] {stage.name}: done before the interruption (resumed)")
                        records[i - 1] = {**records[i - 1], "resumed": True}
                    continue
                if not stage.needed(ctx):
                    records.append({"stage": stage.name, "skipped": f"not needed for modes {list(config.modes)}"})
                    continue
                log(f"[{i}/{len(STAGES)}] {stage.name} ...")
                t0 = time.perf_counter()
                result: StageResult = stage.run(ctx)
                secs = time.perf_counter() - t0
                records.append({"stage": stage.name, "seconds": round(secs, 3), "reused": result.reused,
                                "settings": result.settings, "outputs": result.outputs, "metrics": result.metrics})
                if stage.name != "package":
                    checkpoint.save(ctx, key, i, records)
                log(f"[{i}/{len(STAGES)}] {stage.name} done in {secs:.1f}s" + (" (reused)" if result.reused else ""))
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "tool": {"name": "edgeq", "version": __version__},
            "created_utc": started.isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t_build, 3),
            "model": {"name": config.name, "source": config.model, "kind": config.model_kind,
                      "task": ctx.model.task, "inputs": ctx.model.input_names or None,
                      "outputs": ctx.model.output_names or None,
                      **({"evaluated_output": ctx.model.primary_output} if ctx.model.primary_output else {})},
            "target": ctx.target.to_dict(),
            "config": config.to_dict(),
            "versions": library_versions(),
            "machine": machine_info(),
            "inputs_sha256": key,
            "stages": records,
            "artifacts": [artifact_dict(a) for a in ctx.artifacts],
            "files": ctx.files,
        }
        gates = check_gates(config, manifest["artifacts"])
        if gates is not None:
            manifest["gates"] = gates
        shutil.rmtree(partial / checkpoint.CHECKPOINTS, ignore_errors=True)
        write_manifest(partial, manifest)
        _publish(partial, final)
    except BaseException as e:
        if not (partial / checkpoint.CHECKPOINTS).is_dir():  # nothing finished: nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        elif isinstance(e, (KeyboardInterrupt, Interrupted)):
            log(f"interrupted: the finished stages are kept in {partial}; the same build resumes from them")
        raise
    manifest["build_dir"] = str(final)
    return manifest


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


def _recover_handover(final: Path) -> None:
    """A build killed between the two renames of its hand-over (`_publish`) leaves no build at
    `final`: its finished build is still the partial directory (complete: a manifest, no
    checkpoints) and the previous one sits under an .old name. Put the finished one in place, or
    else the previous one back, so that a kill never leaves neither."""
    if final.exists():
        return
    partial = final.parent / f".{final.name}.partial"
    if (partial / Files.MANIFEST).is_file() and not (partial / checkpoint.CHECKPOINTS).exists():
        os.replace(partial, final)
        return
    olds = sorted(p for p in final.parent.glob(f".{final.name}.old-{_HOST}-*")
                  if p.name.rsplit("-", 1)[-1].isdigit() and not _alive(int(p.name.rsplit("-", 1)[-1]))
                  and (p / Files.MANIFEST).is_file())
    if olds:
        os.replace(olds[-1], final)


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
