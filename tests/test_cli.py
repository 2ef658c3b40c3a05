"""The command line as a user and CI see it: exit codes, one-line errors, --json contract."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import disk_manifest, FAST


def edgeq(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def fast_args():
    return ["--runs", str(FAST["runs"]), "--calib-samples", str(FAST["calib_samples"]),
            "--eval-samples", str(FAST["eval_samples"])]


def assert_user_error(r, fragment, out: Path | None = None, progress_allowed=False):
    """Exit 2, no traceback, and the error as one line (the only line, unless the build had started
    and printed progress before the error surfaced)."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    if progress_allowed:
        assert all(ln.startswith("[") or ln.startswith("  ") for ln in lines[:-1]), r.stderr
    else:
        assert len(lines) == 1, r.stderr
    assert lines[-1].startswith("edgeq: error:") and fragment in lines[-1], lines[-1]
    assert "Traceback" not in r.stderr and r.stdout == ""
    if out is not None:
        assert not out.exists() or not any(out.rglob("manifest.json"))


@pytest.fixture(scope="module")
def corrupt_onnx(tmp_path_factory):
    p = tmp_path_factory.mktemp("bad") / "broken.onnx"
    p.write_bytes(b"\x08\x07this is not an onnx model")
    return p


def test_user_errors_are_one_line_exit_2(tiny_bert, corrupt_onnx, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    empty.with_suffix(".toml").write_text("name = 'x'\n")
    json_calib = tmp_path / "c.json"
    json_calib.write_text('[{"text": "a"}]')
    not_object, decoder, no_tokenizer = (tmp_path / n for n in ("listcfg", "gpt", "notok"))
    for d, cfg in ((not_object, "[]"), (decoder, '{"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": true}')):
        d.mkdir()
        (d / "config.json").write_text(cfg)
    shutil.copytree(tiny_bert, no_tokenizer, ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*"))
    cases = [
        (["build", str(tmp_path / "missing"), "-o", str(out)], "model not found"),
        (["build", str(tiny_bert), "--target", "riscv", "-o", str(out)], "unknown target 'riscv'"),
        (["build", str(tiny_bert), "--mode", "fp8", "-o", str(out)], "unknown mode 'fp8'"),
        (["build", str(tiny_bert), "--target", str(tmp_path / "mine.toml"), "-o", str(out)],
         "cannot read target profile"),
        (["build", str(tiny_bert), "--target", str(empty.with_suffix(".toml")), "-o", str(out)],
         "invalid target profile"),
        (["build", str(tiny_bert), "--calib", str(tmp_path / "nope.txt"), "-o", str(out)], "calibration file not found"),
        (["build", str(tiny_bert), "--calib", str(tmp_path), "-o", str(out)], "calibration path is not a file"),
        (["build", str(tiny_bert), "--calib-method", "magic", "-o", str(out)], "unknown calibration method"),
        (["build", str(tiny_bert), "--runs", "0", "-o", str(out)], "--runs must be at least 1"),
        (["build", str(tmp_path), "-o", str(out)], "not a Hugging Face model directory"),
        (["build", str(empty), "-o", str(out)], "expected a Hugging Face model directory, an .onnx or a .gguf file"),
        (["build", "--bogus-flag"], "No such option"),
        (["build", str(tiny_bert), "--name", "../escape", "-o", str(out)], "can't be a folder name"),
        (["build", str(tiny_bert), "--name", "/abs/evil", "-o", str(out)], "can't be a folder name"),
        (["build", str(tiny_bert), "--name", "..", "-o", str(out)], "can't be a folder name"),
        (["build", str(tiny_bert), "-o", str(empty)], "exists and is not a directory"),
        (["build", str(tiny_bert), "--calib", str(json_calib), "-o", str(out)], "unsupported format '.json'"),
        (["build", str(tiny_bert), "--seq-len", "1000", "-o", str(out)], "exceeds the model's 128 positions"),
        (["build", str(not_object), "-o", str(out)], "expected a JSON object"),
        (["build", str(decoder), "-o", str(out)], "is an encoder-decoder model"),
        (["build", str(no_tokenizer), "-o", str(out)], "no tokenizer files"),
        (["nocommand"], "No such command"),
    ]
    for args, fragment in cases:
        assert_user_error(edgeq(*args), fragment, out)


def test_errors_found_mid_build_leave_nothing_complete(tiny_bert, corrupt_onnx, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert_user_error(edgeq("build", str(corrupt_onnx), "-o", str(out)), "is not a valid ONNX model", out)
    assert_user_error(edgeq("build", str(tiny_bert), "--calib", str(empty), "-o", str(out), *fast_args()),
                      "calibration file has no samples", out)
    # no staging leftovers either
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_failed_rebuild_keeps_previous_complete_build(tiny_bert, tmp_path):
    out = tmp_path / "out"
    ok = edgeq("build", str(tiny_bert), "-o", str(out), "--mode", "dynamic", *fast_args())
    assert ok.returncode == 0, ok.stderr
    manifest = out / "tiny-bert" / "x86_64" / "manifest.json"
    before = manifest.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    r = edgeq("build", str(tiny_bert), "-o", str(out), "--calib", str(bad), *fast_args())
    assert_user_error(r, "bad.jsonl:2: invalid JSON")
    # an error that only shows mid-build (here: an exporter failure) must not replace the build either
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    r = edgeq("build", str(broken), "--name", "tiny-bert", "-o", str(out), *fast_args())
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgeq: ")
    assert manifest.read_bytes() == before
    # no partial build left beside it (.cache: the calibration cache builds of this model share)
    assert sorted(p.name for p in (out / "tiny-bert").iterdir()) in (["x86_64"], [".cache", "x86_64"])


def test_json_contract(tiny_bert, tmp_path):
    r = edgeq("build", str(tiny_bert), "--json", "-o", str(tmp_path), "--target", "x86_64", *fast_args())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is exactly one JSON object
    assert doc["manifest"] == str(tmp_path / "tiny-bert" / "x86_64" / "manifest.json")
    assert Path(doc["manifest"]).is_file()
    names = [a["name"] for a in doc["artifacts"]]
    assert names == ["fp32", "int8-static", "int8-dynamic"]
    for a in doc["artifacts"]:
        assert set(a) >= {"name", "path", "sha256", "size_bytes", "precision", "metrics"}
        assert Path(a["path"]).is_file() and Path(a["path"]).stat().st_size == a["size_bytes"]
        assert {"cosine", "latency_p50_ms", "speedup_vs_fp32"} <= set(a["metrics"])
    assert "[8/8] package" in r.stderr and "speedup" in r.stderr  # progress and table on stderr


def test_onnx_input_with_external_data(tiny_build, tmp_path):
    """A user's .onnx (weights in an external file) with its tokenizer beside it."""
    export_dir = Path(tiny_build["build_dir"]) / "work" / "export"
    src = tmp_path / "user"
    shutil.copytree(export_dir, src)
    model = onnx.load(str(src / "model.onnx"))
    (src / "model.onnx").unlink()
    onnx.save_model(model, str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (src / "model.onnx.data").stat().st_size > 100_000
    r = edgeq("build", str(src / "model.onnx"), "--name", "user-model", "-o", str(tmp_path / "out"), "--json",
              *fast_args())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    m = disk_manifest(Path(doc["manifest"]))
    assert m["model"]["kind"] == "onnx" and m["stages"][0]["metrics"]["checker"] == "passed"
    assert {a["name"] for a in doc["artifacts"]} == {"fp32", "int8-static", "int8-dynamic"}
    assert "work/export/model.onnx.data" in {f["path"] for f in m["files"]}


def test_onnx_without_tokenizer_needs_one(tiny_build, tmp_path):
    src = tmp_path / "bare.onnx"
    shutil.copyfile(Path(tiny_build["build_dir"]) / "model.fp32.onnx", src)
    r = edgeq("build", str(src), "-o", str(tmp_path / "out"), *fast_args())
    assert_user_error(r, "has no tokenizer beside it", tmp_path / "out")


def test_npz_data_must_fit_the_model(tiny_build, tmp_path):
    """.npz tensors for an .onnx model: checked against the model's inputs, and when one file serves
    calibration and evaluation, evaluation gets samples calibration did not see."""
    import numpy as np

    src = Path(tiny_build["build_dir"]) / "model.fp32.onnx"
    z = dict(np.load(Path(tiny_build["build_dir"]) / "work/bench_inputs.npz"))
    data = tmp_path / "data.npz"
    np.savez(data, **{k: np.repeat(v[:, :16], 8, axis=0) for k, v in z.items()})
    r = edgeq("build", str(src), "--name", "npz-model", "--calib", str(data), "--eval", str(data),
              "-o", str(tmp_path / "out"), "--json", "--runs", "3")
    assert r.returncode == 0, r.stderr
    m = disk_manifest(Path(json.loads(r.stdout)["manifest"]))
    ev = next(s for s in m["stages"] if s["stage"] == "evaluate")
    assert ev["settings"]["samples"] == 2 and ev["metrics"]["overlap_with_calibration_removed"] == 6
    assert next(s for s in m["stages"] if s["stage"] == "calibrate")["settings"]["samples"] == 6
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v.astype(np.float32) for k, v in z.items()})
    r = edgeq("build", str(src), "--calib", str(bad), "--eval", str(data), "-o", str(tmp_path / "o2"))
    assert_user_error(r, "is float32, the model takes int64", progress_allowed=True)
    big = tmp_path / "big.npz"
    np.savez(big, **{k: (v + 10_000) if k == "input_ids" else v for k, v in z.items()})
    r = edgeq("build", str(src), "--calib", str(big), "--eval", str(data), "-o", str(tmp_path / "o3"))
    assert_user_error(r, "the model fails on calibration batch 1", progress_allowed=True)
    assert "\x1b[" not in r.stderr  # no coloured ORT log lines


def test_external_data_in_a_subfolder(tiny_build, tmp_path):
    export_dir = Path(tiny_build["build_dir"]) / "work" / "export"
    src = tmp_path / "user"
    shutil.copytree(export_dir, src)
    model = onnx.load(str(src / "model.onnx"))
    (src / "model.onnx").unlink()
    (src / "weights").mkdir()
    onnx.save_model(model, str(src / "model.onnx"), save_as_external_data=True, location="weights/w.bin",
                    size_threshold=0)
    r = edgeq("build", str(src / "model.onnx"), "--name", "sub", "-o", str(tmp_path / "out"), "--mode", "dynamic",
              "--runs", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out/sub/x86_64/work/export/weights/w.bin").is_file()


def test_no_arguments_prints_help():
    r = edgeq()
    assert r.returncode == 0 and "build" in r.stdout and r.stderr == ""


def test_unused_calibration_ranges_do_not_ship(tiny_bert, tmp_path):
    out = tmp_path / "out"
    assert edgeq("build", str(tiny_bert), "-o", str(out), "--calib-method", "entropy", *fast_args()).returncode == 0
    r = edgeq("build", str(tiny_bert), "-o", str(out), "--mode", "dynamic", *fast_args())
    assert r.returncode == 0, r.stderr
    b = out / "tiny-bert" / "x86_64"
    # a dynamic build calibrates only for SmoothQuant's statistics, with the target's method: the
    # earlier build's entropy ranges are neither left in the directory nor listed
    m = disk_manifest(b / "manifest.json")
    shipped = sorted(f["path"] for f in m["files"] if f["path"].startswith("calibration/"))
    assert sorted(str(p.relative_to(b)) for p in (b / "calibration").iterdir()) == shipped
    assert "calibration/ranges-minmax.absmax.npz" in shipped and not [p for p in shipped if "entropy" in p]


def test_targets_command_lists_profiles():
    r = edgeq("targets")
    assert r.returncode == 0
    for name in ("arm64", "x86_64", "x86_64-vnni", "cuda", "tensorrt", "xnnpack", "nnapi", "coreml"):
        assert f"\n{name} " in "\n" + r.stdout, name
    assert "uint8/int8" in r.stdout


def test_sigterm_mid_build_leaves_nothing_complete(tiny_bert, tmp_path):
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edgeq", "build", str(tiny_bert), "-o", str(out), *fast_args()],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # wait until the build is inside a stage (the line is written as the stage starts), then
    # terminate it at once: a delay let the tiny model's optimize stage finish and the calibrate
    # stage write its cache first on a loaded machine (seen once in a full-suite run)
    for line in proc.stderr:
        if "[2/8] optimize" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert not any(out.rglob("manifest.json"))
    # what finished is kept, hidden, for the next run to resume (tests/test_release.py); nothing else
    assert {p.relative_to(out).parts[:2] for p in out.rglob("*") if p.is_file()} == {("tiny-bert", ".x86_64.partial")}


def test_abandoned_staging_dirs_are_cleaned(tiny_bert, tmp_path):
    out = tmp_path / "out"
    from edgeq.build import _HOST

    stale = out / "tiny-bert" / f".x86_64.staging-{_HOST}-999999"
    stale.mkdir(parents=True)
    (stale / "model.fp32.onnx").write_bytes(b"half")
    other_host = out / "tiny-bert" / ".x86_64.staging-otherhost-999999"  # maybe alive elsewhere
    other_host.mkdir()
    r = edgeq("build", str(tiny_bert), "-o", str(out), "--mode", "dynamic", *fast_args())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "tiny-bert").iterdir() if p.name != ".cache") == [other_host.name, "x86_64"]


def test_a_full_disk_is_a_user_error_not_an_internal_one(monkeypatch, capsys, tmp_path):
    """ENOSPC from a write that names no file (a library's write()) is still the disk, not a bug."""
    import errno

    import edgeq.config
    from edgeq import cli

    def full(**kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edgeq.config, "resolve_config", full)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)  # keep this process's own handlers
    monkeypatch.setattr(sys, "argv", ["edgeq", "config", "-o", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("edgeq: error: No space left on device") and "internal" not in err


def test_bad_onnx_and_data_shapes_are_user_errors(tiny_build, tmp_path):
    """Found by bad-input probing (issue 17, part 5): each of these was exit 1 with ORT's C++ error
    or a Python IndexError; now one line, exit 2, and nothing complete is left."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    x = helper.make_tensor_value_info("x", T.FLOAT, ["b", 4])
    w = helper.make_tensor("w", T.FLOAT, [4, 4], np.ones(16, np.float32).tolist())
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).random((8, 4), np.float32))
    scalar = tmp_path / "scalar.onnx"  # every output a scalar: no per-sample comparison possible
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("ReduceSum", ["h"], ["y"], keepdims=0)],
        "g", [x], [helper.make_tensor_value_info("y", T.FLOAT, [])], [w]),
        opset_imports=[helper.make_opsetid("", 17)]), str(scalar))
    r = edgeq("build", str(scalar), "--calib", str(data), "--eval", str(data), "-o", str(tmp_path / "o1"))
    assert_user_error(r, "scalar.onnx: every output is a scalar (y)", out=tmp_path / "o1")
    future = tmp_path / "future.onnx"  # an opset newer than the installed onnxruntime runs
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")], "g", [x],
                                            [helper.make_tensor_value_info("h", T.FLOAT, ["b", 4])], [w]),
                          opset_imports=[helper.make_opsetid("", 40)])
    m.ir_version = 10
    onnx.save(m, str(future))
    r = edgeq("build", str(future), "--calib", str(data), "--eval", str(data), "-o", str(tmp_path / "o2"))
    assert_user_error(r, "future.onnx uses ONNX opset 40; onnxruntime", out=tmp_path / "o2")
    # a zero-length sequence axis: ORT's out-of-bounds Gather deep inside the model, before
    src = Path(tiny_build["build_dir"]) / "model.fp32.onnx"
    z = dict(np.load(Path(tiny_build["build_dir"]) / "work/bench_inputs.npz"))
    empty = tmp_path / "empty.npz"
    np.savez(empty, **{k: np.repeat(v[:, :0], 4, axis=0) for k, v in z.items()})
    r = edgeq("build", str(src), "--calib", str(empty), "--eval", str(empty), "-o", str(tmp_path / "o3"))
    assert_user_error(r, "'input_ids' has shape [4, 0]: every sample needs at least one element", progress_allowed=True,
                      out=tmp_path / "o3")
