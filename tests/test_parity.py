"""`edgeq parity`: the comparison rules, the error paths, and one real run under QEMU.

Most tests need no emulator: they point the lookup at an empty PATH or at fake tools (a
`qemu-aarch64` that runs its program natively, an `mmdebstrap` that makes a "userland" whose python
is this venv's), so they check everything around QEMU quickly and anywhere. The one real run
(`slow`) emulates an aarch64 CPU; CI installs qemu-user >= 10 and mmdebstrap first (.ci/run), and
when emulation cannot be set up that test fails with the reason, it does not skip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import disk_manifest

from edgeq.core import EdgeqError
from edgeq.commands import parity
from test_cli import assert_user_error

FAKE_QEMU = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "qemu-aarch64 version {version} (fake)"; exit 0; fi
shift 4  # -cpu CPU -L ROOTFS
exec "$@"
"""
# The fake userland's python: this venv's, reporting aarch64 (the probe insists on it).
FAKE_PYTHON = f"""#!/bin/sh
exec {sys.executable} "$@"
"""
SITECUSTOMIZE = "import platform\nplatform.machine = lambda: 'aarch64'\n"
# For the failing case: run the runner, then nudge every output it saved by 1e-3.
PERTURB = """import json, runpy, sys
import numpy as np
spec = json.loads(sys.argv[2])
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with np.load(spec["output"]) as z:
        arrays = {k: z[k] + np.float32(1e-3) for k in z.files}
    np.savez(spec["output"], **arrays)
"""


