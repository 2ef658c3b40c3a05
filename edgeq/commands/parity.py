"""`edgeq parity`: run a build's artifacts on an emulated aarch64 CPU and compare with this machine.

Why: the artifacts of an ARM target are evaluated and benchmarked on the build host (x86_64), but on
the device ONNX Runtime picks other kernels (NEON / dot-product int8 GEMMs instead of AVX2). Parity
checks that the aarch64 build of ONNX Runtime computes what the host computed, so the fidelity the
build measured holds on the device. It says nothing about speed: emulation is orders of magnitude
slower (see the README).

How: QEMU user-mode emulation (qemu-aarch64 >= 10; 7.2 crashes importing onnxruntime) runs a Debian
bookworm arm64 python3.11 (`mmdebstrap --variant=extract`) with the aarch64 onnxruntime wheel of the
same version as this machine's, from PyPI. That userland is set up once in a cache directory.
parity_runner.py runs short inputs cut from the build's benchmark inputs natively and emulated, and
every artifact's outputs are compared:

* fp32: max |emulated - native| <= 1e-5.
* int8 (and fp16: any precision below fp32): two rules, both recorded with the numbers they used.
  The int8 artifacts of the arm64 recipe (full-range S8S8) do not agree element by element across
  architectures: x86 and ARM kernels round differently, one flipped rounding early in the network
  re-draws the quantization noise of every later layer, and the two outputs end up about as far
  from each other as each is from fp32. (The x86_64 recipe's static int8, 7-bit weights, agrees
  almost exactly.) So int8 is judged against the artifact's own error on the same inputs, not
  against a fixed epsilon (the README, "ARM parity without ARM hardware", has the measured numbers):
  (a) max |emulated - native| <= 3 x max |native int8 - native fp32|: two draws of the rounding
      noise differ by up to twice its amplitude, a wrong kernel or garbage output by far more;
  (b) fidelity on the device: the relative error vs fp32, ||int8 - fp32|| / ||fp32|| over all
      inputs, emulated <= 2 x native + 1e-3 (each side against its own fp32 run): the error on ARM
      at most twice the one the build measured here, which catches a systematically worse kernel
      (e.g. a saturating one) that (a) would let through.

The result goes into the manifest under `parity.<target>`.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.core import EdgeqError, Files, load_manifest, run_json, update_manifest
from edgeq.pipeline.runners import PARITY_RUNNER

RUNNER = PARITY_RUNNER
EXIT_PARITY_FAILED = 3  # a failed check, distinct from user errors (2) and bugs (1)

QEMU_MIN_VERSION = (10, 0)
DEFAULT_CPU = "neoverse-n1"  # Armv8.2-A with fp16 and dot product: a Cortex-A76-class core (phones, Graviton2)
SUITE = "bookworm"
GUEST_PYTHON = "3.11"  # bookworm's python3
GUEST_GLIBC_MINOR = 36  # bookworm's glibc 2.36: manylinux_2_17 ... manylinux_2_36 wheels run there
ROOTFS_PACKAGES = ("python3.11", "libstdc++6")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
READY = ".edgeq-ready"  # written last: a directory without it is a half-done setup and is redone

FP32_ATOL = 1e-5
INT8_DIFF_FACTOR = 3.0
INT8_ERROR_FACTOR = 2.0
INT8_ERROR_FLOOR = 1e-3
PARITY_TOKENS = 32  # emulation is orders of magnitude slower than native: short inputs keep a run in minutes

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The emulator: QEMU on the host, a Debian arm64 userland and the aarch64 wheels in a cache directory


@dataclass(frozen=True)
class Emulator:
    """A ready aarch64 Python with onnxruntime: `command(script, args...)` runs it under QEMU."""

    qemu: str
    qemu_version: str
    cpu: str
    rootfs: Path
    site: Path  # the aarch64 wheels, on the guest's PYTHONPATH
    guest: dict[str, str] = field(default_factory=dict)  # python, numpy, onnxruntime versions

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{GUEST_PYTHON}"

    def command(self, *args: str) -> list[str]:
        return [self.qemu, "-cpu", self.cpu, "-L", str(self.rootfs), str(self.python), *args]

    def env(self) -> dict[str, str]:
        """A clean environment: nothing of the host's Python (venv, PYTHONPATH) leaks into the guest."""
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/"),
                "PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1"}

    def describe(self) -> dict[str, Any]:
        return {"qemu": self.qemu, "qemu_version": self.qemu_version, "cpu": self.cpu,
                "userland": f"Debian {SUITE} arm64, python {self.guest.get('python', GUEST_PYTHON)}",
                "cache_dir": str(self.rootfs.parent)}


