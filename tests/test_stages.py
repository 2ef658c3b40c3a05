"""Per-stage checks on the tiny BERT build (fixture `tiny_build`) and on the stage helpers."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import disk_manifest

from edgeq.core import EdgeqError, sha256_file


def _bdir(manifest) -> Path:
    return Path(manifest["build_dir"])


def _stage(manifest, name):
    return next(s for s in manifest["stages"] if s["stage"] == name)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# -- export -------------------------------------------------------------------------------------

def test_export_is_validated_against_pytorch(tiny_build):
    m = _stage(tiny_build, "export")["metrics"]
    assert m["validation_samples"] == 8
    assert 0 <= m["max_abs_diff"] < 1e-4
    assert list(m["weights_sha256"]) == ["model.safetensors"]


def test_check_onnx_rejects_garbage(tmp_path):
    from edgeq.intake import check_onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(EdgeqError, match="is not a valid ONNX model"):
        check_onnx(bad)


def test_infer_task_from_architectures():
    from edgeq.pipeline.export import infer_task

    assert infer_task({"architectures": ["BertForSequenceClassification"]}) == "text-classification"
    assert infer_task({"architectures": ["BertModel"]}) == "feature-extraction"
    assert infer_task({}) == "feature-extraction"


# -- optimize -----------------------------------------------------------------------------------

def test_optimize_fuses_transformer_blocks(tiny_build):
    m = _stage(tiny_build, "optimize")["metrics"]
    assert m["fused_ops"] == {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2, "SkipLayerNormalization": 4}
    assert m["nodes_after"] < m["nodes_before"] / 3
    ops = _ops(_bdir(tiny_build) / "model.fp32.onnx")
    assert ops["Attention"] == 2 and ops["MatMul"] == 6
    # x86_64 writes SkipLayerNormalization back as Sum + LayerNormalization (ORT's faster CPU kernels)
    assert ops["LayerNormalization"] == 4 and ops["Sum"] == 4 and "SkipLayerNormalization" not in ops
    assert any("Sum + LayerNormalization" in n for n in m["notes"])
    onnx.checker.check_model(str(_bdir(tiny_build) / "model.fp32.onnx"))


def test_unfused_skip_layernorm_computes_the_same_and_is_not_fused_back(tiny_build, tmp_path):
    """The rewrite is exact up to float rounding, and ONNX Runtime's optimizer (which fuses
    Add + LayerNormalization) leaves Sum + LayerNormalization alone."""
    import shutil

    from edgeq.pipeline.optimize import _fuse, unfuse_skip_layernorm

    fused = tmp_path / "fused.onnx"  # onnxruntime.transformers' fused graph, before the rewrite
    _fuse(_bdir(tiny_build) / "work/export/model.onnx", fused, {"model_type": "bert", "num_heads": 2, "hidden_size": 32},
          False)
    assert _ops(fused)["SkipLayerNormalization"] == 4
    ours = tmp_path / "m.onnx"
    shutil.copyfile(fused, ours)
    assert unfuse_skip_layernorm(ours) == 4
    z = dict(np.load(_bdir(tiny_build) / "work/bench_inputs.npz"))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "as-run.onnx")
    outs = []
    for path, opts in ((fused, None), (ours, so)):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {i.name: z[i.name] for i in sess.get_inputs()})[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    as_run = _ops(tmp_path / "as-run.onnx")
    assert as_run.get("LayerNormalization") == 4 and "SkipLayerNormalization" not in as_run


def test_fusion_plan():
    from edgeq.pipeline.optimize import fusion_plan

    assert fusion_plan({"model_type": "bert", "num_attention_heads": 4, "hidden_size": 64}) == \
        {"model_type": "bert", "num_heads": 4, "hidden_size": 64}
    assert fusion_plan({"model_type": "distilbert", "n_heads": 12, "dim": 768})["num_heads"] == 12
    assert fusion_plan({"model_type": "whisper"}) == {}


# -- calibrate ----------------------------------------------------------------------------------

def test_range_collector_minmax_is_exact_across_shapes():
    from edgeq.pipeline.calibrate import RangeCollector

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, n, 8)).astype(np.float32) for n in (5, 17, 9)]
    c = RangeCollector("minmax")
    for b in batches:
        c.add("t", b)
    r = c.result()["t"].range_value
    assert r[0] == np.concatenate([b.ravel() for b in batches]).min()
    assert r[1] == np.concatenate([b.ravel() for b in batches]).max()


@pytest.mark.parametrize("method", ["percentile", "entropy", "distribution"])
def test_histogram_methods_accept_variable_sequence_lengths(method):
    """onnxruntime's own calibrators fail here with 'inhomogeneous shape'."""
    from edgeq.pipeline.calibrate import RangeCollector

    rng = np.random.default_rng(1)
    c = RangeCollector(method, percentile=99.0)
    for n in (5, 17, 9, 30):
        x = rng.normal(size=(2, n, 8)).astype(np.float32)
        x[0, 0, 0] = 50.0  # one outlier per batch
        c.add("t", x)
    lo, hi = (float(v) for v in c.result()["t"].range_value)
    assert lo < 0 < hi
    if method == "percentile":  # clips the outlier
        assert hi < 10


