"""CI-facing behaviour: edgeq.toml replay, gates, reproducible publishing, verification, the build
lock, and resuming an interrupted build."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

FAST = ["--runs", "3", "--warmup", "1", "--calib-samples", "32", "--eval-samples", "24"]


def edgeq(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeq", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=timeout)


def one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgeq: "), r.stderr
    return last


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- edgeq.toml ---------------------------------------------------------------------------------

def test_config_writes_resolved_options_and_build_replays_them(tiny_bert, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    r = edgeq("config", tiny_bert, "-m", "dynamic", "-o", proj / "out", "--min-speedup", "0.01", *FAST,
              "-w", proj / "edgeq.toml")
    assert r.returncode == 0, r.stderr
    import tomllib

    doc = tomllib.loads((proj / "edgeq.toml").read_text())
    # resolved: the target and calibration method are filled in; paths inside the folder are relative
    assert doc["target"] == "x86_64" and doc["modes"] == ["dynamic"] and doc["calib_method"] == "minmax"
    assert doc["out"] == "out" and doc["model"] == str(tiny_bert) and doc["runs"] == 3
    assert doc["min_speedup"] == 0.01 and "calib" not in doc  # the bundled data: left out
    # printing it again from the file gives the same text (a fixed point)
    again = edgeq("config", "--config", "edgeq.toml", cwd=proj)
    assert again.returncode == 0 and again.stdout == (proj / "edgeq.toml").read_text()
    # build replays it, from another folder; a command-line option overrides the file
    b = edgeq("build", "--config", proj / "edgeq.toml", "--runs", "2", "--json", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    summary = json.loads(b.stdout)
    assert summary["build_dir"] == str(proj / "out" / "tiny-bert" / "x86_64")
    assert [a["name"] for a in summary["artifacts"]] == ["fp32", "int8-dynamic"]
    config = json.loads(Path(summary["manifest"]).read_text())["config"]
    assert config["benchmark"]["runs"] == 2 and config["calibration"]["samples"] == 32
    # and the build's own options give the file back (edgeq config --from-build)
    fb = edgeq("config", "--from-build", summary["build_dir"], "--runs", "3", cwd=proj)
    assert fb.returncode == 0, fb.stderr
    assert tomllib.loads(fb.stdout) == doc


@pytest.mark.parametrize("text, fragment", [
    ("calib_samples = 'many'\n", "key 'calib_samples'"),
    ("[build]\nruns = 3\n", "unknown key 'build'"),
    ("modes = 3\n", "expected a list of strings"),
    ("fp16_io = 'yes'\n", "expected true or false"),
    ("runs = [1, 2\n", "not valid TOML"),
    ("colour = 'blue'\n", "unknown key 'colour'"),
    ("\xff\xfe", "not valid TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, fragment):
    f = tmp_path / "edgeq.toml"
    f.write_bytes(text.encode("latin-1"))
    assert fragment in one_line_error(edgeq("config", "--config", f))
    assert "config file not found" in one_line_error(edgeq("build", "--config", tmp_path / "nope.toml"))


# --- gates --------------------------------------------------------------------------------------

def test_failed_gate_has_its_own_exit_code_and_still_writes_the_build(tiny_bert, tmp_path):
    r = edgeq("build", tiny_bert, "-o", tmp_path, "-m", "dynamic", "-m", "static", *FAST,
              "--min-speedup", "1000", "--max-size-mb", "1000", "--json")
    last = one_line_error(r, code=3)
    assert last.startswith("edgeq: gate failed:") and "min_speedup" in last
    summary = json.loads(r.stdout)  # --json still prints its one object, with the gate result
    assert summary["gates"]["passed"] is False and summary["gates"]["failed"]
    build_dir = tmp_path / "tiny-bert" / "x86_64"
    from edgeq.core import load_manifest

    m = load_manifest(build_dir)
    assert (build_dir / "model.int8-dynamic.onnx").is_file() and (build_dir / "model.fp32.onnx").is_file()
    g = m["gates"]
    assert g["passed"] is False and g["passing"] == [] and g["limits"] == {"min_speedup": 1000, "max_size_mb": 1000}
    for name in ("int8-static", "int8-dynamic"):
        checks = {c["gate"]: c for c in g["artifacts"][name]["checks"]}
        speed = [a for a in m["artifacts"] if a["name"] == name][0]["metrics"]["speedup_vs_fp32"]
        assert checks["min_speedup"]["passed"] is False
        assert checks["min_speedup"]["by"] == pytest.approx(speed - 1000, abs=1e-5)  # how far off
        assert checks["max_size_mb"]["passed"] is True and checks["max_size_mb"]["by"] > 0
    assert {f["gate"] for f in g["failed"]} == {"min_speedup"}


def test_gates_pick_the_artifacts_that_pass(tmp_path, tiny_bert):
    r = edgeq("build", tiny_bert, "-o", tmp_path, "-m", "dynamic", "-m", "static", *FAST,
              "--max-accuracy-drop", "0.5", "--max-size-mb", "1000", "--json")
    assert r.returncode == 0, r.stderr
    from edgeq.core import load_manifest

    m = load_manifest(tmp_path / "tiny-bert" / "x86_64")
    g = m["gates"]
    assert g["passed"] and set(g["passing"]) <= {"int8-static", "int8-dynamic", "int8-hybrid"}
    for a in m["artifacts"][1:]:
        expected = 1 - a["metrics"]["cosine"] <= 0.5 + 1e-12 and a["metrics"]["size_bytes"] / 1e6 <= 1000
        assert (a["name"] in g["passing"]) == expected


# --- manifest split, publish, verify ------------------------------------------------------------

@pytest.fixture(scope="module")
def two_builds(tiny_bert, tmp_path_factory):
    """The same build twice into one output folder, each published as a tarball and a folder."""
    root = tmp_path_factory.mktemp("repro")
    out = []
    for i in range(2):
        r = edgeq("build", tiny_bert, "-o", root / "artifacts", *FAST)
        assert r.returncode == 0, r.stderr
        build_dir = root / "artifacts" / "tiny-bert" / "x86_64"
        manifest = (build_dir / "manifest.json").read_text()
        p1 = edgeq("publish", build_dir, "--to", root / f"bundle{i}.tar.gz", "--json")
        p2 = edgeq("publish", build_dir, "--to", root / f"dir{i}", "--json")
        assert p1.returncode == 0 and p2.returncode == 0, p1.stderr + p2.stderr
        out.append({"manifest": json.loads(manifest), "tar": json.loads(p1.stdout), "dir": json.loads(p2.stdout)})
    return root, out


def test_two_builds_publish_byte_identical_bundles(two_builds):
    root, (a, b) = two_builds
    assert a["tar"]["sha256"] == b["tar"]["sha256"] == sha(root / "bundle0.tar.gz") == sha(root / "bundle1.tar.gz")
    da, db = Path(a["dir"]["bundle"]), Path(b["dir"]["bundle"])
    assert da.name == db.name and da.name.startswith("tiny-bert-x86_64-")
    files_a = {p.relative_to(da).as_posix(): sha(p) for p in da.rglob("*") if p.is_file()}
    files_b = {p.relative_to(db).as_posix(): sha(p) for p in db.rglob("*") if p.is_file()}
    assert files_a == files_b
    assert {"manifest.json", "SHA256SUMS", "README.md", "model.fp32.onnx", "model.int8-static.onnx",
            "model.int8-dynamic.onnx", "tokenizer/vocab.txt"} <= set(files_a)
    assert not any(f.startswith(("work/", "calibration/")) for f in files_a)
    # the manifests differ only in their run section (timestamps, timings, machine)
    ma, mb = a["manifest"], b["manifest"]
    assert {k: v for k, v in ma.items() if k != "run"} == {k: v for k, v in mb.items() if k != "run"}
    assert ma["run"]["created_utc"] and "build_seconds" in ma["run"]
    assert ma["run"]["artifacts"]["name=fp32"]["metrics"]["latency_p50_ms"] > 0
    assert "latency_p50_ms" not in ma["artifacts"][0]["metrics"] and "cosine" in ma["artifacts"][1]["metrics"]
    # the bundle's manifest is the stable part, and names every shipped file with its checksum
    bundled = json.loads((da / "manifest.json").read_text())
    assert "run" not in bundled and bundled["artifacts"] == ma["artifacts"]
    sums = dict(reversed(line.split("  ", 1)) for line in (da / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == set(files_a) - {"SHA256SUMS"}
    assert all(sums[f] == files_a[f] for f in sums)


def test_two_mobile_builds_publish_byte_identical_bundles(tiny_bert, tmp_path):
    """arm64 packages ORT-format models: their bytes must repeat too (ONNX Runtime's converter lays
    out some tables in a per-process hash order; edgeq converts so that the layout repeats)."""
    tars = []
    for i in range(2):
        out = tmp_path / "out"  # the same inputs, --out included (it is part of the config)
        r = edgeq("build", tiny_bert, "-o", out, "--target", "arm64", "--mode", "dynamic", *FAST)
        assert r.returncode == 0, r.stderr
        build_dir = out / "tiny-bert" / "arm64"
        assert (build_dir / "model.int8-dynamic.ort").is_file()
        p = edgeq("publish", build_dir, "--to", tmp_path / f"bundle{i}.tar.gz", "--json")
        assert p.returncode == 0, p.stderr
        tars.append((json.loads(p.stdout)["sha256"], {f.name: sha(f) for f in build_dir.glob("*.ort")}))
    assert tars[0][1] == tars[1][1] and len(tars[0][1]) == 2
    assert tars[0][0] == tars[1][0]


def test_readers_see_the_timings_back_in_place(two_builds):
    root, _ = two_builds
    from edgeq.core import load_manifest

    m = load_manifest(root / "artifacts" / "tiny-bert" / "x86_64")
    fp32 = m["artifacts"][0]["metrics"]
    assert fp32["latency_p50_ms"] > 0 and fp32["speedup_vs_fp32"] == 1.0 and "run" not in m
    assert [s["stage"] for s in m["stages"] if "seconds" in s][:2] == ["export", "optimize"]


def test_verify_accepts_a_bundle_and_catches_changes(two_builds, tmp_path):
    root, (a, _) = two_builds
    ok = edgeq("verify", root / "bundle0.tar.gz")
    assert ok.returncode == 0 and "all match" in ok.stdout
    import shutil

    d = tmp_path / "b"
    shutil.copytree(a["dir"]["bundle"], d)
    assert edgeq("verify", d).returncode == 0
    model = d / "model.int8-dynamic.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))
    assert "checksum mismatch: model.int8-dynamic.onnx" in one_line_error(edgeq("verify", d), code=3)
    shutil.copyfile(Path(a["dir"]["bundle"]) / "model.int8-dynamic.onnx", model)
    (d / "extra.bin").write_bytes(b"x")
    assert "not in SHA256SUMS: extra.bin" in one_line_error(edgeq("verify", d), code=3)
    (d / "extra.bin").unlink()
    (d / "config.json").unlink()
    assert "missing: config.json" in one_line_error(edgeq("verify", d), code=3)


def _tar_with(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data) if m.isfile() else None)
    return path


@pytest.mark.parametrize("name, kind, fragment", [
    ("../evil.txt", tarfile.REGTYPE, "leaves the bundle"),
    ("/tmp/evil.txt", tarfile.REGTYPE, "leaves the bundle"),
    ("b/../../evil.txt", tarfile.REGTYPE, "leaves the bundle"),
    ("b/link", tarfile.SYMTYPE, "link or special file"),
    ("b/hard", tarfile.LNKTYPE, "link or special file"),
])
def test_verify_refuses_entries_that_escape(tmp_path, name, kind, fragment):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 1 if kind == tarfile.REGTYPE else 0
    info.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
    bad = _tar_with(tmp_path / "bad.tar.gz", [info])
    assert fragment in one_line_error(edgeq("verify", bad, cwd=tmp_path))
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]  # nothing extracted


def test_verify_refuses_what_a_bundle_never_holds(two_builds, tmp_path):
    """A bad gzip CRC, a file listed twice, a FIFO, a setuid file: each a one-line refusal, exit 2."""
    root, (a, _) = two_builds
    tar = tmp_path / "crc.tar.gz"
    data = bytearray((root / "bundle0.tar.gz").read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC32: only checked at the end of the stream
    tar.write_bytes(bytes(data))
    assert "not a readable tar archive" in one_line_error(edgeq("verify", tar))
    cases = {}
    for case in ("twice", "fifo", "setuid"):
        d = tmp_path / case
        shutil.copytree(a["dir"]["bundle"], d)
        cases[case] = d
    sums = cases["twice"] / "SHA256SUMS"
    first = sums.read_text().splitlines()[0]
    sums.write_text(sums.read_text() + first + "\n")
    assert "lists" in one_line_error(edgeq("verify", cases["twice"])) and "twice" in one_line_error(
        edgeq("verify", cases["twice"]))
    os.mkfifo(cases["fifo"] / "pipe")
    assert "FIFO" in one_line_error(edgeq("verify", cases["fifo"]))
    exe = cases["setuid"] / "README.md"
    exe.chmod(0o4755)
    assert "setuid" in one_line_error(edgeq("verify", cases["setuid"]))


def test_verify_refuses_sums_naming_outside_files_and_non_bundles(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "SHA256SUMS").write_text("0" * 64 + "  ../../etc/passwd\n")
    assert "leaves the bundle" in one_line_error(edgeq("verify", d))
    (tmp_path / "junk.tar.gz").write_bytes(os.urandom(200))
    assert "not a readable tar archive" in one_line_error(edgeq("verify", tmp_path / "junk.tar.gz"))
    assert "bundle not found" in one_line_error(edgeq("verify", tmp_path / "nope"))


def test_publish_refuses_paths_that_escape_the_build(two_builds, tmp_path):
    import shutil

    root, _ = two_builds
    build = tmp_path / "build"
    shutil.copytree(root / "artifacts" / "tiny-bert" / "x86_64", build)
    manifest_path = build / "manifest.json"
    original = manifest_path.read_text()
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    for bad in ("../secret.txt", str(secret), "tokenizer/../../secret.txt"):
        m = json.loads(original)
        m["files"].append({"path": bad, "sha256": sha(secret), "size_bytes": 6})
        manifest_path.write_text(json.dumps(m))
        # refused when the manifest is read (core._manifest_problem), before publish looks at a file
        assert f"has path {bad!r} outside the build" in one_line_error(edgeq("publish", build, "--to", tmp_path / "o.tar.gz"))
    # a shipped file replaced by a symlink to a file outside
    manifest_path.write_text(original)
    (build / "config.json").unlink()
    (build / "config.json").symlink_to(secret)
    assert "outside" in one_line_error(edgeq("publish", build, "--to", tmp_path / "o.tar.gz"))
    assert not (tmp_path / "o.tar.gz").exists()
    # a file changed after the build
    (build / "config.json").unlink()
    shutil.copyfile(root / "artifacts" / "tiny-bert" / "x86_64" / "config.json", build / "config.json")
    with open(build / "model.int8-static.onnx", "ab") as f:
        f.write(b"\0")
    assert "does not match its manifest checksum" in one_line_error(edgeq("publish", build, "--to", tmp_path / "o"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# --- lock and resume ----------------------------------------------------------------------------

def test_a_second_build_of_the_same_directory_is_refused(tiny_bert, tmp_path):
    from edgeq.build import build_lock

    final = tmp_path / "tiny-bert" / "x86_64"
    final.parent.mkdir(parents=True)
    with build_lock(final):
        r = edgeq("build", tiny_bert, "-o", tmp_path, *FAST)
        assert "another edgeq build" in one_line_error(r) and str(os.getpid()) in r.stderr
    assert not (final.parent / ".x86_64.lock").exists()  # released and removed
    assert not final.exists()


def _kill_at(args: list, marker: str, sig=signal.SIGKILL) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgeq", *map(str, args)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    time.sleep(0.3)
    proc.send_signal(sig)
    seen.append(proc.stderr.read())
    return proc.wait(timeout=120), "".join(seen)


def test_a_killed_build_resumes_from_its_finished_stages(tiny_bert, tmp_path):
    out = tmp_path / "out"
    args = ["build", tiny_bert, "-o", out, *FAST]
    code, log = _kill_at(args, "[4/8] quantize")
    assert code == -signal.SIGKILL, log
    assert not any(out.rglob("manifest.json")), "a killed build must not look complete"
    assert not (out / "tiny-bert" / "x86_64").exists()
    partial = out / "tiny-bert" / ".x86_64.partial"
    assert (partial / "model.fp32.onnx").is_file()  # the fp32 artifact is kept
    r = edgeq(*args)
    assert r.returncode == 0, r.stderr
    resumed = [s for s in ("export", "optimize", "calibrate", "quantize", "precision", "evaluate")
               if f"{s}: done before the interruption (resumed)" in r.stderr]
    assert resumed[:3] == ["export", "optimize", "calibrate"]  # killed in quantize or a little later
    assert "[1/8] export ..." not in r.stderr and "[7/8] benchmark ..." in r.stderr
    assert not partial.exists() and not (out / "tiny-bert" / ".x86_64.lock").exists()
    # the resumed build is the same as one that was never interrupted
    fresh = edgeq("build", tiny_bert, "-o", tmp_path / "fresh", *FAST, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    for name in ("model.fp32.onnx", "model.int8-static.onnx", "model.int8-dynamic.onnx"):
        assert sha(out / "tiny-bert" / "x86_64" / name) == sha(tmp_path / "fresh" / "tiny-bert" / "x86_64" / name)
    m = json.loads((out / "tiny-bert" / "x86_64" / "manifest.json").read_text())
    assert m["run"]["stages"]["stage=export"]["resumed"] is True
    assert not any(f["path"].startswith(".") for f in m["files"])


def test_sigterm_keeps_finished_stages_and_other_settings_start_over(tiny_bert, tmp_path):
    out = tmp_path / "out"
    code, log = _kill_at(["build", tiny_bert, "-o", out, *FAST], "[3/8] calibrate", sig=signal.SIGTERM)
    assert code == 130 and "interrupted" in log and "Traceback" not in log, log
    assert "the same build resumes" in log
    partial = out / "tiny-bert" / ".x86_64.partial"
    assert partial.is_dir() and not any(out.rglob("manifest.json"))
    # different settings: the finished stages don't match, so it starts over
    r = edgeq("build", tiny_bert, "-o", out, *FAST, "--max-length", "64")
    assert r.returncode == 0, r.stderr
    assert "resumed" not in r.stderr and "[1/8] export ..." in r.stderr


def test_a_changed_file_is_redone_on_resume(tiny_bert, tmp_path):
    out = tmp_path / "out"
    args = ["build", tiny_bert, "-o", out, *FAST]
    _kill_at(args, "[6/8] evaluate")
    partial = out / "tiny-bert" / ".x86_64.partial"
    assert partial.is_dir()
    # damage what quantize wrote: quantize (and what follows) must run again, not trust it
    target = partial / "model.int8-dynamic.onnx"
    target.write_bytes(b"damaged")
    r = edgeq(*args)
    assert r.returncode == 0, r.stderr
    assert "calibrate: done before the interruption (resumed)" in r.stderr
    assert "[4/8] quantize ..." in r.stderr
    import onnx

    onnx.checker.check_model(str(out / "tiny-bert" / "x86_64" / "model.int8-dynamic.onnx"))


def test_report_command_writes_html_and_markdown(two_builds, tmp_path):
    root, _ = two_builds
    r = edgeq("report", root / "artifacts" / "tiny-bert", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count('class="edgeq-plot"') >= 2 and "x86_64" in html
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "](report-plots/" in md
    assert "no edgeq build in" in one_line_error(edgeq("report", tmp_path / "rep"))  # a folder without builds
    assert one_line_error(edgeq("report", tmp_path / "missing")).startswith("edgeq: error:")


def test_a_kill_between_the_handover_renames_never_leaves_neither_build(tiny_build, tmp_path):
    """Killed after the old build was moved aside and before the new one was moved in: the next
    build's start puts the finished new build in place, or else the old one back."""
    from edgeq.build import _HOST, _recover_handover
    from edgeq.core import load_manifest

    src = Path(tiny_build["build_dir"])
    for finished in (True, False):
        root = tmp_path / ("new" if finished else "old") / "tiny-bert"
        final = root / "x86_64"
        old = root / f".x86_64.old-{_HOST}-999999"  # a dead process's
        shutil.copytree(src, old)
        if finished:
            shutil.copytree(src, root / ".x86_64.partial")
            (root / ".x86_64.partial" / "marker").write_text("new")
        _recover_handover(final)
        assert (final / "manifest.json").is_file()
        assert (final / "marker").is_file() == finished
        assert load_manifest(final)["model"]["name"] == "tiny-bert"
    # a partial that never finished (checkpoints, no manifest) is not mistaken for a build
    root = tmp_path / "unfinished" / "tiny-bert"
    (root / ".x86_64.partial" / ".checkpoints").mkdir(parents=True)
    _recover_handover(root / "x86_64")
    assert not (root / "x86_64").exists()