def default_cache_dir() -> Path:
    """$EDGEQ_CACHE/aarch64, else $XDG_CACHE_HOME/edgeq/aarch64, else ~/.cache/edgeq/aarch64."""
    if os.environ.get("EDGEQ_CACHE"):
        return Path(os.environ["EDGEQ_CACHE"]).expanduser() / "aarch64"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "edgeq" / "aarch64"


def _os_release() -> dict[str, str]:
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip().strip('"') for k, _, v in (ln.partition("=") for ln in lines) if v}


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (CI machines may reach only their own), else the CDN.

    Only a source that serves a Debian suite counts (not -security, which has no `bookworm` suite):
    an Ubuntu mirror would not have bookworm."""
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    for uri in fields.get("URIs", "").split():
                        entries.append((uri, fields.get("Suites", "").split()))
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    entries.append((parts[1], [parts[2]]))
    debian = [(u.rstrip("/"), s) for u, s in entries if u.startswith(("http://", "https://"))
              and not any(x.endswith("-security") for x in s) and "ubuntu" not in u]
    for uri, suites in debian:
        if SUITE in suites:
            return uri
    if debian and _os_release().get("ID") == "debian":
        return debian[0][0]
    return DEFAULT_MIRROR


def remedy() -> str:
    """How this user gets the emulation tools, for a one-line error: root reruns with --install-deps;
    anyone else is given the same through sudo (edgeq never changes the system unasked)."""
    if os.geteuid() == 0:
        return f"rerun with --install-deps to install them, or yourself: {install_command()}"
    return (f"install them as root: sudo {sys.executable} -m edgeq parity ARTIFACT_DIR --install-deps, "
            f"or sudo sh -c \"{install_command()}\"")


def install_command(mirror: str | None = None) -> str:
    """The exact command that installs what emulation needs on this machine (for error messages)."""
    osr = _os_release()
    if osr.get("ID") == "debian" and osr.get("VERSION_CODENAME") == "bookworm":
        mirror = mirror or debian_mirror()
        return (f"echo 'deb {mirror} bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list"
                " && apt-get update && apt-get install -y -t bookworm-backports qemu-user mmdebstrap")
    if shutil.which("apt-get"):
        return "apt-get update && apt-get install -y qemu-user mmdebstrap  (QEMU 10 or later)"
    return "install QEMU 10 or later user-mode emulation (qemu-aarch64) and mmdebstrap with your package manager"


def _qemu_version(path: str) -> tuple[tuple[int, ...], str]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EdgeqError(f"cannot set up aarch64 emulation: {path} --version failed ({e})") from None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise EdgeqError(f"cannot set up aarch64 emulation: cannot read the version of {path}")
    return tuple(int(x) for x in m.groups() if x is not None), m.group(0).split()[1]


def find_qemu() -> tuple[str, str]:
    """(path, version) of a usable qemu-aarch64 on PATH, or an EdgeqError saying why there is none."""
    for name in ("qemu-aarch64", "qemu-aarch64-static"):
        path = shutil.which(name)
        if path:
            version, text = _qemu_version(path)
            if version < QEMU_MIN_VERSION:
                raise EdgeqError(
                    f"cannot set up aarch64 emulation: {path} is QEMU {text}, 10 or later is needed "
                    f"(older QEMU crashes importing onnxruntime); {remedy()}")
            return path, text
    raise EdgeqError("cannot set up aarch64 emulation: qemu-aarch64 (QEMU user-mode, 10 or later) not found on "
                     f"PATH; {remedy()}")


def _missing_host_deps() -> list[str]:
    missing = []
    try:
        find_qemu()
    except EdgeqError:
        missing.append("qemu-user")
    if not shutil.which("mmdebstrap"):
        missing.append("mmdebstrap")
    return missing


def _apt(args: list[str], log: Log) -> None:
    log(f"[parity] apt-get {' '.join(args)}")
    proc = subprocess.run(["apt-get", *args], capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise EdgeqError(f"cannot install the emulation tools: apt-get {' '.join(args)} failed: {last}")


def install_host_deps(log: Log = _stderr) -> bool:
    """apt-get install QEMU >= 10 (bookworm: from bookworm-backports) and mmdebstrap, if missing.

    Only as root, and only when asked (--install-deps, CI): edgeq never changes the system on its own.
    Returns whether anything was installed."""
    missing = _missing_host_deps()
    if not missing:
        return False
    if os.geteuid() != 0:
        raise EdgeqError(f"--install-deps needs root (it runs apt-get): {remedy()}")
    if not shutil.which("apt-get"):
        raise EdgeqError(f"cannot install {' and '.join(missing)}: no apt-get on PATH; {install_command()}")
    osr = _os_release()
    target_release: list[str] = []
    if osr.get("ID") == "debian" and osr.get("VERSION_CODENAME") == "bookworm":
        # bookworm's own QEMU is 7.2; backports has 10.x.
        sources = Path("/etc/apt/sources.list.d/edgeq-bookworm-backports.list")
        have = any("bookworm-backports" in p.read_text(errors="replace")
                   for p in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
                   if p.is_file() and p.suffix in (".list", ".sources"))
        if not have:
            log(f"[parity] adding bookworm-backports ({sources})")
            sources.write_text(f"deb {debian_mirror()} bookworm-backports main\n")
        target_release = ["-t", "bookworm-backports"]
    _apt(["update", "-q"], log)
    _apt(["install", "-y", "-q", *target_release, "qemu-user", "mmdebstrap"], log)
    still = _missing_host_deps()
    if still:
        find_qemu()  # raises with the reason (e.g. the distribution's QEMU is older than 10)
        raise EdgeqError(f"cannot install the emulation tools: {', '.join(still)} still missing after apt-get")
    return True


def _check_mirror(mirror: str) -> None:
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20):
            pass
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise EdgeqError(f"cannot set up aarch64 emulation: cannot reach the Debian mirror {mirror} ({reason}); "
                         "the first run downloads a Debian arm64 userland (~75 MB) and needs the network") from None


def _make_rootfs(dest: Path, mirror: str, log: Log) -> None:
    mmdebstrap = shutil.which("mmdebstrap")
    if not mmdebstrap:
        raise EdgeqError("cannot set up aarch64 emulation: mmdebstrap (makes the Debian arm64 userland) not found "
                         f"on PATH; {remedy()}")
    _check_mirror(mirror)
    log(f"[parity] Debian {SUITE} arm64 userland from {mirror} (one time)")
    cmd = [mmdebstrap, "--variant=extract", "--arch=arm64", f"--include={','.join(ROOTFS_PACKAGES)}", SUITE,
           str(dest), mirror]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")] or proc.stderr.strip().splitlines()
        raise EdgeqError(f"cannot set up aarch64 emulation: mmdebstrap failed: {(errors or ['no output'])[-1]}")


def _pip_install(dest: Path, onnxruntime_version: str, log: Log) -> None:
    """The aarch64 CPython 3.11 onnxruntime wheel (and its dependencies) from PyPI, into `dest`.

    pip matches manylinux platform tags literally, so every glibc level up to bookworm's is named."""
    log(f"[parity] aarch64 onnxruntime {onnxruntime_version} wheel from PyPI (one time)")
    platforms = [f"manylinux_2_{m}_aarch64" for m in range(GUEST_GLIBC_MINOR, 16, -1)] + ["manylinux2014_aarch64"]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", GUEST_PYTHON,
           *[a for p in platforms for a in ("--platform", p)], "--target", str(dest),
           f"onnxruntime=={onnxruntime_version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.strip().splitlines()
        raise EdgeqError(f"cannot set up aarch64 emulation: pip could not install the aarch64 onnxruntime=="
                         f"{onnxruntime_version} wheel for CPython {GUEST_PYTHON}: {(errors or ['no output'])[-1]}")


