"""Stages on a small hand-built context: a two-MatMul ONNX graph, tensors as .npz, a BuildConfig made
directly. What one stage hands the next is the typed result on the context (CalibrationResult), so
calibrate and quantize run here without export, optimize or a tokenizer."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq import targets
from edgeq.config import Benchmark, BuildConfig, Calibration, Evaluation, Fp16Options, Gates
from edgeq.core import BuildContext, CalibrationResult, EdgeqError, Files, ModelFacts


def _model(path: Path) -> None:
    """y = relu(x W1) W2 with a few outlier input channels (what SmoothQuant is for)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx.shape_inference.infer_shapes(m), str(path))


def _data(path: Path, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    x[:, 3] *= 20  # an outlier channel
    np.savez(path, x=x)
    return x


@pytest.fixture
def ctx(tmp_path) -> BuildContext:
    cal, ev = tmp_path / "cal.npz", tmp_path / "eval.npz"
    _data(cal, 64, 1), _data(ev, 16, 2)
    cfg = BuildConfig(
        model=str(tmp_path / "tiny.onnx"), model_kind="onnx", family="encoder", name="tiny", target="x86_64",
        target_profile="x86_64", modes=("static", "dynamic"), task="feature-extraction", tokenizer=None,
        max_length=128, max_accuracy_drop=None, budget_metric="cosine", fp16=Fp16Options(True, []),
        calibration=Calibration(path=str(cal), method="minmax", samples=64), evaluation=Evaluation(str(ev), None),
        benchmark=Benchmark(batch_size=1, seq_len=8, runs=2, warmup=1, threads=1),
        gates=Gates(None, None, None), out=str(tmp_path / "out"))
    c = BuildContext(config=cfg, target=targets.load("x86_64"), build_dir=tmp_path / "build", log=lambda m: None)
    c.model = ModelFacts(task="feature-extraction", input_names=["x"], output_names=["y"],
                         input_specs={"x": {"dtype": "float32", "rank": 2}})
    _model(c.path(Files.FP32))
    return c


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_calibrate_hands_quantize_a_typed_result(ctx):
    from edgeq.pipeline import calibrate, quantize

    assert ctx.smoothing.static and ctx.smoothing.dynamic  # x86_64 smooths both
    result = calibrate.run(ctx)
    cal = ctx.calibration
    assert isinstance(cal, CalibrationResult) and cal.method == "minmax"
    assert cal.ranges_path == ctx.path(Files.ranges("minmax")) and cal.ranges_path.is_file()
    assert cal.absmax_path == ctx.path(Files.absmax("minmax")) and cal.absmax_path.is_file()
    assert cal.static_smoothed == ["mm1", "mm2"]  # both MatMuls are quantized statically, so smoothed
    assert result.metrics["batches"] == 4 and not result.reused  # 64 samples, 16 a batch
    # a second run with the same model and data reuses the cache beside the builds
    again = calibrate.run(ctx)
    assert again.reused and ctx.calibration == cal

    out = quantize.run(ctx)
    assert [a.name for a in ctx.artifacts] == ["int8-static", "int8-dynamic"]
    assert out.settings["static"]["smoothquant"]["nodes"] == 2
    x = np.load(ctx.config.evaluation.path)["x"]
    ref = _run(ctx.path(Files.FP32), x)
    for a in ctx.artifacts:
        got = _run(ctx.path(a.path), x)
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() > 0.99, (a.name, cos.min())
    static = onnx.load(str(ctx.path(Files.model("int8-static"))))
    assert sum(n.op_type == "QuantizeLinear" for n in static.graph.node) >= 2


def test_quantize_follows_the_calibration_result_not_its_own_guess(ctx):
    """A CalibrationResult whose smoothed nodes do not match the statistics is refused, in one line."""
    from edgeq.pipeline import calibrate, quantize

    calibrate.run(ctx)
    ctx.calibration.static_smoothed = ["mm1", "not-a-node"]
    ctx.config = replace(ctx.config, modes=("static",))
    with pytest.raises(EdgeqError, match="calibration statistics do not match the model"):
        quantize.run(ctx)


def test_the_registry_decides_which_stages_run(ctx):
    from edgeq.pipeline import STAGES

    def needed(modes):
        ctx.config = replace(ctx.config, modes=modes)
        return [s.name for s in STAGES if s.needed(ctx)]

    every = ["export", "optimize", "evaluate", "benchmark", "package"]
    assert needed(("fp16",)) == ["export", "optimize", "precision", "evaluate", "benchmark", "package"]
    # dynamic int8 calibrates too where the target smooths it (x86_64: [dynamic] smooth_alpha)
    assert needed(("dynamic",)) == ["export", "optimize", "calibrate", "quantize", *every[2:]]
    ctx.target = targets.load("tensorrt")  # no smoothing there
    assert needed(("dynamic",)) == ["export", "optimize", "quantize", *every[2:]]
    assert needed(("hybrid",)) == ["export", "optimize", "calibrate", "precision", *every[2:]]


def test_data_source_batches_singles_and_bench_inputs(ctx):
    from edgeq.calib.source import for_build

    data = for_build(ctx)
    samples = data.calibration_samples()
    assert samples["x"].shape == (64, 16)
    assert [b["x"].shape[0] for b in data.batches(samples, 24)] == [24, 24, 16]
    singles = data.singles(samples, 5)
    assert len(singles) == 5 and singles[0].feeds["x"].shape == (1, 16) and singles[0].mask is None
    evaluation, removed, labelled = data.evaluation()
    assert len(evaluation) == 16 and removed == 0 and labelled is None
    path = data.bench_file(ctx.path(Files.BENCH_INPUTS))
    np.testing.assert_array_equal(np.load(path)["x"], np.load(ctx.config.evaluation.path)["x"][:1])


def test_config_sections_reject_impossible_values():
    with pytest.raises(EdgeqError, match="--calib-samples must be at least 1"):
        Calibration(path="x", method="minmax", samples=0)
    with pytest.raises(EdgeqError, match="unknown calibration method 'mse'"):
        Calibration(path="x", method="mse", samples=8)
    with pytest.raises(EdgeqError, match="--runs must be at least 1"):
        Benchmark(batch_size=1, seq_len=8, runs=0, warmup=0, threads=0)
    with pytest.raises(EdgeqError, match="--min-speedup must be a positive number"):
        Gates(None, -1.0, None)


def test_optimize_keeps_shape_inference_out_of_the_users_folder(ctx, tmp_path, monkeypatch):
    """ORT's symbolic shape inference writes sym_shape_infer_temp.onnx into the current directory
    when it gives up; a symlink planted there must not be written through."""
    import onnxruntime.quantization.shape_inference as si

    from edgeq.pipeline import optimize

    _model(ctx.path(Files.EXPORTED))
    user = tmp_path / "user"
    user.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (user / "sym_shape_infer_temp.onnx").symlink_to(victim)
    real = si.quant_pre_process

    def giving_up(*args, **kw):  # what ORT does when inference is incomplete, then the real work
        Path("sym_shape_infer_temp.onnx").write_bytes(b"temp model")
        return real(*args, **kw)

    monkeypatch.setattr(si, "quant_pre_process", giving_up)
    monkeypatch.chdir(user)
    optimize.run(ctx)
    assert victim.read_text() == "precious" and Path.cwd() == user
    assert ctx.path(Files.FP32).is_file() and ctx.model.input_names == ["x"]
    assert not list(ctx.build_dir.glob(".cwd-*"))  # the private folder is gone


def test_non_finite_outputs_stop_the_build_with_the_artifact_named(ctx):
    """NaN outputs would make every metric NaN (and NaN passes no comparison): a one-line error."""
    from edgeq.core import Artifact
    from edgeq.pipeline import evaluate

    g = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"], name="sqrt")], "nan",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(ctx.path(Files.FP32)))
    ctx.artifacts = [Artifact(name="fp32", path=Files.FP32, precision="fp32")]
    with pytest.raises(EdgeqError, match=r"NaN or infinite outputs .* \(fp32, before any quantization\)"):
        evaluate.run(ctx)


def test_json_written_by_edgeq_is_strict(tmp_path):
    import json

    from edgeq.core import atomic_write_json, json_text

    obj = {"ok": 1.5, "nan": float("nan"), "inf": [float("inf"), np.float32(2.0)], "arr": np.array([1.0, np.nan])}
    assert json.loads(json_text(obj)) == {"ok": 1.5, "nan": None, "inf": [None, 2.0], "arr": [1.0, None]}
    atomic_write_json(tmp_path / "m.json", obj)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text)["nan"] is None
