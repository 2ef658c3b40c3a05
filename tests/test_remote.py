"""`edgeq bench` against a real OpenSSH server that this module starts on loopback.

The "device" is this machine: sshd listens on 127.0.0.1 (a free port) with a host key and an
authorized client key made in a temporary directory, and `--python` is this venv's python, so the
device has numpy and onnxruntime. CI installs openssh-server (.ci/run); the tests fail, not skip,
when sshd cannot be started, except for a non-root user without sshd.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import disk_manifest

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).exists()), None)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
RUNS = ["--runs", "3", "--warmup", "1", "--threads", "1"]  # the machine is shared: keep it light


def edgeq(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgeq: error:"), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeq-test", "-f", str(path)],
                   check=True, capture_output=True)
    path.chmod(0o600)
    return path


class Sshd:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.user = "root" if IS_ROOT else getpass.getuser()
        self.host_key = _keygen(root / "host_ed25519")
        self.client_key = _keygen(root / "client_ed25519")
        self.other_key = _keygen(root / "unauthorized_ed25519")
        self.known_hosts = root / "known_hosts"
        (root / "authorized_keys").write_text(Path(str(self.client_key) + ".pub").read_text())
        (root / "authorized_keys").chmod(0o600)
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\nPidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n")
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if IS_ROOT:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"could not start {SSHD} on 127.0.0.1:{self.port} (exit {self.proc.returncode}):\n"
                    f"{self.log.read_text()[-2000:]}", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def args(self, key: Path | None = None, port: int | None = None, known_hosts: Path | None = None) -> list[str]:
        return ["--host", f"{self.user}@127.0.0.1", "--port", str(port or self.port),
                "--identity", str(key or self.client_key), "--known-hosts", str(known_hosts or self.known_hosts),
                "--connect-timeout", "5"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None:
        if not IS_ROOT:
            pytest.skip("sshd is not installed and we are not root (CI installs openssh-server, see .ci/run)")
        pytest.fail("sshd is not installed: `apt-get install -y openssh-server openssh-client` (.ci/run does)",
                    pytrace=False)
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: `apt-get install -y openssh-client`", pytrace=False)
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def build_copy(tiny_build, tmp_path) -> Path:
    """A private copy of the shared tiny build, so recording into its manifest touches no other test."""
    dst = tmp_path / "build"
    shutil.copytree(tiny_build["build_dir"], dst)
    return dst


def test_bench_over_ssh_records_device_numbers(sshd, tiny_build, build_copy, tmp_path):
    device_tmp = tmp_path / "device-tmp"
    device_tmp.mkdir()
    r = edgeq("bench", str(build_copy), *sshd.args(), "--python", sys.executable, *RUNS,
              "--remote-dir", str(device_tmp))
    assert r.returncode == 0, r.stderr
    key = f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert "int8-dynamic" in r.stdout and "speedup" in r.stdout and f"remote_benchmarks['{key}']" in r.stdout

    manifest = disk_manifest(build_copy / "manifest.json")
    rec = manifest["remote_benchmarks"][key]
    assert rec["host"] == key
    names = [a["name"] for a in manifest["artifacts"]]
    assert list(rec["artifacts"]) == names and names[0] == "fp32" and len(names) >= 2
    for name, a in rec["artifacts"].items():
        assert a["runs"] == 3
        assert 0 < a["latency_p50_ms"] <= a["latency_p90_ms"] <= a["latency_p99_ms"]
        assert a["throughput_per_s"] > 0 and a["load_ms"] > 0 and a["peak_rss_mb"] > 10
        assert a["speedup_vs_fp32"] > 0 and a["provider"] == "CPUExecutionProvider"
        assert a["sha256"] == next(f["sha256"] for f in manifest["files"] if f["path"] == a["path"])
    assert rec["artifacts"]["fp32"]["speedup_vs_fp32"] == 1.0

    import platform

    import numpy
    import onnxruntime
    dev = rec["device"]
    assert dev["machine"] == platform.machine() and dev["python"] == platform.python_version()
    assert dev["onnxruntime"] == onnxruntime.__version__ and dev["numpy"] == numpy.__version__
    assert dev["cpu_count"] == os.cpu_count() and "CPUExecutionProvider" in dev["providers"]
    assert rec["settings"]["runs"] == 3 and rec["settings"]["threads"] == 1 and rec["settings"]["warmup"] == 1
    assert rec["settings"]["python"] == sys.executable and rec["settings"]["batch_size"] == 1
    assert rec["timestamp"].endswith("+00:00")
    # the temporary directory on the device is gone, and nothing else was left there
    assert list(device_tmp.iterdir()) == []
    # the rest of the manifest is as the build wrote it
    original = disk_manifest(Path(tiny_build["build_dir"]) / "manifest.json")
    assert {k: v for k, v in manifest.items() if k != "remote_benchmarks"} == original


def test_bench_json_and_default_temp_dir(sshd, build_copy):
    r = edgeq("bench", str(build_copy), *sshd.args(), "--python", sys.executable, *RUNS, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout; the table goes to stderr
    assert "int8-dynamic" in r.stderr and "p50 ms" in r.stderr
    manifest = disk_manifest(build_copy / "manifest.json")
    assert out["manifest"] == str((build_copy / "manifest.json").resolve())
    assert {k: v for k, v in out.items() if k not in ("build_dir", "manifest", "remote_dir")} == \
        manifest["remote_benchmarks"][out["host"]]
    assert Path(out["remote_dir"]).name.startswith("edgeq-bench-")
    assert not Path(out["remote_dir"]).exists()  # the device is this machine


def test_unreachable_port_is_one_line(sshd, build_copy):
    r = edgeq("bench", str(build_copy), *sshd.args(port=_free_port()), "--python", sys.executable, *RUNS)
    assert_one_line_error(r, "cannot reach", "Connection refused")
    assert "remote_benchmarks" not in disk_manifest(build_copy / "manifest.json")


def test_authentication_failure_is_one_line(sshd, build_copy):
    r = edgeq("bench", str(build_copy), *sshd.args(key=sshd.other_key), "--python", sys.executable, *RUNS)
    assert_one_line_error(r, "authentication to", "failed")


def test_changed_host_key_is_refused(sshd, build_copy, tmp_path):
    """accept-new records a new host key but never accepts a changed one."""
    known = tmp_path / "known_hosts"
    other = Path(str(sshd.other_key) + ".pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    r = edgeq("bench", str(build_copy), *sshd.args(known_hosts=known), "--python", sys.executable, *RUNS)
    assert_one_line_error(r, "host key of", "does not match known_hosts")


def test_remote_python_missing(sshd, build_copy):
    r = edgeq("bench", str(build_copy), *sshd.args(), "--python", "/nonexistent/python3", *RUNS)
    assert_one_line_error(r, "python '/nonexistent/python3' not found")


def test_remote_onnxruntime_missing(sshd, build_copy, tmp_path):
    """A device python that has neither numpy nor onnxruntime: this python without site-packages."""
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    device_tmp = tmp_path / "device-tmp"
    device_tmp.mkdir()
    r = edgeq("bench", str(build_copy), *sshd.args(), "--python", str(bare), *RUNS, "--remote-dir", str(device_tmp))
    line = assert_one_line_error(r, "onnxruntime", "not installed", "pip install numpy onnxruntime")
    assert str(bare) in line
    assert list(device_tmp.iterdir()) == []


def test_runner_failure_on_device_cleans_up(sshd, build_copy, tmp_path):
    """A model onnx can read but onnxruntime cannot run: the error is one line, the device is clean."""
    import onnx

    path = build_copy / "model.int8-dynamic.onnx"
    m = onnx.load(str(path))
    m.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(m, str(path))
    device_tmp = tmp_path / "device-tmp"
    device_tmp.mkdir()
    r = edgeq("bench", str(build_copy), *sshd.args(), "--python", sys.executable, *RUNS,
              "--remote-dir", str(device_tmp))
    assert_one_line_error(r, "NoSuchOperator")
    assert list(device_tmp.iterdir()) == []
    assert "remote_benchmarks" not in disk_manifest(build_copy / "manifest.json")


def test_not_a_build_dir(tmp_path):
    (tmp_path / "model.fp32.onnx").write_bytes(b"")
    r = edgeq("bench", str(tmp_path), "--host", "nobody@127.0.0.1", "--port", "1")
    assert_one_line_error(r, "not a complete edgeq build")
    r = edgeq("bench", str(tmp_path / "missing"), "--host", "nobody@127.0.0.1")
    assert_one_line_error(r, "artifact directory not found")


def test_incomplete_build_dir(build_copy):
    (build_copy / "work" / "bench_inputs.npz").unlink()
    r = edgeq("bench", str(build_copy), "--host", "nobody@127.0.0.1", "--port", "1")
    assert_one_line_error(r, "is incomplete", "bench_inputs.npz")