PROBE = ("import json, platform, numpy, onnxruntime as o; print(json.dumps({'python': platform.python_version(), "
         "'machine': platform.machine(), 'numpy': numpy.__version__, 'onnxruntime': o.__version__, "
         "'providers': o.get_available_providers()}))")


def _probe(emu: Emulator) -> dict[str, Any]:
    """Import onnxruntime in the guest: proves the userland, the wheels and QEMU work together."""
    try:
        proc = subprocess.run(emu.command("-c", PROBE), capture_output=True, text=True, env=emu.env(), timeout=600)
    except subprocess.TimeoutExpired:
        raise EdgeqError("cannot set up aarch64 emulation: importing onnxruntime under QEMU took over 600 s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeqError(f"cannot set up aarch64 emulation: the emulated Python cannot import onnxruntime under "
                         f"QEMU {emu.qemu_version} ({how}: {last})")
    info = json.loads(lines[-1])
    if info.get("machine") != "aarch64" or "CPUExecutionProvider" not in info.get("providers", []):
        raise EdgeqError(f"cannot set up aarch64 emulation: unexpected guest {info}")
    return info


@contextmanager
def _locked(cache_dir: Path):
    """One setup at a time per cache directory (two parity runs may start together)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(dest: Path, make: Callable[[Path], dict[str, Any] | None]) -> None:
    """Make `dest` with make(partial_dir) unless its READY marker exists; the marker goes in last."""
    if (dest / READY).is_file():
        return
    partial = dest.with_name(dest.name + ".partial")
    for d in (dest, partial):  # leftovers of an interrupted setup
        if d.exists():
            shutil.rmtree(d)
    info = make(partial) or {}
    partial.rename(dest)
    (dest / READY).write_text(json.dumps({**info, "created_utc": datetime.now(timezone.utc).isoformat()}) + "\n")


def setup_emulator(cache_dir: Path | str | None = None, *, cpu: str = DEFAULT_CPU, mirror: str | None = None,
                   onnxruntime_version: str | None = None, install_deps: bool = False, log: Log = _stderr) -> Emulator:
    """A ready aarch64 emulator, set up in `cache_dir` (default: default_cache_dir()) when not yet there.

    Idempotent: the userland (`rootfs-bookworm-arm64`) and the wheels (`site-cp311-onnxruntime-<version>`,
    the same onnxruntime version as this machine's, so only the architecture differs) are each made
    once; a half-done one (no marker) is redone. Raises EdgeqError saying why when it cannot be done."""
    import onnxruntime

    cache_dir = Path(cache_dir or default_cache_dir()).expanduser().resolve()
    if install_deps:
        install_host_deps(log)
    qemu, qemu_version = find_qemu()
    ort_version = onnxruntime_version or onnxruntime.__version__
    rootfs = cache_dir / f"rootfs-{SUITE}-arm64"
    site = cache_dir / f"site-cp{GUEST_PYTHON.replace('.', '')}-onnxruntime-{ort_version}"
    with _locked(cache_dir):
        _ensure(rootfs, lambda d: _make_rootfs(d, mirror or debian_mirror(), log))

        def make_site(d: Path) -> dict[str, Any]:
            _pip_install(d, ort_version, log)
            return _probe(Emulator(qemu, qemu_version, cpu, rootfs, d))

        _ensure(site, make_site)
    guest = json.loads((site / READY).read_text())
    return Emulator(qemu, qemu_version, cpu, rootfs, site,
                    {k: guest[k] for k in ("python", "numpy", "onnxruntime") if k in guest})


# --------------------------------------------------------------------------------------------------
# Inputs and comparison


def parity_inputs(bench: dict[str, np.ndarray], tokens: int = PARITY_TOKENS) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Short inputs cut from the build's benchmark inputs (real text, batch 1): (samples, descriptions).

    Four variants exercise different kernel paths: the first `tokens` tokens, another window of the
    text, half the length (other GEMM shapes), and the first window with its last quarter masked out
    (attention masking). Inputs that are not [batch, sequence] are used whole, as one sample."""
    first = {k: np.ascontiguousarray(v[:1]) for k, v in bench.items()}
    if not first or any(v.ndim != 2 for v in first.values()):
        return [first], ["the benchmark inputs, whole"]
    length = min(v.shape[1] for v in first.values())
    n = min(tokens, length)
    cut = lambda a, b: {k: np.ascontiguousarray(v[:, a:b]) for k, v in first.items()}  # noqa: E731
    samples, names = [cut(0, n)], [f"tokens 0-{n}"]
    if length > n:
        samples.append(cut(length - n, length))
        names.append(f"tokens {length - n}-{length}")
    if n >= 4:
        samples.append(cut(0, n // 2))
        names.append(f"tokens 0-{n // 2}")
    mask_key = next((k for k in first if "attention_mask" in k or k == "mask"), None)
    if mask_key and n >= 4:
        masked = cut(0, n)
        masked[mask_key] = masked[mask_key].copy()
        masked[mask_key][:, n - n // 4:] = 0
        samples.append(masked)
        names.append(f"tokens 0-{n}, last {n // 4} masked")
    return samples, names


def _num(x: float) -> float | None:
    """JSON-safe, 4 significant digits; NaN/inf become null."""
    return float(f"{x:.4g}") if np.isfinite(x) else None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


Outputs = list[dict[str, np.ndarray]]  # per sample: output name -> array


def _relative_error(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """||x - ref|| / ||ref|| over all (x, ref) pairs pooled: steadier than a mean of per-sample
    cosines when outputs are small (a classifier's few logits)."""
    num = sum(float(np.sum((x.astype(np.float64) - r) ** 2)) for x, r in pairs)
    den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for _, r in pairs)
    return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def _pairs(a: Outputs, b: Outputs) -> tuple[list[tuple[np.ndarray, np.ndarray]], str | None]:
    """The (a, b) arrays to compare, or why they cannot be compared."""
    if len(a) != len(b):
        return [], f"{len(a)} vs {len(b)} samples"
    pairs = []
    for i, (x, y) in enumerate(zip(a, b)):
        if set(x) != set(y):
            return [], f"sample {i}: outputs {sorted(x)} vs {sorted(y)}"
        for name in sorted(x):
            if x[name].shape != y[name].shape:
                return [], f"sample {i} {name}: shape {x[name].shape} vs {y[name].shape}"
            pairs.append((x[name], y[name]))
    return pairs, None


def compare(precision: str, native: Outputs, emulated: Outputs, native_fp32: Outputs | None = None,
            emulated_fp32: Outputs | None = None, fp32_atol: float = FP32_ATOL) -> dict[str, Any]:
    """One artifact's native vs emulated outputs, with the verdict and the tolerance that made it.

    Returns max/mean abs diff, the smallest cosine, whether bit-identical, the tolerance (value and
    rule) and "verdict": "pass" or "fail" (with "reason"). fp32: max |emulated - native| <=
    fp32_atol. Any other precision (int8, fp16): the rules of the module docstring, which need the
    fp32 artifact's outputs from both runs on the same inputs (`native_fp32`, `emulated_fp32`)."""
    pairs, problem = _pairs(native, emulated)
    if problem:
        return {"verdict": "fail", "reason": f"outputs differ in structure: {problem}"}
    if not all(np.isfinite(x).all() and np.isfinite(y).all() for x, y in pairs):
        return {"verdict": "fail", "reason": "non-finite values (NaN or inf) in the outputs"}
    diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)) for x, y in pairs]
    max_diff = max(float(d.max()) for d in diffs) if diffs else 0.0
    rec: dict[str, Any] = {
        "max_abs_diff": _num(max_diff),
        "mean_abs_diff": _num(float(np.mean([d.mean() for d in diffs]))) if diffs else 0.0,
        "cosine_min": round(min((_cosine(x, y) for x, y in pairs), default=1.0), 6),
        "bit_identical": all(np.array_equal(x, y) for x, y in pairs),
    }
    if precision == "fp32":
        rec["tolerance"] = {"max_abs_diff": fp32_atol, "rule": f"max |emulated - native| <= {fp32_atol:g}"}
        ok = max_diff <= fp32_atol
        return {**rec, "verdict": "pass"} if ok else {**rec, "verdict": "fail",
                                                      "reason": f"max abs diff {max_diff:.3g} > {fp32_atol:g}"}
    if native_fp32 is None or emulated_fp32 is None:
        return {**rec, "verdict": "fail", "reason": f"no fp32 reference outputs to judge {precision} against"}
    nat_ref, problem = _pairs(native, native_fp32)
    emu_ref, problem2 = _pairs(emulated, emulated_fp32)
    if problem or problem2:
        return {**rec, "verdict": "fail", "reason": f"cannot compare with the fp32 artifact: {problem or problem2}"}
    quant_err = max((float(np.abs(x.astype(np.float64) - r).max()) for x, r in nat_ref), default=0.0)
    tol = max(INT8_DIFF_FACTOR * quant_err, fp32_atol)
    cos_nat = float(np.mean([_cosine(x, r) for x, r in nat_ref]))
    cos_emu = float(np.mean([_cosine(x, r) for x, r in emu_ref]))
    rel_nat, rel_emu = _relative_error(nat_ref), _relative_error(emu_ref)
    rel_limit = INT8_ERROR_FACTOR * rel_nat + INT8_ERROR_FLOOR
    rec["quantization_error"] = _num(quant_err)
    rec["cosine_vs_fp32"] = {"native": round(cos_nat, 6), "emulated": round(cos_emu, 6)}
    rec["relative_error_vs_fp32"] = {"native": _num(rel_nat), "emulated": _num(rel_emu)}
    rec["tolerance"] = {
        "max_abs_diff": _num(tol),
        "rule": f"max |emulated - native| <= {INT8_DIFF_FACTOR:g} x the artifact's own error on these inputs "
                f"(max |native {precision} - native fp32| = {quant_err:.4g}); and relative error vs fp32 "
                f"||{precision} - fp32|| / ||fp32|| emulated <= {INT8_ERROR_FACTOR:g} x native ({rel_nat:.4g}) "
                f"+ {INT8_ERROR_FLOOR:g}",
        "relative_error_vs_fp32": _num(rel_limit),
    }
    reasons = []
    if max_diff > tol:
        reasons.append(f"max abs diff {max_diff:.3g} > {tol:.3g}")
    if rel_emu > rel_limit:
        reasons.append(f"emulated {precision} is further from fp32 (relative error {rel_emu:.3g}) than native "
                       f"({rel_nat:.3g}) allows ({rel_limit:.3g})")
    return {**rec, "verdict": "fail", "reason": "; ".join(reasons)} if reasons else {**rec, "verdict": "pass"}


# --------------------------------------------------------------------------------------------------
# The command


def _resolve_target(manifest: dict[str, Any], target: str | None) -> tuple[str, str]:
    """(name, arch) of the target to emulate: the one asked for, else the build's."""
    from edgeq import targets

    if target:
        t = targets.load(target)
        name, arch = t.name, t.arch
    else:
        built = manifest.get("target") or {}
        name = built.get("name", "?")
        arch = built.get("arch") or targets.load(name).arch  # manifests of older builds lack "arch"
    if arch != "aarch64":
        raise EdgeqError(f"parity runs the artifacts on an emulated aarch64 CPU, and target '{name}' is {arch}: "
                         "give an aarch64 target (e.g. --target arm64)")
    return name, arch


def _load_outputs(path: Path, models: list[str], n_samples: int) -> dict[str, Outputs]:
    out: dict[str, Outputs] = {m: [{} for _ in range(n_samples)] for m in models}
    if path.is_file():
        with np.load(path) as z:
            for key in z.files:
                model, sample, name = key.split("/", 2)
                out[model][int(sample)][name] = z[key]
    return out


def run_parity(build_dir: Path | str, target: str | None = None, *, cache_dir: Path | str | None = None,
               install_deps: bool = False, cpu: str = DEFAULT_CPU, threads: int = 1, fp32_atol: float = FP32_ATOL,
               timeout: float = 3600, emulator: Emulator | None = None, log: Log = _stderr) -> dict[str, Any]:
    """Run every artifact of `build_dir` natively and on an emulated aarch64 CPU, compare, and record
    the result in the manifest (`parity.<target>`). Returns the record; record["status"] is
    "passed" or "failed". User errors (and emulation that cannot be set up) raise EdgeqError."""
    t_start = time.perf_counter()
    build_dir = Path(build_dir).resolve()
    manifest = load_manifest(build_dir)
    name, _ = _resolve_target(manifest, target)
    artifacts = manifest.get("artifacts") or []
    if not any(a.get("name") == "fp32" for a in artifacts):
        raise EdgeqError(f"{build_dir}: the manifest lists no fp32 artifact (the reference parity needs)")
    for a in artifacts:
        if not (build_dir / a["path"]).is_file():
            raise EdgeqError(f"{build_dir}: artifact file missing: {a['path']}")
    bench_path = build_dir / Files.BENCH_INPUTS
    if not bench_path.is_file():
        raise EdgeqError(f"{build_dir}: no {Files.BENCH_INPUTS} (parity inputs are cut from the build's benchmark inputs)")
    with np.load(bench_path) as z:
        samples, sample_names = parity_inputs({k: z[k] for k in z.files})

    t0 = time.perf_counter()
    emu = emulator or setup_emulator(cache_dir, cpu=cpu, install_deps=install_deps, log=log)
    setup_s = time.perf_counter() - t0

    models = {a["name"]: str(build_dir / a["path"]) for a in artifacts}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeq-parity-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **{f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()})
        outputs: dict[str, dict[str, Outputs]] = {}
        for side, cmd_prefix, env in (("native", [sys.executable], None), ("emulated", emu.command(), emu.env())):
            spec = {"models": models, "inputs": str(inputs), "output": str(Path(tmp) / f"{side}.npz"),
                    "threads": threads}
            label = "this machine" if side == "native" else f"QEMU {emu.qemu_version} -cpu {emu.cpu}"
            log(f"[parity] {side} run on {label}: {len(models)} artifacts x {len(samples)} inputs")
            t0 = time.perf_counter()
            runs[side] = run_json([*cmd_prefix, str(RUNNER), json.dumps(spec)], env, timeout)
            runs[side]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            outputs[side] = _load_outputs(Path(spec["output"]), list(models), len(samples))

    results: dict[str, dict[str, Any]] = {}
    for a in artifacts:
        errors = {side: r.get("error") or r.get("models", {}).get(a["name"], {}).get("error")
                  for side, r in runs.items()}
        if errors["native"] and errors["emulated"] and a["name"] != "fp32":
            # e.g. an fp16 artifact made for a GPU/NPU provider, with ops the CPU EP lacks: nothing to compare
            rec = {"verdict": "skip", "reason": f"does not run on the CPU EP here either: {errors['native']}"}
        elif any(errors.values()):
            rec = {"verdict": "fail", "reason": "; ".join(f"{side}: {e}" for side, e in errors.items() if e)}
        else:
            rec = compare(a.get("precision", "fp32"), outputs["native"][a["name"]], outputs["emulated"][a["name"]],
                          outputs["native"]["fp32"], outputs["emulated"]["fp32"], fp32_atol=fp32_atol)
        rec = {"precision": a.get("precision"), **rec,
               "seconds": {side: r.get("models", {}).get(a["name"], {}).get("seconds") for side, r in runs.items()}}
        results[a["name"]] = rec

    target_eps = manifest.get("target", {}).get("execution_providers", [])
    notes = []
    if manifest.get("target", {}).get("name") != name:
        notes.append(f"artifacts built for target {manifest.get('target', {}).get('name')}, emulated as {name}")
    if any(ep != "CPUExecutionProvider" for ep in target_eps):
        notes.append(f"only CPUExecutionProvider was emulated (the PyPI aarch64 onnxruntime has no other); "
                     f"the target lists {target_eps}")
    record = {
        "status": "failed" if any(r["verdict"] == "fail" for r in results.values()) else "passed",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": name,
        "emulator": emu.describe(),
        "onnxruntime": {side: r.get("onnxruntime") for side, r in runs.items()},
        "machine": {side: r.get("machine") for side, r in runs.items()},
        "execution_provider": "CPUExecutionProvider",
        "threads": threads,
        "inputs": {"source": Files.BENCH_INPUTS, "samples": sample_names},
        "artifacts": results,
        "seconds": {"setup": round(setup_s, 1), "native": runs["native"]["wall_seconds"],
                    "emulated": runs["emulated"]["wall_seconds"], "total": round(time.perf_counter() - t_start, 1)},
        "notes": notes,
    }
    for side, r in runs.items():
        if r.get("error"):
            record.setdefault("errors", {})[side] = r["error"]
    update_manifest(build_dir, "parity", name, record)
    return record


