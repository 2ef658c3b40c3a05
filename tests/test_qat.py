"""--mode qat: distillation fine-tuning under the static recipe's fake quantization, the int8-qat
artifact built from the tuned weights and learnt ranges, and its settings checked before a build."""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_build


@pytest.fixture(scope="module")
def qat_build(tiny_bert, tmp_path_factory):
    return run_build(tiny_bert, tmp_path_factory.mktemp("qat") / "out", target="x86_64", modes=("static", "qat"),
                     qat_steps=12, qat_batch_size=8, qat_lr=1e-3)


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_qat_artifact_is_the_static_recipe_on_tuned_weights(qat_build):
    m = qat_build
    d = Path(m["build_dir"])
    arts = {a["name"]: a for a in m["artifacts"]}
    assert set(arts) == {"fp32", "int8-static", "int8-qat"}
    qat = arts["int8-qat"]
    assert qat["recipe"]["mode"] == "qat" and qat["precision"] == "int8"
    s = qat["recipe"]["qat"]
    assert s["steps"] == 12 and s["batch_size"] == 8 and s["seed"] == 0 and s["fake_quantized_linears"] > 0
    assert 0 < s["static"] < s["fake_quantized_linears"] and s["learnt_ranges"] >= s["static"]
    assert np.isfinite(s["loss_first"]) and np.isfinite(s["loss_last"])
    # the same graph as int8-static (same nodes, fusions, kernels), different numbers
    assert _ops(d / "model.int8-qat.onnx") == _ops(d / "model.int8-static.onnx")
    assert qat["metrics"]["cosine"] > 0.9 and "p50_ms" in json.dumps(qat["metrics"])
    # the learnt ranges replace the calibrated ones in the artifact's calibration cache, only there
    calibrated = json.loads((d / "calibration" / "ranges-minmax.json").read_text())["data"]
    learnt = json.loads((d / "calibration" / "ranges-qat.json").read_text())["data"]
    assert calibrated.keys() == learnt.keys()
    moved = [k for k in learnt if learnt[k]["lowest"]["data"] != calibrated[k]["lowest"]["data"]
             or learnt[k]["highest"]["data"] != calibrated[k]["highest"]["data"]]
    assert len(moved) == s["learnt_ranges"]
    # the artifact's activation scales are the learnt ones: scale = (max - min) / 255
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "model.int8-qat.onnx")).graph.initializer
              if i.name.endswith("_scale") and i.name[:-len("_scale")] in learnt}
    assert scales
    for name, v in scales.items():
        r = learnt[name[:-len("_scale")]]
        assert float(v) == pytest.approx((r["highest"]["data"] - r["lowest"]["data"]) / 255, rel=1e-5)
    # the tuned fp32 graph differs from the export in its Linear weights, nothing else
    tuned = onnx.load(str(d / "work" / "model.qat-fp32.onnx"))
    fp32 = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(d / "model.fp32.onnx")).graph.initializer}
    changed = [i.name for i in tuned.graph.initializer if not np.array_equal(onnx.numpy_helper.to_array(i), fp32[i.name])]
    assert changed and not [n for n in changed if "LayerNorm" in n or "embeddings" in n]
    assert "model.int8-qat.onnx" in {f["path"] for f in m["files"]}


def test_emulation_matches_the_static_artifact(qat_build, tiny_bert):
    """Before any training, the fake-quantized PyTorch model computes what ONNX Runtime's int8-static
    artifact computes: its distance to the artifact is a small part of fp32's distance to it."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edgeq.pipeline.ops import qat, smooth
    from edgeq.pipeline.ops.static_plan import static_plan
    from edgeq.targets import load

    d = Path(qat_build["build_dir"])
    r = load("x86_64").static_for("encoder")
    model = onnx.load(str(d / "model.fp32.onnx"))
    kept, quantized = static_plan(model, r)
    kept_names = {k["node"] for k in kept}
    dynamic = {n.name for n in model.graph.node if n.op_type in ("Attention", "MatMul", "EmbedLayerNormalization")
               and (n.name in kept_names or n.op_type != "MatMul")}
    cache = json.loads((d / "calibration" / "ranges-minmax.json").read_text())["data"]
    ranges = {k: (v["lowest"]["data"], v["highest"]["data"]) for k, v in cache.items()}
    absmax = smooth.load_absmax(d / "calibration" / "ranges-minmax.absmax.npz")
    teacher = AutoModel.from_pretrained(str(tiny_bert)).eval()
    sites = qat.plan(model, teacher, set(quantized), ranges, absmax, r.smooth_alpha, 0.75, set(quantized), dynamic)
    linears = [n for n, x in teacher.named_modules() if isinstance(x, torch.nn.Linear) and "pooler" not in n]
    assert sorted(s.linear for s in sites) == sorted(linears)  # q/k/v found inside the packed Attention weight
    student = qat.emulate(copy.deepcopy(teacher), sites, r.reduce_range).eval()
    assert len(qat.quantize_tables(model, student, dynamic)) == 5  # word, position, segment, LayerNorm x2
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    sess = ort.InferenceSession(str(d / "model.int8-static.onnx"), providers=["CPUExecutionProvider"])
    near, far = [], []
    for text in ["the quick brown fox jumps over the lazy dog", "a second sentence, somewhat longer than that one",
                 "models are small"]:
        e = tok([text], return_tensors="np")
        feeds = {i.name: e[i.name].astype(np.int64) for i in sess.get_inputs()}
        art = sess.run(None, feeds)[0]
        with torch.no_grad():
            t = {k: torch.from_numpy(v) for k, v in feeds.items()}
            emu, ref = student(**t).last_hidden_state.numpy(), teacher(**t).last_hidden_state.numpy()
        near.append(np.abs(emu - art).mean())
        far.append(np.abs(ref - art).mean())
    assert np.mean(near) < 0.5 * np.mean(far), (near, far)


def test_qat_is_deterministic_for_a_seed(tiny_bert, qat_build, tmp_path):
    again = run_build(tiny_bert, tmp_path / "out", target="x86_64", modes=("static", "qat"),
                      qat_steps=12, qat_batch_size=8, qat_lr=1e-3)

    def sha(m):
        return hashlib.sha256((Path(m["build_dir"]) / "model.int8-qat.onnx").read_bytes()).hexdigest()

    assert sha(again) == sha(qat_build)


def test_bad_qat_settings_exit_2(tiny_bert, qat_build, tmp_path):
    onnx_file = Path(qat_build["build_dir"]) / "model.fp32.onnx"
    for args, message in [
        ([str(tiny_bert), "--mode", "qat", "--qat-steps", "0"], "--qat-steps must be at least 1"),
        ([str(tiny_bert), "--mode", "qat", "--qat-lr", "0"], "--qat-lr must be between 0 and 1"),
        ([str(tiny_bert), "--mode", "qat", "--qat-scale-lr", "nan"], "--qat-scale-lr must be between 0 and 1"),
        ([str(tiny_bert), "--mode", "qat", "--qat-batch-size", "0"], "--qat-batch-size must be at least 1"),
        ([str(tiny_bert), "--qat-steps", "10"], "this build makes no int8-qat artifact (add --mode qat)"),
        ([str(onnx_file), "--tokenizer", str(onnx_file.parent / "tokenizer"), "--mode", "qat"],
         "--mode qat fine-tunes the PyTorch model: it needs a Hugging Face encoder directory"),
    ]:
        r = subprocess.run([sys.executable, "-m", "edgeq", "build", *args, "--out", str(tmp_path)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not list(tmp_path.rglob("manifest.json"))
