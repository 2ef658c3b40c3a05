"""`edgeq bench`: measure a finished build's artifacts on a real device over ssh.

The device needs only python 3 with numpy and onnxruntime. The artifact's models (with any external
data), its benchmark inputs (work/bench_inputs.npz) and the standalone runner (bench_runner.py) are
copied with the system `scp` to a fresh temporary directory on the device; the runner is started
there with `ssh`, exactly as the build's benchmark stage starts it locally (`measure.measure`:
latency of all artifacts interleaved in one process, then load time and peak RSS of each in a fresh
process), and the temporary directory is removed afterwards, also when something failed.

ssh always runs with BatchMode=yes (never a password or passphrase prompt), a connect timeout and
StrictHostKeyChecking=accept-new (a new host key is recorded, a changed one is refused). No Python
ssh library is used.

The record lands in the manifest as manifest["remote_benchmarks"]["user@host[:port]"].
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from edgeq.core import EdgeqError, Files, last_json_line, load_manifest, onnx_files

BENCH_INPUTS = Files.BENCH_INPUTS
REMOTE_PREFIX = "edgeq-bench-"
RUNNER_TIMEOUT_S = 900  # one runner process on the device (its timed loop stops itself after 120 s)
SHORT_TIMEOUT_S = 120  # probe, clean-up
COPY_TIMEOUT_S = 3600
METRICS = ("latency_mean_ms", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_min_ms",
           "throughput_per_s", "runs", "load_ms", "peak_rss_mb")

# Runs on the device with its python (so: no f-strings, nothing newer than python 3.0 before the
# version check). Prints one JSON object: the device facts, and a fresh temporary directory when
# asked for one and numpy + onnxruntime import.
PROBE = r'''
import json, os, platform, subprocess, sys
out = {"python": platform.python_version(), "python_executable": sys.executable,
       "machine": platform.machine(), "system": platform.system(), "release": platform.release(),
       "platform": platform.platform()}
try:
    out["cpu_count"] = os.cpu_count()
    out["cpu_count_usable"] = len(os.sched_getaffinity(0))
except Exception:
    pass
info = {}
try:
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            k, v = k.strip().lower(), v.strip()
            if v and k not in info:
                info[k] = v
except Exception:
    pass
cpu = info.get("model name") or info.get("cpu model")
if not cpu:
    try:
        env = dict(os.environ, LC_ALL="C")
        for line in subprocess.check_output(["lscpu"], env=env, stderr=subprocess.DEVNULL).decode().splitlines():
            if line.lower().startswith("model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except Exception:
        pass
if not cpu and sys.platform == "darwin":
    try:
        cpu = subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"]).decode().strip()
    except Exception:
        pass
if not cpu and "cpu part" in info:
    cpu = "CPU implementer %s part %s" % (info.get("cpu implementer", "?"), info["cpu part"])
if cpu:
    out["cpu"] = cpu
for key in ("model", "hardware"):
    if key in info:
        out["board" if key == "model" else "hardware"] = info[key]
wanted = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c",
          "asimd", "asimddp", "i8mm", "asimdhp", "fphp", "sve", "bf16"}
out["cpu_features"] = sorted(wanted.intersection((info.get("flags") or info.get("features") or "").split()))
missing = {}
for mod in ("numpy", "onnxruntime"):
    try:
        m = __import__(mod)
        out[mod] = getattr(m, "__version__", "unknown")
    except ImportError as e:
        name = getattr(e, "name", None) or ""
        missing[mod] = "not installed" if name.split(".")[0] in ("numpy", "onnxruntime") else str(e)
    except Exception as e:
        missing[mod] = "%s: %s" % (type(e).__name__, e)
if missing:
    out["missing"] = missing
else:
    import onnxruntime
    out["providers"] = onnxruntime.get_available_providers()
    if sys.version_info >= (3, 6) and len(sys.argv) > 1 and sys.argv[1] == "mkdtemp":
        import tempfile
        try:
            out["tmpdir"] = tempfile.mkdtemp(prefix="edgeq-bench-", dir=sys.argv[2] or None)
        except Exception as e:
            out["tmpdir_error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
'''


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class SshTarget:
    """How to reach the device: `[user@]host`, and the options every ssh/scp call gets."""

    host: str
    port: int | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    connect_timeout: int = 10
    options: tuple[str, ...] = field(default_factory=tuple)  # extra `-o Key=Value` options

    def __post_init__(self) -> None:
        host = self.host.strip() if self.host else ""
        user, _, name = host.rpartition("@")
        if not name or name.startswith("-") or any(c.isspace() for c in host) or "/" in name:
            raise EdgeqError(f"invalid --host {self.host!r}: expected [user@]host")
        if self.port is not None and not 0 < self.port < 65536:
            raise EdgeqError(f"invalid --port {self.port}: expected 1-65535")
        if self.identity is not None and not Path(self.identity).is_file():
            raise EdgeqError(f"identity file not found: {self.identity}")
        for opt in self.options:
            if "=" not in opt or opt.startswith("-"):
                raise EdgeqError(f"invalid --ssh-option {opt!r}: expected Key=Value (passed to ssh as -o)")
        self.host = host

    @property
    def key(self) -> str:
        """The manifest key: user@host, with :port when a port was given."""
        return f"{self.host}:{self.port}" if self.port else self.host

    def _options(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        for opt in self.options:
            opts += ["-o", opt]
        return opts

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", *self._options(), *(["-p", str(self.port)] if self.port else []), "--", self.host, command]

    def scp_argv(self, sources: list[Path], remote_dir: str, legacy: bool = False) -> list[str]:
        user, at, name = self.host.rpartition("@")
        if ":" in name and not name.startswith("["):
            name = f"[{name}]"  # an IPv6 address
        return ["scp", *(["-O"] if legacy else []), *self._options(),
                *(["-P", str(self.port)] if self.port else []), "--",
                *[str(s) for s in sources], f"{user}{at}{name}:{remote_dir}/"]

    def _exec(self, argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise EdgeqError(f"`{argv[0]}` not found on this machine: install the OpenSSH client") from None
        except subprocess.TimeoutExpired:
            raise EdgeqError(f"{what} on {self.key} did not finish within {timeout:.0f}s") from None

    def connection_error(self, stderr: str) -> EdgeqError:
        """ssh exited 255: say whether the host could not be reached or refused us."""
        detail = _one_line(stderr) or "no message from ssh"
        s = stderr.lower()
        if "permission denied" in s or "too many authentication failures" in s or "no supported authentication" in s:
            hint = f" with {self.identity}" if self.identity else " (pass --identity KEYFILE)"
            return EdgeqError(f"authentication to {self.key} failed{hint}: {detail}")
        if "host key verification failed" in s or "remote host identification has changed" in s:
            return EdgeqError(f"host key of {self.key} does not match known_hosts (refusing to connect): {detail}")
        if "could not resolve hostname" in s or "name or service not known" in s:
            return EdgeqError(f"cannot resolve host of {self.key}: {detail}")
        return EdgeqError(f"cannot reach {self.key}: {detail}")

    def run(self, command: str, timeout: float, what: str) -> subprocess.CompletedProcess:
        """Run a shell command on the device; a failure of ssh itself (exit 255) is an EdgeqError."""
        proc = self._exec(self.ssh_argv(command), timeout, what)
        if proc.returncode == 255:
            raise self.connection_error(proc.stderr)
        return proc

    def copy(self, sources: list[Path], remote_dir: str) -> None:
        what = "copying the artifacts"
        proc = self._exec(self.scp_argv(sources, remote_dir), COPY_TIMEOUT_S, what)
        if proc.returncode != 0:
            # scp of OpenSSH >= 9 speaks SFTP; a device without an sftp server (dropbear, a minimal
            # sshd_config) closes the connection ("scp: Connection closed", exit 255) but still takes
            # the legacy scp protocol (-O, which older clients do not know and do not need).
            legacy = self._exec(self.scp_argv(sources, remote_dir, legacy=True), COPY_TIMEOUT_S, what)
            if not re.search(r"(illegal|unknown|invalid) option", legacy.stderr, re.I):
                proc = legacy
        if proc.returncode != 0:
            err = _one_line(proc.stderr) or f"scp exited {proc.returncode}"
            if re.search(r"connection refused|permission denied \(|timed out|no route|could not resolve",
                         proc.stderr, re.I):
                raise self.connection_error(proc.stderr)
            raise EdgeqError(f"copying the artifacts to {self.key}:{remote_dir} failed (the device needs an "
                             f"sftp server or scp): {err}")


def probe(target: SshTarget, python: str, mkdtemp_in: str | None = None) -> dict[str, Any]:
    """Device facts from its python; checks numpy + onnxruntime import, then (when `mkdtemp_in` is
    not None) makes a temporary directory in it ("" = the device's default) and returns its path as
    "tmpdir"."""
    args = ["mkdtemp", mkdtemp_in] if mkdtemp_in is not None else []
    cmd = " ".join(shlex.quote(a) for a in [python, "-c", PROBE, *args])
    proc = target.run(cmd, SHORT_TIMEOUT_S, "the device probe")
    facts = last_json_line(proc.stdout)
    if facts is None:
        err = _one_line(proc.stderr)
        if proc.returncode in (126, 127):
            raise EdgeqError(f"python {python!r} not found on {target.key} (or not executable; "
                             f"pass --python PATH): {err or f'exit {proc.returncode}'}")
        raise EdgeqError(f"{python!r} on {target.key} failed to report the device "
                         f"(exit {proc.returncode}): {err or 'no output'}")
    missing = facts.get("missing") or {}
    if missing:
        absent = [m for m, why in missing.items() if why == "not installed"]
        broken = {m: why for m, why in missing.items() if why != "not installed"}
        where = f"{python} (python {facts.get('python', '?')}) on {target.key}"
        if absent:
            raise EdgeqError(f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed for "
                             f"{where}: run `{python} -m pip install {' '.join(absent)}` on the device")
        m, why = next(iter(broken.items()))
        raise EdgeqError(f"{m} cannot be imported by {where}: {_one_line(why)}")
    if tuple(int(x) for x in re.findall(r"\d+", facts.get("python", "0"))[:2]) < (3, 6):
        raise EdgeqError(f"{python} on {target.key} is python {facts.get('python')}: the runner needs python 3.6+")
    if mkdtemp_in is not None and "tmpdir" not in facts:
        raise EdgeqError(f"cannot make a temporary directory on {target.key}"
                         f"{f' in {mkdtemp_in}' if mkdtemp_in else ''}: {facts.get('tmpdir_error', 'unknown error')}")
    return facts


def remove_remote_dir(target: SshTarget, remote_dir: str) -> bool:
    """rm -rf the temporary directory this command made (and nothing else); True when it is gone."""
    if not _is_our_tmpdir(remote_dir):
        return False
    try:
        proc = target.run(f"rm -rf -- {shlex.quote(remote_dir)} && test ! -e {shlex.quote(remote_dir)}",
                          SHORT_TIMEOUT_S, "removing the temporary directory")
    except EdgeqError:
        return False
    return proc.returncode == 0


def _is_our_tmpdir(path: str) -> bool:
    p = PurePosixPath(path)
    return (p.is_absolute() and p.name.startswith(REMOTE_PREFIX) and ".." not in p.parts
            and re.fullmatch(r"[A-Za-z0-9._/+-]+", path) is not None)


def remote_runner(target: SshTarget, python: str, runner: str) -> Callable[[dict], dict]:
    """A `runner` for measure.measure: bench_runner.py with a spec, on the device."""

    def run(spec: dict) -> dict:
        cmd = " ".join(shlex.quote(a) for a in [python, runner, json.dumps(spec)])
        proc = target.run(cmd, RUNNER_TIMEOUT_S, "the benchmark runner")
        out = last_json_line(proc.stdout)
        if out is None:
            return {"error": f"runner exited {proc.returncode}: {_one_line(proc.stderr) or 'no output'}"}
        return out

    return run


def _artifact_files(build_dir: Path, manifest: dict) -> tuple[list[dict], list[Path]]:
    """The manifest's artifacts and every file they need (models, external data, inputs)."""
    artifacts = manifest.get("artifacts") or []
    if not artifacts or not any(a.get("name") == "fp32" for a in artifacts):
        raise EdgeqError(f"{build_dir}: the manifest lists no fp32 artifact")
    files: list[Path] = []
    for a in artifacts:
        model = build_dir / a["path"]
        if not model.is_file():
            raise EdgeqError(f"{build_dir} is incomplete: {a['path']} is missing")
        try:
            needed = onnx_files(model)
        except Exception as e:
            raise EdgeqError(f"{model}: not a readable ONNX model ({_one_line(str(e))})") from None
        for p in needed:
            if not p.is_file():
                raise EdgeqError(f"{build_dir} is incomplete: {p.relative_to(build_dir)} "
                                 f"(external data of {a['path']}) is missing")
            if p not in files:
                files.append(p)
    inputs = build_dir / BENCH_INPUTS
    if not inputs.is_file():
        raise EdgeqError(f"{build_dir} is incomplete: {BENCH_INPUTS} (the benchmark inputs) is missing")
    return artifacts, files


def _norm_arch(a: str | None) -> str:
    a = (a or "").lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}.get(a, a)