def run_edgeq(*args, env=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("EDGEQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def fake_bin(path: Path, qemu_version: str | None = "10.0.2", mmdebstrap: bool = False) -> Path:
    """A PATH directory with a fake qemu-aarch64 (runs its program natively) and/or mmdebstrap."""
    path.mkdir(parents=True, exist_ok=True)
    if qemu_version:
        (path / "qemu-aarch64").write_text(FAKE_QEMU.format(version=qemu_version))
        (path / "qemu-aarch64").chmod(0o755)
    if mmdebstrap:  # mmdebstrap ... SUITE DEST MIRROR: a "userland" whose python is this venv's
        (path / "mmdebstrap").write_text(
            '#!/bin/sh\nPATH=/usr/bin:/bin\nfor a; do last2="$prev"; prev="$a"; done\n'
            'echo run >> "$(dirname "$0")/mmdebstrap.calls"\n'
            f'mkdir -p "$last2/usr/bin" && cat > "$last2/usr/bin/python3.11" <<"EOF"\n{FAKE_PYTHON}EOF\n'
            'chmod 755 "$last2/usr/bin/python3.11"\n')
        (path / "mmdebstrap").chmod(0o755)
    return path


def fake_pip(dest: Path, version: str, log) -> None:
    dest.mkdir(parents=True)
    (dest / "sitecustomize.py").write_text(SITECUSTOMIZE)


@pytest.fixture
def fake_emulator(tmp_path, monkeypatch):
    """setup_emulator() with fake tools, no network: returns (cache_dir, bin_dir)."""
    bin_dir = fake_bin(tmp_path / "bin", mmdebstrap=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(parity, "_pip_install", fake_pip)
    monkeypatch.setattr(parity, "_check_mirror", lambda mirror: None)
    return tmp_path / "cache", bin_dir


def copy_build(build: dict, dest: Path) -> Path:
    """A private copy of a session build: parity writes into the manifest."""
    return Path(shutil.copytree(build["build_dir"], dest))


# -------------------------------------------------------------------------------------------------
# Comparison rules


def outputs(*arrays, name="out"):
    return [{name: np.asarray(a, dtype=np.float32)} for a in arrays]


def test_fp32_must_match_within_1e_5():
    x = np.linspace(-3, 3, 64).reshape(1, 8, 8)
    same = parity.compare("fp32", outputs(x, x), outputs(x, x))
    assert same["verdict"] == "pass" and same["bit_identical"] and same["max_abs_diff"] == 0
    assert same["tolerance"] == {"max_abs_diff": 1e-5, "rule": "max |emulated - native| <= 1e-05"}
    close = parity.compare("fp32", outputs(x), outputs(x + 4e-6))
    assert close["verdict"] == "pass" and not close["bit_identical"]
    far = parity.compare("fp32", outputs(x), outputs(x + 1e-4))
    assert far["verdict"] == "fail" and "max abs diff" in far["reason"]


def test_int8_tolerance_is_tied_to_the_artifacts_own_error():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(1, 16, 32)) for _ in range(3)]
    noise = lambda scale: [r + rng.normal(scale=scale, size=r.shape) for r in ref]  # noqa: E731
    nat_ref, emu_ref = outputs(*ref), outputs(*ref)
    native = outputs(*noise(0.05))
    # Another draw of rounding noise of the same size: as far from native as both are from fp32.
    ok = parity.compare("int8", native, outputs(*noise(0.05)), nat_ref, emu_ref)
    assert ok["verdict"] == "pass", ok
    assert not ok["bit_identical"] and ok["quantization_error"] > 0
    assert ok["tolerance"]["max_abs_diff"] == pytest.approx(3 * ok["quantization_error"], rel=1e-3)
    assert "own error" in ok["tolerance"]["rule"]
    # A systematically worse kernel on the device: four times the noise.
    worse = parity.compare("int8", native, outputs(*noise(0.2)), nat_ref, emu_ref)
    assert worse["verdict"] == "fail" and "further from fp32" in worse["reason"]
    # One wrong element, far outside the noise.
    broken = [dict(s) for s in native]
    broken[1]["out"] = broken[1]["out"].copy()
    broken[1]["out"][0, 3, 3] += 2.0
    bad = parity.compare("int8", native, broken, nat_ref, emu_ref)
    assert bad["verdict"] == "fail" and "max abs diff" in bad["reason"]
    # fp16 and other reduced precisions follow the same rules
    assert parity.compare("fp16", native, outputs(*noise(0.05)), nat_ref, emu_ref)["verdict"] == "pass"
    assert parity.compare("int8", native, native)["verdict"] == "fail"  # no fp32 reference to judge by


def test_structure_and_non_finite_outputs_fail():
    x = np.ones((1, 4, 4))
    assert "shape" in parity.compare("fp32", outputs(x), outputs(x[:, :2]))["reason"]
    assert "outputs" in parity.compare("fp32", outputs(x), outputs(x, name="other"))["reason"]
    assert "samples" in parity.compare("fp32", outputs(x, x), outputs(x))["reason"]
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    r = parity.compare("fp32", outputs(x), outputs(nan))
    assert r["verdict"] == "fail" and "non-finite" in r["reason"]
    json.dumps(r)  # what goes into the manifest is valid JSON


def test_parity_inputs_are_short_variants_of_the_benchmark_inputs():
    ids = np.arange(1, 129, dtype=np.int64)[None]
    bench = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    samples, names = parity.parity_inputs(bench)
    assert names == ["tokens 0-32", "tokens 96-128", "tokens 0-16", "tokens 0-32, last 8 masked"]
    assert [s["input_ids"].shape for s in samples] == [(1, 32), (1, 32), (1, 16), (1, 32)]
    assert samples[1]["input_ids"][0, 0] == 97
    assert samples[3]["attention_mask"][0].tolist() == [1] * 24 + [0] * 8
    assert bench["attention_mask"].all()  # the source is not modified
    short, names = parity.parity_inputs({"input_ids": ids[:, :10]})
    assert names == ["tokens 0-10", "tokens 0-5"]
    whole, names = parity.parity_inputs({"pixel_values": np.zeros((2, 3, 4, 4), np.float32)})
    assert len(whole) == 1 and whole[0]["pixel_values"].shape == (1, 3, 4, 4)


def test_debian_mirror_is_read_from_apt_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    assert parity.debian_mirror(tmp_path) == parity.DEFAULT_MIRROR  # no sources: the CDN
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert parity.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert parity.debian_mirror(tmp_path) == "http://other.example/debian"


# -------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing recorded


def test_user_errors(tiny_build, tiny_cls_build, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing")], "artifact directory not found"),
        ([str(tmp_path / "empty")], "is not a complete edgeq build"),
        ([tiny_build["build_dir"]], "target 'x86_64' is x86_64"),
        ([tiny_cls_build["build_dir"], "--target", "x86_64"], "target 'x86_64' is x86_64"),
        ([tiny_cls_build["build_dir"], "--target", "riscv"], "unknown target 'riscv'"),
    ]
    for args, fragment in cases:
        assert_user_error(run_edgeq("parity", *args), fragment)


def test_no_emulator_is_a_one_line_error_saying_why(tiny_cls_build, tmp_path):
    build = copy_build(tiny_cls_build, tmp_path / "build")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    r = run_edgeq("parity", str(build), *cache, env={"PATH": str(empty)})
    assert_user_error(r, "cannot set up aarch64 emulation: qemu-aarch64 (QEMU user-mode, 10 or later) not found")
    assert "--install-deps" in r.stderr
    old = fake_bin(tmp_path / "old", qemu_version="7.2.0")
    r = run_edgeq("parity", str(build), *cache, env={"PATH": str(old)})
    assert_user_error(r, "is QEMU 7.2.0, 10 or later is needed")
    new = fake_bin(tmp_path / "new")
    r = run_edgeq("parity", str(build), *cache, env={"PATH": str(new)})
    assert_user_error(r, "mmdebstrap (makes the Debian arm64 userland) not found")
    assert "parity" not in disk_manifest(build / "manifest.json")


def test_unreachable_mirror_and_install_without_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path / "bin", mmdebstrap=True)))
    with pytest.raises(EdgeqError, match=r"cannot reach the Debian mirror http://127\.0\.0\.1:9/debian"):
        parity.setup_emulator(tmp_path / "cache", mirror="http://127.0.0.1:9/debian", log=lambda m: None)
    assert not (tmp_path / "cache" / "rootfs-bookworm-arm64").exists()
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path / "old", qemu_version="7.2.0")))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EdgeqError, match="--install-deps needs root") as e:
        parity.install_host_deps(log=lambda m: None)
    assert "sudo" in str(e.value) and "--install-deps" in str(e.value) and "\n" not in str(e.value)


