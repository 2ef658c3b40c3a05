"""`edgeq publish` and `edgeq verify`: a build directory becomes a versioned, reproducible bundle.

A bundle is one folder, `<model>-<target>-<version>/`, holding what an app ships (the artifacts in
every format, tokenizer, operator config, preprocessing), `manifest.json` (the build's stable
manifest: everything but its "run" section of timings, timestamps and machine facts), `README.md`
and `SHA256SUMS` (sha256sum's format, covering every other file). Written as a folder or as a
.tar.gz/.tgz/.tar whose bytes depend only on the files: entries sorted, fixed owner, modes and
mtime (SOURCE_DATE_EPOCH, else 0), a gzip header without name or time. So two builds of the same
inputs and config publish byte-identical bundles. The default version is the first 12 hex digits of
the stable manifest's sha256: a content address.

Every path is checked on the way in (a manifest entry, symlink or external-data reference can't
reach outside the build directory) and on the way out (`verify` reads a tarball without extracting
it and refuses absolute names, `..`, links and anything SHA256SUMS doesn't account for).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from edgeq.core import EdgeqError, Files, json_text, load_manifest, sha256_file, stable_manifest

EXIT_VERIFY_FAILED = 3
NOT_SHIPPED = ("work/", "calibration/")  # intermediates and calibration ranges stay in the build dir
SUMS = "SHA256SUMS"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def safe_relpath(rel: Any, root: Path, what: str) -> Path:
    """root/rel, as a user error unless rel is a plain relative path that stays inside root, symlinks
    resolved."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise EdgeqError(f"{what}: bad path {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", "") for part in rel.split("/")):
        raise EdgeqError(f"{what}: path {rel!r} leaves its directory")
    full = root / pure
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if not inside:
        raise EdgeqError(f"{what}: path {rel!r} leads outside {root} (a symlink?)")
    return full


def bundle_files(build_dir: Path, manifest: dict[str, Any]) -> list[tuple[str, Path, str]]:
    """(name in the bundle, file, sha256) of what ships, each checked against the manifest."""
    out = []
    for rec in manifest.get("files") or []:
        if not isinstance(rec, dict):
            raise EdgeqError(f"{build_dir}: manifest files entry is not an object")
        rel = rec.get("path")
        full = safe_relpath(rel, build_dir, f"{build_dir / Files.MANIFEST}")
        if rel.startswith(NOT_SHIPPED) or rel == Files.MANIFEST:
            continue
        if not full.is_file() or full.is_symlink():
            raise EdgeqError(f"{build_dir}: {rel} is listed in the manifest but is not a regular file there")
        digest = sha256_file(full)
        if digest != rec.get("sha256"):
            raise EdgeqError(f"{build_dir}: {rel} does not match its manifest checksum (changed after the build)")
        out.append((rel, full, digest))
    if not any(rel.endswith(".onnx") for rel, _, _ in out):
        raise EdgeqError(f"{build_dir}: no model files to publish")
    return sorted(out)


def publish(build_dir: Path, to: Path, version: str | None = None) -> dict[str, Any]:
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    stable = stable_manifest(manifest)
    manifest_bytes = (json_text(stable, indent=2) + "\n").encode()
    version = version or hashlib.sha256(manifest_bytes).hexdigest()[:12]
    if not _VERSION_RE.fullmatch(version):
        raise EdgeqError(f"--version {version!r}: use letters, digits, '.', '_', '+', '-' (at most 64)")
    name = f"{manifest['model']['name']}-{manifest['target']['name']}-{version}"
    if not _VERSION_RE.fullmatch(name[:64]) or "/" in name:
        raise EdgeqError(f"bundle name {name!r} is not a safe file name")
    files = bundle_files(build_dir, manifest)
    shipped = {rel for rel, _, _ in files}
    extra: dict[str, bytes] = {"manifest.json": manifest_bytes}
    if "README.md" not in shipped:
        extra["README.md"] = bundle_readme(stable, version).encode()
    entries: list[tuple[str, Path | bytes]] = [(rel, p) for rel, p, _ in files] + sorted(extra.items())
    sums = {rel: d for rel, _, d in files} | {k: hashlib.sha256(v).hexdigest() for k, v in extra.items()}
    sums_text = "".join(f"{sums[k]}  {k}\n" for k in sorted(sums))
    entries.append((SUMS, sums_text.encode()))
    entries.sort(key=lambda e: e[0])
    to = Path(to).expanduser()
    if str(to).endswith(TAR_SUFFIXES):
        _write_tar(to, name, entries)
        out = to
    else:
        if to.exists() and not to.is_dir():
            raise EdgeqError(f"--to {to} exists and is not a directory (name a .tar.gz to write a tarball)")
        out = to / name
        _write_dir(out, entries)
    return {"bundle": str(out), "name": name, "version": version, "files": len(entries),
            "sha256": sha256_file(out) if out.is_file() else hashlib.sha256(sums_text.encode()).hexdigest(),
            "sha256_of": "the tarball" if out.is_file() else SUMS}


def _write_dir(out: Path, entries) -> None:
    """Into a temp folder beside `out`, then one rename: a reader sees the whole bundle or none."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for rel, src in entries:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path):
                shutil.copyfile(src, dst)
            else:
                dst.write_bytes(src)
            os.chmod(dst, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tar(out: Path, top: str, entries) -> None:
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) if not str(out).endswith(".tar") else None
            with tarfile.open(fileobj=gz or raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                dirs = sorted({top} | {f"{top}/{p}" for rel, _ in entries for p in _parents(rel)})
                for d in dirs:
                    tar.addfile(_info(d, tarfile.DIRTYPE, 0, 0o755, mtime))
                for rel, src in entries:
                    data = src.read_bytes() if isinstance(src, Path) else src
                    tar.addfile(_info(f"{top}/{rel}", tarfile.REGTYPE, len(data), 0o644, mtime), io.BytesIO(data))
            if gz is not None:
                gz.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _info(name: str, kind: bytes, size: int, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def bundle_readme(manifest: dict[str, Any], version: str) -> str:
    """The bundle's README when the build has no artifact README of its own (non-mobile targets)."""
    model, target = manifest["model"], manifest["target"]
    lines = [f"# {model['name']} for {target['name']} (edgeq bundle {version})", "",
             f"Built by edgeq {manifest['tool']['version']} with onnxruntime "
             f"{manifest.get('versions', {}).get('onnxruntime', '?')}. Inputs: "
             f"{', '.join(model.get('inputs') or []) or '-'}; outputs: {', '.join(model.get('outputs') or []) or '-'}.",
             "", "| artifact | file | precision | size MB | cosine vs fp32 | task metric |", "|---|---|---|---|---|---|"]
    for a in manifest["artifacts"]:
        m = a.get("metrics", {})
        task = m.get("task") or {}
        lines.append(f"| {a['name']} | {a['path']} | {a['precision']} | "
                     f"{m.get('size_bytes', 0) / 1e6:.1f} | {_num(m.get('cosine'))} | "
                     f"{task.get('metric', '')} {_num(task.get('value'))} |")
    lines += ["", "Latency and other timings are measured per machine; they are in the build directory's",
              "manifest (its `run` section) and `edgeq report`, not in this bundle, whose bytes depend only",
              "on the build's inputs.", "", f"Check the files with `sha256sum -c {SUMS}` or `edgeq verify`.", ""]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def verify(bundle: Path) -> dict[str, Any]:
    """Check a bundle (folder or tarball) against its SHA256SUMS without extracting anything.
    Returns {"ok": bool, "problems": [...], ...}; an unreadable or unsafe bundle is a user error."""
    bundle = Path(bundle).expanduser()
    if not bundle.exists():
        raise EdgeqError(f"bundle not found: {bundle}")
    files = _tar_members(bundle) if bundle.is_file() else _dir_members(bundle)
    if SUMS not in files:
        raise EdgeqError(f"{bundle}: not an edgeq bundle (no {SUMS})")
    listed = {}
    sums_text = files[SUMS].read()[:1 << 24].decode("utf-8", errors="replace")  # a listing, not data: 16 MB is plenty
    for n, line in enumerate(sums_text.splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise EdgeqError(f"{bundle}: {SUMS} line {n} is not '<sha256>  <path>'")
        rel = m.group(2)
        if PurePosixPath(rel).is_absolute() or ".." in rel.split("/"):
            raise EdgeqError(f"{bundle}: {SUMS} names {rel!r}, which leaves the bundle")
        if rel in listed:
            raise EdgeqError(f"{bundle}: {SUMS} lists {rel!r} twice (line {n})")
        listed[rel] = m.group(1)
    problems = []
    for rel, want in sorted(listed.items()):
        if rel not in files:
            problems.append(f"missing: {rel}")
        elif files[rel].sha256() != want:
            problems.append(f"checksum mismatch: {rel}")
    problems += [f"not in {SUMS}: {rel}" for rel in sorted(set(files) - set(listed) - {SUMS})]
    if "manifest.json" in files and not problems:
        try:
            man = json.loads(files["manifest.json"].read())
            for rec in man.get("files", []):
                rel = rec.get("path", "")
                if rel in listed and listed[rel] != rec.get("sha256"):
                    problems.append(f"manifest and {SUMS} disagree: {rel}")
        except (json.JSONDecodeError, AttributeError, TypeError):
            problems.append("manifest.json is not a valid manifest")
    return {"bundle": str(bundle), "ok": not problems, "files": len(listed), "problems": problems}


_KEPT = 1 << 26  # bytes of SHA256SUMS and manifest.json kept from a tarball's one pass (listings, not data)


class _Member:
    """A bundle file as verify reads it: its sha256 and (for the two listings) its bytes."""

    def __init__(self, sha256: str | None = None, data: bytes | None = None, path: Path | None = None):
        self._sha256, self._data, self._path = sha256, data, path

    def sha256(self) -> str:
        if self._sha256 is None:
            with open(self._path, "rb") as f:
                self._sha256 = _sha256_stream(f)
        return self._sha256

    def read(self) -> bytes:
        if self._data is None:
            with open(self._path, "rb") as f:
                return f.read(_KEPT)
        return self._data


def _tar_members(path: Path) -> dict[str, _Member]:
    """{name below the top folder: member} of a tarball's regular files, read in one streaming
    pass: each file hashed as it goes by, then the compressed stream read to its end (gzip checks
    its CRC and length trailer only there, and tarfile stops before it). Anything that could write
    outside a folder if extracted (absolute names, .., links, devices, setuid) is refused."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    tops, out = set(), {}
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as raw, tarfile.open(fileobj=raw, mode="r|" if gz else "r|*") as tar:
            for m in tar:
                name = m.name
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "\\" in name or not name:
                    raise EdgeqError(f"{path}: entry {name!r} leaves the bundle directory")
                if not (m.isfile() or m.isdir()):
                    raise EdgeqError(f"{path}: entry {name!r} is a link or special file; bundles hold regular files only")
                if m.mode & 0o6000:
                    raise EdgeqError(f"{path}: entry {name!r} is setuid/setgid; bundles hold plain files only")
                tops.add(parts[0])
                if m.isfile():
                    rel = "/".join(parts[1:])
                    if not rel:
                        raise EdgeqError(f"{path}: file {name!r} is outside the bundle folder")
                    f = tar.extractfile(m)
                    if rel in (SUMS, "manifest.json"):
                        data = f.read(_KEPT)
                        out[rel] = _Member(hashlib.sha256(data).hexdigest() if len(data) < _KEPT else None, data)
                    else:
                        out[rel] = _Member(_sha256_stream(f))
            while raw.read(1 << 20):  # to the end of the stream: the gzip trailer is checked there
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise EdgeqError(f"{path}: not a readable tar archive ({' '.join(str(e).split()) or type(e).__name__})") from None
    if len(tops) > 1:
        raise EdgeqError(f"{path}: more than one top-level folder ({', '.join(sorted(tops)[:3])})")
    return out


def _dir_members(path: Path) -> dict[str, Any]:
    """{relative name: member} of a folder's regular files; links, FIFOs, devices, sockets and
    setuid/setgid files are refused (a bundle holds plain files only)."""
    import stat

    out = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        mode = f.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise EdgeqError(f"{path}: {rel} is a symlink; bundles hold regular files only")
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise EdgeqError(f"{path}: {rel} is a FIFO, socket or device; bundles hold regular files only")
        if mode & 0o6000:
            raise EdgeqError(f"{path}: {rel} is setuid/setgid; bundles hold plain files only")
        out[rel] = _Member(path=f)
    return out


def _sha256_stream(f) -> str:
    """sha256 of a member, read in chunks (a bundle's models can be larger than memory allows)."""
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()