def _target_arch(manifest: dict) -> str | None:
    t = manifest.get("target") or {}
    if t.get("arch"):
        return t["arch"]
    try:
        from edgeq import targets

        return targets.load(t.get("name", "")).arch
    except Exception:
        return None


def bench(build_dir: Path, target: SshTarget, python: str = "python3", runs: int = 100, warmup: int = 10,
          threads: int = 0, provider: str | None = None, remote_parent: str | None = None,
          log: Callable[[str], None] = lambda m: None) -> tuple[dict[str, Any], str]:
    """Measure every artifact of `build_dir` on the device; record and return the record.

    Returns (record, remote_dir); remote_dir no longer exists on the device when this returns."""
    from edgeq.core import update_manifest
    from edgeq.measure import RUNNER, measure
    from edgeq.pipeline.runners import LM_RUNTIME

    build_dir = Path(build_dir).resolve()
    manifest = load_manifest(build_dir)
    if runs < 1 or warmup < 0 or threads < 0:
        raise EdgeqError("--runs must be at least 1, --warmup and --threads not negative")
    artifacts, files = _artifact_files(build_dir, manifest)
    inputs = build_dir / BENCH_INPUTS
    import numpy as np

    with np.load(inputs) as z:
        shapes = {k: list(z[k].shape) for k in z.files}
    t_start = time.perf_counter()

    log(f"probing {target.key} ...")
    facts = probe(target, python, mkdtemp_in=remote_parent or "")
    remote_dir = facts.pop("tmpdir")
    failed = True
    try:
        if not _is_our_tmpdir(remote_dir):
            raise EdgeqError(f"unexpected temporary directory name on {target.key}: {remote_dir!r}")
        available = facts.get("providers") or []
        if provider is None:
            wanted = (manifest.get("target") or {}).get("execution_providers") or []
            provider = next((ep for ep in wanted if ep in available), "CPUExecutionProvider")
        if provider not in available:
            raise EdgeqError(f"{provider} is not available in onnxruntime {facts.get('onnxruntime')} on "
                             f"{target.key} (available: {', '.join(available) or 'none'})")
        n_threads = threads or facts.get("cpu_count_usable") or facts.get("cpu_count") or 1

        # Same layout as the build directory, so external data paths stay valid.
        by_dir: dict[str, list[Path]] = {}
        runtime = LM_RUNTIME  # bench_runner imports it for causal LMs
        for p in [*files, inputs, RUNNER, runtime]:
            rel = p.relative_to(build_dir).parent.as_posix() if p not in (RUNNER, runtime) else "."
            by_dir.setdefault(rel, []).append(p)
        subdirs = sorted(d for d in by_dir if d != ".")
        if subdirs:
            mk = "mkdir -p -- " + " ".join(shlex.quote(f"{remote_dir}/{d}") for d in subdirs)
            proc = target.run(mk, SHORT_TIMEOUT_S, "mkdir")
            if proc.returncode != 0:
                raise EdgeqError(f"cannot create directories on {target.key}: {_one_line(proc.stderr)}")
        total_mb = sum(p.stat().st_size for ps in by_dir.values() for p in ps) / 1e6
        log(f"copying {len(artifacts)} models and inputs ({total_mb:.1f} MB) to {target.key}:{remote_dir} ...")
        for d, ps in by_dir.items():
            target.copy(ps, remote_dir if d == "." else f"{remote_dir}/{d}")

        rdir = PurePosixPath(remote_dir)
        models = [rdir / a["path"] for a in artifacts]
        log(f"measuring {', '.join(a['name'] for a in artifacts)} on {target.key} "
            f"({provider}, {n_threads} threads, {runs} runs each) ...")
        results = measure(models, rdir / BENCH_INPUTS, provider, n_threads, warmup, runs,
                          runner=remote_runner(target, python, str(rdir / RUNNER.name)))
        if isinstance(results, str):  # the provider could not run on the device
            raise EdgeqError(f"{provider} on {target.key}: {results}")
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise EdgeqError(f"the benchmark runner failed on {target.key}: {_one_line(errors[0])}")
        failed = False
    finally:
        removed = remove_remote_dir(target, remote_dir)
        if failed and not removed:
            # keep the error one line; say that something was left behind
            exc = sys.exc_info()[1]
            if isinstance(exc, EdgeqError) and exc.args:
                exc.args = (f"{exc.args[0]} (and {target.key}:{remote_dir} could not be removed)",)

    record = _record(manifest, build_dir, target, python, facts, artifacts, results, provider, n_threads,
                     warmup, runs, shapes, time.perf_counter() - t_start)
    if not removed:
        record["notes"].append(f"the temporary directory {remote_dir} could not be removed from the device")
    update_manifest(build_dir, "remote_benchmarks", target.key, record)
    return record, remote_dir