def test_calibration_ranges_cover_quantized_inputs(tiny_build):
    b = _bdir(tiny_build)
    ranges = json.loads((b / "calibration/ranges-minmax.json").read_text())
    assert ranges["calibration_method"]["value"].endswith("MinMax") if isinstance(ranges["calibration_method"], dict) \
        else "MinMax" in str(ranges["calibration_method"])
    model = onnx.load(str(b / "model.fp32.onnx"))
    mm_inputs = {n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    assert mm_inputs <= set(ranges["data"])
    s = _stage(tiny_build, "calibrate")
    assert s["settings"]["samples"] == 32 and s["metrics"]["batches"] == 2


def test_calibration_reused_only_while_inputs_match(tiny_bert, tmp_path):
    from conftest import run_build

    first = run_build(tiny_bert, tmp_path, modes=("static",))
    ranges = Path(first["build_dir"]) / "calibration/ranges-minmax.json"
    digest = sha256_file(ranges)
    again = run_build(tiny_bert, tmp_path, modes=("static",))
    assert _stage(first, "calibrate")["reused"] is False
    assert _stage(again, "calibrate")["reused"] is True
    assert sha256_file(ranges) == digest
    other = run_build(tiny_bert, tmp_path, modes=("static",), calib_samples=16)
    assert _stage(other, "calibrate")["reused"] is False


# -- quantize -----------------------------------------------------------------------------------

def test_static_falls_back_to_dynamic_int8_not_float(tiny_build):
    """x86_64: the post-GELU MatMuls the static recipe keeps out of static int8, and the fused
    Attention QDQ cannot express, become dynamic int8 (smoothed), not fp32."""
    b = _bdir(tiny_build)
    model = onnx.load(str(b / "model.int8-static.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    ops = _ops(b / "model.int8-static.onnx")
    mms = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in mms if producer[n.input[0]].op_type == "DequantizeLinear"]
    assert len(quantized) == 4 and len(mms) == 4  # static QDQ; no float MatMul left
    assert ops["QAttention"] == 2 and ops["Attention"] == 0
    assert ops["MatMulInteger"] == 2  # the two post-GELU MatMuls, per-inference activation scales
    gelu_out = {n.output[0] for n in model.graph.node if n.op_type == "BiasGelu"}
    smooth_muls = [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert {n.input[0] for n in smooth_muls} >= gelu_out  # the outlier channels divided out first
    metrics = _stage(tiny_build, "quantize")["metrics"]["static"]
    settings = _stage(tiny_build, "quantize")["settings"]["static"]
    assert metrics["kept_float"] == []
    assert len(metrics["dynamic_nodes"]) == 2 + 2 + 1  # 2 MatMuls, 2 Attention, the embedding
    assert settings["fallback"]["mode"] == "dynamic" and settings["fallback"]["smoothquant"]["nodes"] == 4
    # x86_64 profile: uint8 activations, int8 per-channel weights
    q_types = {i.data_type for i in model.graph.initializer if i.name.endswith("_zero_point")}
    assert onnx.TensorProto.UINT8 in q_types and onnx.TensorProto.INT8 in q_types


def test_static_nodes_are_smoothed_with_calibrated_smoothed_ranges(tiny_build):
    """x86_64 smooths the statically quantized MatMuls too: the calibrate stage measures the
    smoothed inputs in a second pass, and each static MatMul's input Q/DQ pair quantizes the
    smoothed activation with that range -- the Mul's output, not the raw LayerNorm/Attention one."""
    import json

    b = _bdir(tiny_build)
    static_mms = _stage(tiny_build, "calibrate")["metrics"]["static_smoothed"]
    assert len(static_mms) == 4  # per layer: attention output and FFN up-projection (not post-GELU)
    method = _stage(tiny_build, "calibrate")["settings"]["method"]
    ranges = json.loads((b / "calibration" / f"ranges-{method}.json").read_text())["data"]
    for node in static_mms:  # the second pass measured each smoothed input
        r = ranges[f"{node}_smoothed_input"]
        assert r["lowest"]["data"] < 0 < r["highest"]["data"]
    model = onnx.load(str(b / "model.int8-static.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in static_mms:
        mm = next(n for n in model.graph.node if n.name == node)
        dq = producer[mm.input[0]]
        q = producer[dq.input[0]]
        mul = producer[q.input[0]]
        assert (dq.op_type, q.op_type, mul.op_type, mul.name) == (
            "DequantizeLinear", "QuantizeLinear", "Mul", f"{node}_smooth")
    s = _stage(tiny_build, "quantize")["settings"]["static"]
    assert s["smoothquant"] == {"alpha": 0.75, "nodes": 4}


def test_dynamic_is_smoothed_from_calibration(tiny_build):
    b = _bdir(tiny_build)
    q = _stage(tiny_build, "quantize")
    assert q["settings"]["dynamic"]["smoothquant"] == {"alpha": 0.75, "nodes": 8}  # 6 MatMuls + 2 Attention
    assert _stage(tiny_build, "calibrate")["metrics"]["smoothing_inputs"] == 8
    model = onnx.load(str(b / "model.int8-dynamic.onnx"))
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in model.graph.node) == 8


def test_dynamic_uses_integer_kernels(tiny_build):
    ops = _ops(_bdir(tiny_build) / "model.int8-dynamic.onnx")
    assert ops["QAttention"] == 2
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] >= 6 or ops["DynamicQuantizeLinear"] >= 1
    assert ops["MatMul"] == 0


def test_arm64_static_is_s8s8(tiny_cls_build):
    model = onnx.load(str(_bdir(tiny_cls_build) / "model.int8-static.onnx"))
    zp_types = {i.data_type for i in model.graph.initializer if i.name.endswith("_zero_point")}
    assert zp_types == {onnx.TensorProto.INT8}
    # arm64's static artifact is for int8 EPs (XNNPACK, NNAPI): no dynamic fallback, no smoothing
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"MatMulInteger", "QAttention", "DynamicQuantizeLinear"}


def test_nodes_kept_float_rule():
    from onnx import helper

    from edgeq.pipeline.ops.static_plan import nodes_kept_float

    g = helper.make_graph([
        helper.make_node("Gelu", ["x"], ["g"], name="gelu"),
        helper.make_node("MatMul", ["g", "w"], ["y"], name="after_gelu"),
        helper.make_node("MatMul", ["x", "w"], ["z"], name="plain"),
    ], "g", [], [])
    kept = nodes_kept_float(helper.make_model(g), {"MatMul"}, {"Gelu"})
    assert [k["node"] for k in kept] == ["after_gelu"]


# -- evaluate -----------------------------------------------------------------------------------

def test_pooled_is_masked_mean():
    from edgeq.metrics import pooled

    out = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(pooled(out, mask), [[1, 2], [6, 7]])
    assert pooled(np.ones((4, 5), np.float32), None).shape == (4, 5)


def test_fidelity_numbers():
    from edgeq.metrics import fidelity

    ref = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    got = np.array([[1.0, 1.0], [0.0, 2.0]], np.float32)
    m = fidelity([ref[:1], ref[1:]], [got[:1], got[1:]], ref, got, classifier=True)
    assert m["cosine_min"] == pytest.approx(1 / np.sqrt(2), rel=1e-6)
    assert m["cosine"] == pytest.approx((1 / np.sqrt(2) + 1) / 2, rel=1e-6)
    assert m["max_abs_err"] == 1.0 and m["mean_abs_err"] == 0.25
    assert m["top1_agreement"] == 1.0  # argmax of [1, 1] is still class 0
    flipped = np.array([[0.0, 1.0], [0.0, 2.0]], np.float32)
    m = fidelity([ref[:1], ref[1:]], [flipped[:1], flipped[1:]], ref, flipped, classifier=True)
    assert m["cosine_min"] == 0.0 and m["top1_agreement"] == 0.5


def test_every_artifact_is_evaluated_against_fp32(tiny_build):
    arts = {a["name"]: a["metrics"] for a in tiny_build["artifacts"]}
    assert set(arts) == {"fp32", "int8-static", "int8-dynamic"}
    assert arts["fp32"]["cosine"] == pytest.approx(1.0) and arts["fp32"]["max_abs_err"] == 0
    for name in ("int8-static", "int8-dynamic"):
        assert 0.95 < arts[name]["cosine"] <= 1.0 + 1e-6
        assert arts[name]["max_abs_err"] > 0  # quantization changed something, and we saw it
        assert arts[name]["eval_samples"] == 24


def test_classifier_gets_top1_agreement(tiny_cls_build):
    arts = {a["name"]: a["metrics"] for a in tiny_cls_build["artifacts"]}
    assert tiny_cls_build["model"]["task"] == "text-classification"
    assert arts["fp32"]["top1_agreement"] == 1.0
    assert 0.0 <= arts["int8-dynamic"]["top1_agreement"] <= 1.0


def test_eval_drops_samples_that_were_used_for_calibration(tiny_bert, tmp_path):
    from conftest import run_build
    from edgeq.calib import default_calibration_path

    lines = default_calibration_path().read_text().splitlines()[:40]
    data = tmp_path / "both.txt"
    data.write_text("\n".join(lines) + "\n")
    m = run_build(tiny_bert, tmp_path / "o", modes=("static",), calib=str(data), eval_path=str(data),
                  calib_samples=30, eval_samples=10)
    ev = _stage(m, "evaluate")
    assert ev["metrics"]["overlap_with_calibration_removed"] == 30
    assert ev["settings"]["samples"] == 10
    # a build that calibrates nothing (fp16 only) still never evaluates on the calibration file's samples
    m = run_build(tiny_bert, tmp_path / "o2", modes=("fp16",), calib=str(data), eval_path=str(data),
                  calib_samples=30, eval_samples=10)
    assert _stage(m, "calibrate").get("skipped")
    assert _stage(m, "evaluate")["metrics"]["overlap_with_calibration_removed"] == 30


# -- benchmark ----------------------------------------------------------------------------------

def test_benchmark_records_latency_memory_and_ratios(tiny_build):
    b = _stage(tiny_build, "benchmark")
    assert b["metrics"]["execution_providers"] == {"CPUExecutionProvider": "measured"}
    assert b["settings"]["seq_len"] == 128 and b["settings"]["runs"] == 5
    arts = {a["name"]: a["metrics"] for a in tiny_build["artifacts"]}
    for m in arts.values():
        assert 0 < m["latency_p50_ms"] <= m["latency_p90_ms"] <= m["latency_p99_ms"]
        assert m["peak_rss_mb"] > 10 and m["load_ms"] > 0 and m["throughput_per_s"] > 0
        assert m["benchmark"]["CPUExecutionProvider"]["runs"] == 5
    assert arts["fp32"]["speedup_vs_fp32"] == 1.0
    expected = arts["fp32"]["latency_p50_ms"] / arts["int8-dynamic"]["latency_p50_ms"]
    assert arts["int8-dynamic"]["speedup_vs_fp32"] == pytest.approx(expected, rel=1e-2)
    assert arts["int8-dynamic"]["size_vs_fp32"] < 0.6


def test_cross_arch_benchmarks_are_labelled(tiny_build, tiny_cls_build):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("labels are checked from an x86_64 host")
    assert _stage(tiny_build, "benchmark")["metrics"]["notes"] == []
    (note,) = _stage(tiny_cls_build, "benchmark")["metrics"]["notes"]
    assert "not on aarch64 hardware" in note


def test_progress_counter_only_on_a_terminal(capsys):
    from edgeq.core import BuildContext

    ctx = BuildContext(config=None, target=None, build_dir=Path("."))
    assert list(ctx.track(iter(range(3)), 3, "x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    ctx.progress = True
    assert list(ctx.track(iter(range(3)), 3, "batch")) == [0, 1, 2]
    assert "batch 3/3" in capsys.readouterr().err


def test_bench_inputs_are_all_real_tokens(tiny_build):
    z = np.load(_bdir(tiny_build) / "work/bench_inputs.npz")
    assert z["input_ids"].shape == (1, 128) and z["attention_mask"].all()


def test_runner_reports_errors_as_json(tmp_path):
    from edgeq.measure import run_runner

    np.savez(tmp_path / "in.npz", x=np.zeros(1))
    r = run_runner({"models": [str(tmp_path / "missing.onnx")], "inputs": str(tmp_path / "in.npz")})
    assert "error" in r


# -- package ------------------------------------------------------------------------------------

def test_manifest_checksums_every_file(tiny_build):
    b = _bdir(tiny_build)
    on_disk = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert [f["path"] for f in tiny_build["files"]] == on_disk
    for f in tiny_build["files"]:
        assert sha256_file(b / f["path"]) == f["sha256"]
        assert (b / f["path"]).stat().st_size == f["size_bytes"]
    for name in ("tokenizer/tokenizer.json", "tokenizer/vocab.txt", "config.json", "model.fp32.onnx",
                 "model.int8-static.onnx", "model.int8-dynamic.onnx"):
        assert name in on_disk


def test_manifest_on_disk_is_the_returned_one(tiny_build):
    b = _bdir(tiny_build)
    disk = disk_manifest(b / "manifest.json")
    assert disk["schema"] == "edgeq.manifest/1"
    assert disk["artifacts"] == tiny_build["artifacts"]
    assert [s["stage"] for s in disk["stages"]] == ["export", "optimize", "calibrate", "quantize", "precision",
                                                    "evaluate", "benchmark", "package"]
    assert "not needed" in disk["stages"][4]["skipped"]  # no fp16 mode on x86_64
    assert all(s["seconds"] >= 0 for s in disk["stages"] if "skipped" not in s)
    assert disk["versions"]["onnxruntime"] == ort.__version__
    assert disk["config"]["target"] == "x86_64" and disk["config"]["calibration"]["method"] == "minmax"
    # nothing left from staging; the shared calibration cache sits beside the builds
    assert sorted(p.name for p in b.parent.iterdir() if p.name.startswith(".")) == [".cache"]
    assert list((b.parent / ".cache" / "calibration").glob("*/ranges.json"))


def test_artifacts_load_and_run(tiny_build):
    b = _bdir(tiny_build)
    z = dict(np.load(b / "work/bench_inputs.npz"))
    for a in tiny_build["artifacts"]:
        sess = ort.InferenceSession(str(b / a["path"]), providers=["CPUExecutionProvider"])
        out = sess.run(None, {i.name: z[i.name] for i in sess.get_inputs()})[0]
        assert out.shape == (1, 128, 32) and np.isfinite(out).all()


# -- recipes from profiles and options -------------------------------------------------------------

QOPERATOR_PROFILE = """
name = "qop-test"
description = "QOperator static, per-tensor, for tests"
arch = "any"
execution_providers = ["CPUExecutionProvider", "NoSuchExecutionProvider"]
fp16_compute = false
opset = 17
[static]
format = "QOperator"
activation_type = "uint8"
weight_type = "int8"
per_channel = false
reduce_range = true
calibration = "percentile"
[dynamic]
per_channel = false
"""


def test_user_profile_file_drives_format_and_calibration(tiny_bert, tmp_path):
    from conftest import run_build

    profile = tmp_path / "qop.toml"
    profile.write_text(QOPERATOR_PROFILE)
    m = run_build(tiny_bert, tmp_path / "out", target=str(profile))
    b = Path(m["build_dir"])
    assert b.name == "qop-test"
    ops = _ops(b / "model.int8-static.onnx")
    # no keep_float_after in this profile: every MatMul becomes QLinearMatMul
    assert ops["QLinearMatMul"] == 6 and ops["MatMul"] == 0 and ops["QuantizeLinear"] >= 1
    assert (b / "calibration/ranges-percentile.json").is_file()
    assert _stage(m, "calibrate")["settings"]["percentile"] == 99.999
    eps = _stage(m, "benchmark")["metrics"]["execution_providers"]
    assert eps["CPUExecutionProvider"] == "measured"
    assert eps["NoSuchExecutionProvider"].startswith("unavailable: ")


@pytest.mark.parametrize("method", ["entropy", "distribution"])
def test_calibration_method_option(tiny_bert, tmp_path, method):
    from conftest import run_build

    m = run_build(tiny_bert, tmp_path, modes=("static",), calib_method=method)
    b = Path(m["build_dir"])
    ranges = json.loads((b / f"calibration/ranges-{method}.json").read_text())
    assert method.capitalize() in json.dumps(ranges["calibration_method"])
    assert {a["name"]: a for a in m["artifacts"]}["int8-static"]["metrics"]["cosine"] > 0.9


# -- targets and execution providers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_build(tiny_bert, tmp_path_factory):
    from conftest import run_build

    return run_build(tiny_bert, tmp_path_factory.mktemp("cuda"), target="cuda")


def test_cuda_target_makes_a_valid_fp16_artifact(cuda_build):
    b = _bdir(cuda_build)
    assert [a["name"] for a in cuda_build["artifacts"]] == ["fp32", "fp16"]
    model = onnx.load(str(b / "model.fp16.onnx"))
    onnx.checker.check_model(model)
    # weights in fp16, inputs and outputs keep their types, Casts at the boundary
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) > 10
    assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims
                and np.prod(i.dims) > 64]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.INT64}
    assert _ops(b / "model.fp16.onnx")["Cast"] >= 1
    fp16 = {a["name"]: a for a in cuda_build["artifacts"]}["fp16"]
    assert fp16["precision"] == "fp16" and fp16["metrics"]["cosine"] > 0.999
    assert fp16["metrics"]["size_vs_fp32"] < 0.6


def test_unavailable_providers_are_named_with_a_reason(cuda_build):
    import onnxruntime as ort

    eps = _stage(cuda_build, "benchmark")["metrics"]["execution_providers"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA EP")
    assert eps["CUDAExecutionProvider"].startswith("unavailable: not in this onnxruntime build")
    assert eps["CPUExecutionProvider"].startswith("measured (fallback")
    assert any("reference only" in n for n in _stage(cuda_build, "benchmark")["metrics"]["notes"])


def test_fp16_io_option(tiny_bert, tmp_path):
    from conftest import run_build

    m = run_build(tiny_bert, tmp_path, target="cuda", fp16_io=True)
    model = onnx.load(str(_bdir(m) / "model.fp16.onnx"))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {a["name"]: a for a in m["artifacts"]}["fp16"]["metrics"]["cosine"] > 0.999


def test_partition_coverage_is_recorded(tiny_build):
    for a in tiny_build["artifacts"]:
        part = a["metrics"]["benchmark"]["CPUExecutionProvider"]["partition"]
        assert part["nodes"] > 0 and part["by_provider"] == {"CPUExecutionProvider": part["nodes"]}
        assert a["metrics"]["ep_coverage"] == 1.0


def test_runner_says_why_a_provider_is_unavailable(tiny_build):
    from edgeq.measure import run_runner

    b = _bdir(tiny_build)
    r = run_runner({"models": [str(b / "model.fp32.onnx")], "inputs": str(b / "work/bench_inputs.npz"),
                    "provider": "NnapiExecutionProvider", "runs": 1})
    assert r["unavailable"].startswith("not in this onnxruntime build")


def test_arm64_mobile_package(tiny_cls_build):
    b = _bdir(tiny_cls_build)
    pkg = _stage(tiny_cls_build, "package")
    for a in tiny_cls_build["artifacts"]:
        ort_file = b / a["formats"]["ort"]
        assert ort_file.suffix == ".ort" and ort_file.stat().st_size > 1000
        check = pkg["metrics"]["ort"]["ort_vs_onnx"][a["name"]]
        assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    # the .ort loads in onnxruntime and reproduces the .onnx
    z = dict(np.load(b / "work/bench_inputs.npz"))
    outs = [ort.InferenceSession(str(b / f), providers=["CPUExecutionProvider"]).run(None, z)[0]
            for f in ("model.fp32.onnx", "model.fp32.ort")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    config = (b / "required_operators.config").read_text().splitlines()
    ops = {op for ln in config if not ln.startswith("#") for op in ln.split(";")[2].split(",")}
    assert {"Attention", "SkipLayerNormalization", "QAttention"} <= ops
    assert not any("/tmp" in ln or "staging" in ln for ln in config)
    readme = (b / "README.md").read_text()
    for needle in ("`input_ids` | int64 | [batch_size, sequence_length]", "`logits` | float32",
                   "OrtEnvironment.getEnvironment()", "ORTSession(env: env", "model.int8-static.ort",
                   "tokenizer/", "argmax of the logits"):
        assert needle in readme, needle
    files = {f["path"] for f in tiny_cls_build["files"]}
    assert {"model.fp32.ort", "required_operators.config", "README.md"} <= files


def test_x86_target_has_no_mobile_package(tiny_build):
    b = _bdir(tiny_build)
    assert not list(b.glob("*.ort")) and not (b / "README.md").exists()


def test_runtime_style_ort_for_ep_targets(tiny_bert, tmp_path):
    """EP targets (XNNPACK, NNAPI, CoreML) keep runtime optimization records instead of CPU-fixed graphs."""
    from conftest import run_build

    m = run_build(tiny_bert, tmp_path, target="xnnpack")
    b = _bdir(m)
    pkg = _stage(m, "package")["metrics"]["ort"]
    assert pkg["optimization_style"] == "Runtime"
    assert sorted(p.name for p in b.glob("*.ort")) == ["model.fp32.ort", "model.int8-dynamic.ort",
                                                       "model.int8-static.ort"]
    assert "--minimal_build extended" in (b / "required_operators.config").read_text()
    assert "addXnnpack" in (b / "README.md").read_text()
    eps = _stage(m, "benchmark")["metrics"]["execution_providers"]
    assert eps["XnnpackExecutionProvider"].startswith("unavailable")
    assert eps["CPUExecutionProvider"] == "measured"


def test_ranges_reused_across_targets_that_differ_only_in_quantization(tiny_bert, tmp_path):
    """x86_64 and x86_64-vnni calibrate the same tensors the same way (they differ in reduce_range):
    the second build takes the ranges from the shared cache."""
    from conftest import run_build

    a = run_build(tiny_bert, tmp_path, target="x86_64", modes=("static",))
    b = run_build(tiny_bert, tmp_path, target="x86_64-vnni", modes=("static",))
    assert _stage(a, "calibrate")["reused"] is False and _stage(b, "calibrate")["reused"] is True
    ra, rb = (Path(m["build_dir"]) / "calibration/ranges-minmax.json" for m in (a, b))
    assert ra.read_bytes() == rb.read_bytes()
    # arm64 keeps the fused SkipLayerNormalization (x86_64 doesn't): another fp32 graph, its own ranges
    c = run_build(tiny_bert, tmp_path, target="arm64", modes=("static",))
    assert _stage(c, "calibrate")["reused"] is False
    d = run_build(tiny_bert, tmp_path, target="tensorrt", modes=("static",))  # symmetric, entropy: its own
    assert _stage(d, "calibrate")["reused"] is False