MANIFEST_DAMAGE = {
    "artifacts not a list": (lambda m: m.__setitem__("artifacts", {"a": 1}), "its artifacts section is missing or not a list"),
    "artifact without path": (lambda m: [a.pop("path") for a in m["artifacts"]], "artifacts[0] is not an object with name and path"),
    "artifact a string": (lambda m: m.__setitem__("artifacts", ["x"]), "artifacts[0] is not an object with name and path"),
    "stages an object": (lambda m: m.__setitem__("stages", {"x": 1}), "its stages section is missing or not a list"),
    "files a string": (lambda m: m.__setitem__("files", "x"), "its files section is missing or not a list"),
    "file without sha256": (lambda m: [f.pop("sha256") for f in m["files"]], "files[0] is not an object with path and sha256"),
    "no model section": (lambda m: m.__setitem__("model", 3), "its model section is missing or not an object"),
    "no target section": (lambda m: m.pop("target"), "its target section is missing or not an object"),
    "no tool section": (lambda m: m.pop("tool"), "its tool section is missing or not an object"),
    "path outside": (lambda m: m["artifacts"][0].__setitem__("path", "../../etc/passwd"),
                     "artifacts[0] has path '../../etc/passwd' outside the build"),
    "metrics a string": (lambda m: m["artifacts"][0].__setitem__("metrics", "x"), "artifacts[0].metrics is not an object"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_damaged_manifest_is_one_line_exit_2_for_every_reader(tiny_build, tmp_path, damage, capsys, monkeypatch):
    """A hand-edited manifest (valid JSON, right schema, wrong shape) made inspect, publish and
    report fail with an internal error (exit 1, a KeyError or TypeError); each now says what is
    wrong, in one line, exit 2, and writes nothing."""
    import signal as _signal

    from edgeq.cli import main

    change, message = MANIFEST_DAMAGE[damage]
    d = tmp_path / "build"
    shutil.copytree(tiny_build["build_dir"], d)
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))
    handlers = {s: _signal.getsignal(s) for s in (_signal.SIGTERM, _signal.SIGINT)}
    try:
        for args in (["inspect", str(d)], ["inspect", str(d), "--json"],
                     ["publish", str(d), "--to", str(tmp_path / "b.tar.gz")],
                     ["report", str(d), "-o", str(tmp_path / "rep")], ["generate", str(d), "hi"]):
            monkeypatch.setattr(sys, "argv", ["edgeq", *args])
            with pytest.raises(SystemExit) as e:
                main()
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2, (args, err)
            assert err == [f"edgeq: error: {d / 'manifest.json'}: not an edgeq manifest ({message})"], (args, err)
    finally:
        for s, h in handlers.items():
            _signal.signal(s, h)
    assert not (tmp_path / "b.tar.gz").exists() and not (tmp_path / "rep").exists()