def _record(manifest, build_dir, target, python, facts, artifacts, results, provider, threads, warmup, runs,
            shapes, seconds) -> dict[str, Any]:
    sha = {f.get("path"): f.get("sha256") for f in manifest.get("files") or [] if isinstance(f, dict)}
    fp32 = next(r for a, r in zip(artifacts, results) if a["name"] == "fp32")
    out_artifacts: dict[str, dict] = {}
    for a, r in zip(artifacts, results):
        m = {k: r[k] for k in METRICS if k in r}
        if r.get("latency_p50_ms") and fp32.get("latency_p50_ms"):
            m["speedup_vs_fp32"] = round(fp32["latency_p50_ms"] / r["latency_p50_ms"], 3)
        entry = {"path": a["path"], "precision": a.get("precision"), "provider": r.get("provider", provider), **m}
        if sha.get(a["path"]):
            entry["sha256"] = sha[a["path"]]  # which file was measured
        if "memory_error" in r:
            entry["memory_error"] = r["memory_error"]
        if "partition" in r:
            entry["ep_coverage"] = r["partition"].get("coverage")
        out_artifacts[a["name"]] = entry
    device = dict(facts)  # "machine" is `uname -m` of the device
    notes = []
    arch, dev_arch = _target_arch(manifest), _norm_arch(facts.get("machine"))
    if arch and arch != "any" and dev_arch and _norm_arch(arch) != dev_arch:
        notes.append(f"artifacts built for target {(manifest.get('target') or {}).get('name')} ({arch}) "
                     f"were measured on a {dev_arch} device")
    built_ort = (manifest.get("versions") or {}).get("onnxruntime")
    if built_ort and facts.get("onnxruntime") and built_ort != facts["onnxruntime"]:
        notes.append(f"device onnxruntime {facts['onnxruntime']} differs from the build's {built_ort}")
    batch = next(iter(shapes.values()), [1, 0])
    return {
        "host": target.key,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "device": device,
        "settings": {"provider": provider, "threads": threads, "warmup": warmup, "runs": runs, "python": python,
                     "batch_size": batch[0] if batch else 1, "seq_len": batch[1] if len(batch) > 1 else None,
                     "inputs": {k: v for k, v in shapes.items()},
                     "method": "latency: artifacts interleaved in rounds of 10 runs in one process on the device; "
                               "load time and peak RSS: a fresh process per artifact"},
        "artifacts": out_artifacts,
        "notes": notes,
    }