def table(record: dict[str, Any]) -> str:
    """The short table `edgeq parity` prints: one row per artifact, then one summary line."""
    head = ("artifact", "precision", "max abs diff", "tolerance", "cos vs fp32 native/emu", "verdict")
    rows = []
    for name, r in record["artifacts"].items():
        cos = r.get("cosine_vs_fp32")
        rows.append((name, str(r.get("precision")),
                     "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.3g}",
                     "-" if "tolerance" not in r else f"{r['tolerance']['max_abs_diff']:.3g}",
                     f"{cos['native']:.4f}/{cos['emulated']:.4f}" if cos else "-",
                     {"pass": "pass", "skip": "skipped: "}.get(r["verdict"], "FAIL: ")
                     + ("" if r["verdict"] == "pass" else r.get("reason", ""))))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    e, o, s = record["emulator"], record["onnxruntime"], record["seconds"]
    lines.append(f"{record['target']} parity {record['status']}: onnxruntime {o.get('native')} "
                 f"({record['machine'].get('native')}) vs {o.get('emulated')} ({record['machine'].get('emulated')}, "
                 f"QEMU {e['qemu_version']} -cpu {e['cpu']}), {len(record['inputs']['samples'])} inputs, "
                 f"{s['total']:.0f}s (setup {s['setup']:.0f}s, emulated run {s['emulated']:.0f}s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m edgeq.commands.parity --install-deps [--setup]`: prepare a machine (CI) for parity."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m edgeq.commands.parity", description=main.__doc__)
    p.add_argument("--install-deps", action="store_true", help="apt-get install QEMU >= 10 and mmdebstrap (root)")
    p.add_argument("--setup", action="store_true", help="also set up the emulator cache")
    p.add_argument("--cache-dir", help="emulator cache (default: $EDGEQ_CACHE/aarch64 or ~/.cache/edgeq/aarch64)")
    args = p.parse_args(argv)
    try:
        if args.install_deps:
            done = install_host_deps()
            _stderr("edgeq parity: emulation tools " + ("installed" if done else "already installed"))
        find_qemu()
        if args.setup:
            emu = setup_emulator(args.cache_dir)
            _stderr(f"edgeq parity: emulator ready in {emu.rootfs.parent}")
    except EdgeqError as e:
        _stderr(f"edgeq: error: {e}")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