def test_the_missing_emulator_error_offers_the_install_to_root_and_to_others(monkeypatch):
    """One line either way: root is told to rerun with --install-deps; another user gets it via sudo."""
    monkeypatch.setenv("PATH", "/nonexistent")
    for uid, must in ((0, "rerun with --install-deps"), (1000, "sudo ")):
        monkeypatch.setattr(os, "geteuid", lambda uid=uid: uid)
        with pytest.raises(EdgeqError) as e:
            parity.find_qemu()
        text = str(e.value)
        assert must in text and "--install-deps" in text and "\n" not in text, text


# -------------------------------------------------------------------------------------------------
# Set-up and the whole command, with fake tools


def test_setup_is_idempotent_and_redoes_a_half_done_one(fake_emulator):
    cache, bin_dir = fake_emulator
    calls = bin_dir / "mmdebstrap.calls"
    emu = parity.setup_emulator(cache, log=lambda m: None)
    assert emu.guest["python"] and emu.qemu_version == "10.0.2" and emu.cpu == "neoverse-n1"
    assert (emu.rootfs / parity.READY).is_file() and (emu.site / parity.READY).is_file()
    parity.setup_emulator(cache, log=lambda m: None)
    assert calls.read_text().count("run") == 1  # nothing redone
    (emu.rootfs / parity.READY).unlink()  # as if killed before the marker was written
    parity.setup_emulator(cache, log=lambda m: None)
    assert calls.read_text().count("run") == 2
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        emu.rootfs.name, emu.site.name]  # no leftovers


def test_parity_records_pass_and_fail_in_the_manifest(fake_emulator, tiny_cls_build, tmp_path):
    cache, bin_dir = fake_emulator
    emu = parity.setup_emulator(cache, log=lambda m: None)
    build = copy_build(tiny_cls_build, tmp_path / "build")
    # The CLI against the prepared cache: the fake emulator runs natively, so outputs are identical.
    r = run_edgeq("parity", str(build), "--cache-dir", str(cache), "--json", env={"PATH": str(bin_dir)})
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["status"] == "passed" and rec["target"] == "arm64"
    assert set(rec["artifacts"]) == {"fp32", "int8-static", "int8-dynamic"}
    assert all(a["verdict"] == "pass" and a["bit_identical"] for a in rec["artifacts"].values())
    assert rec["emulator"]["qemu_version"] == "10.0.2" and rec["machine"]["emulated"] == "aarch64"
    assert rec["onnxruntime"]["native"] == rec["onnxruntime"]["emulated"]
    assert len(rec["inputs"]["samples"]) == 4 and rec["seconds"]["emulated"] > 0
    assert "int8-static" in r.stderr and "arm64 parity passed" in r.stderr  # the table
    assert disk_manifest(build / "manifest.json")["parity"]["arm64"] == rec
    # Outputs that differ on the "device": exit 3, the table says why, the manifest records it.
    emu.python.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'perturb.py'} \"$@\"\n")
    (tmp_path / "perturb.py").write_text(PERTURB)
    r = run_edgeq("parity", str(build), "--cache-dir", str(cache), env={"PATH": str(bin_dir)})
    assert r.returncode == parity.EXIT_PARITY_FAILED, r.stderr
    assert "FAIL: max abs diff 0.001 > 1e-05" in r.stdout and "arm64 parity failed" in r.stdout
    assert disk_manifest(build / "manifest.json")["parity"]["arm64"]["status"] == "failed"


# -------------------------------------------------------------------------------------------------
# The real thing


@pytest.mark.slow
def test_parity_under_qemu(tiny_cls_build, tmp_path):
    """A tiny arm64 build run by the aarch64 onnxruntime under QEMU (set up in the default cache,
    $EDGEQ_CACHE/aarch64 or ~/.cache/edgeq/aarch64, on first use). Fails, with the reason, when
    emulation cannot be set up."""
    build = copy_build(tiny_cls_build, tmp_path / "build")
    r = run_edgeq("parity", str(build), "--target", "arm64", "--json", timeout=1800)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr.strip()}"
    rec = json.loads(r.stdout)
    assert rec["status"] == "passed", rec
    assert rec["machine"]["emulated"] == "aarch64" and rec["machine"]["native"] != "aarch64"
    assert rec["onnxruntime"]["emulated"] == rec["onnxruntime"]["native"]
    assert int(rec["emulator"]["qemu_version"].split(".")[0]) >= 10
    fp32 = rec["artifacts"]["fp32"]
    assert fp32["max_abs_diff"] <= 1e-5 and fp32["tolerance"]["max_abs_diff"] == 1e-5
    for name in ("int8-static", "int8-dynamic"):
        a = rec["artifacts"][name]
        assert a["verdict"] == "pass" and a["max_abs_diff"] <= a["tolerance"]["max_abs_diff"], a
    assert disk_manifest(build / "manifest.json")["parity"]["arm64"]["status"] == "passed"
