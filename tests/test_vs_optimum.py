"""benchmarks/vs_optimum.py on the tiny BERT: `edgeq build` in a subprocess, Optimum's export and three of
its presets, one interleaved latency run, fidelity against edgeq's fp32."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_optimum.py"


def _load():
    spec = importlib.util.spec_from_file_location("vs_optimum", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vs():
    return _load()


def test_compares_edgeq_and_optimum_presets(vs, tiny_bert, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = vs.main([
        "--model", str(tiny_bert), "--work", str(tmp_path / "work"), "--presets",
        "avx2-dynamic,arm64-static-pc,avx2-static-percentile",
        "--runs", "5", "--warmup", "1", "--calib-samples", "32", "--eval-samples", "16", "--json-out", str(out),
    ])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert next(iter(rows)) == "edgeq fp32"  # the one reference, first in the interleaved run
    assert {"edgeq fp32", "edgeq int8-static", "edgeq int8-dynamic", "edgeq int8-hybrid", "optimum fp32",
            "optimum avx2-dynamic", "optimum arm64-static-pc"} <= set(rows)
    assert rows["edgeq fp32"]["speedup_vs_fp32"] == 1.0
    assert rows["edgeq fp32"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["optimum fp32"]["cosine"] > 0.999  # both exports are the same function
    for r in rows.values():
        if r["tool"] == "optimum" and "error" in r:  # a preset Optimum cannot apply is reported in its row
            assert isinstance(r["error"], str) and r["error"]
            continue
        assert "error" not in r, r
        for k in ("latency_p50_ms", "speedup_vs_fp32", "cosine", "cosine_min", "size_bytes", "build_seconds"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["name"], k, r.get(k))
        assert r["runs"] == 5
    assert rows["optimum arm64-static-pc"]["preset"]["resolved"]["per_channel"] is True
    # onnxruntime's percentile calibration fails on BERT graphs ("Too many bins for data range", ORT 1.32);
    # whichever way it goes, the preset has its own row and the others are measured
    assert "optimum avx2-static-percentile" in rows
    assert len(result["summary"]["goals"]) == 3
    assert all(isinstance(g["met"], bool) and g["detail"] for g in result["summary"]["goals"])
    # the printed table has a line per row and the goals
    for name in rows:
        assert f"| {name} " in printed.out
    for r in rows.values():
        if "error" in r:
            assert f"error: {r['error']}" in printed.out
    assert printed.out.count("goal ") == 3


def test_bad_preset_is_one_line_error(vs, capsys):
    assert vs.main(["--presets", "avx2-dynamic-percentile", "--build-dir", "/nonexistent"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vs_optimum: preset 'avx2-dynamic-percentile': -percentile is a calibration method, for static "
                   "presets only"]


def test_missing_build_dir_is_one_line_error(vs, capsys, tmp_path):
    assert vs.main(["--build-dir", str(tmp_path / "none"), "--work", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vs_optimum: artifact directory not found")