def table(record: dict[str, Any], model: str = "") -> str:
    d, s = record["device"], record["settings"]
    cpu = d.get("cpu") or d.get("hardware") or "?"
    head = (f"{model + ' on ' if model else ''}{record['host']}: {d.get('machine')}, {cpu}, "
            f"{d.get('cpu_count_usable') or d.get('cpu_count')} cores, python {d.get('python')}, "
            f"onnxruntime {d.get('onnxruntime')}; {s['provider']}, {s['threads']} threads, {s['runs']} runs")
    rows = [("artifact", "precision", "p50 ms", "p90 ms", "p99 ms", "per s", "speedup", "load ms", "RSS MB")]
    for name, m in record["artifacts"].items():
        def f(k, fmt):
            return format(m[k], fmt) if isinstance(m.get(k), (int, float)) else "-"
        rows.append((name, str(m.get("precision") or "-"), f("latency_p50_ms", ".2f"), f("latency_p90_ms", ".2f"),
                     f("latency_p99_ms", ".2f"), f("throughput_per_s", ".1f"),
                     f("speedup_vs_fp32", ".2f") + ("x" if "speedup_vs_fp32" in m else ""),
                     f("load_ms", ".0f"), f("peak_rss_mb", ".0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([head, *lines, *[f"note: {n}" for n in record.get("notes", [])]])
