"""SmoothQuant (pipeline/ops/smooth.py): exact in float, and it shrinks the per-tensor range that int8
activation scales must cover."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeq.pipeline.ops import smooth


def _model(w: np.ndarray, shared: bool = False):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y2"], name="mm2"))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, w.shape[1]]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                          outputs, [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x, name="x"):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})


def test_smoothing_is_exact_in_float_and_moves_outliers_into_the_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    x = rng.normal(size=(32, 16)).astype(np.float32)
    x[:, 3] *= 40  # one outlier channel, as after a GELU in MiniLM
    model = _model(w)
    before = _run(model, x)[0]
    stats = smooth.AbsMaxCollector()
    for chunk in np.split(x, 4):  # folded batch by batch, as the calibrate stage does
        stats.add("x", chunk)
    assert np.allclose(stats.result()["x"], np.abs(x).max(0))
    done = smooth.smooth(model, {"mm": stats.result()["x"]}, 0.75)
    assert done == ["mm"]
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Mul", "MatMul"]
    np.testing.assert_allclose(_run(model, x)[0], before, rtol=1e-4, atol=1e-4)
    inv = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "mm_smooth_scale"))
    xs = x * inv
    # the range one per-tensor scale must cover, relative to a typical channel, shrinks a lot
    ratio = lambda a: np.abs(a).max() / np.median(np.abs(a).max(0))
    assert ratio(xs) < ratio(x) / 4


def test_scales_guard_dead_channels_and_zero_rows():
    w = np.ones((3, 2), np.float32)
    w[2] = 0
    s = smooth.scales(np.array([4.0, 0.0, 5.0]), w, 0.5)
    assert s[0] == np.float32(2.0) and s[1] == 1 and s[2] == 1


def test_shared_weights_and_missing_statistics_are_left_alone():
    w = np.ones((4, 2), np.float32)
    model = _model(w, shared=True)
    assert smooth.smoothable(model) == {}  # scaling w for mm would change mm2
    model = _model(w)
    assert smooth.smooth(model, {}, 0.75) == []
    assert smooth.smooth(model, {"mm": np.ones(5)}, 0.75) == []  # wrong width: not this weight's stats
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_statistics_file_is_byte_stable(tmp_path):
    arrays = {"b/x": np.arange(3, dtype=np.float32), "a": np.ones(2, np.float32)}
    smooth.save_npz(tmp_path / "1.npz", arrays)
    smooth.save_npz(tmp_path / "2.npz", dict(reversed(list(arrays.items()))))
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    back = smooth.load_absmax(tmp_path / "1.npz")
    assert set(back) == set(arrays) and np.array_equal(back["b/x"], arrays["b/x"])


def _prenorm(residual_reads_it: bool):
    """h -> Mul(h, gamma) = x -> two MatMuls (a pre-norm decoder's RMSNorm scale feeding gate/up),
    and, when `residual_reads_it`, an Add that also reads x."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 16).astype(np.float32)
    nodes = [helper.make_node("Mul", ["h", "gamma"], ["x"], name="norm_scale"),
             helper.make_node("MatMul", ["x", "w1"], ["y1"], name="gate"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="up")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in ("y1", "y2")]
    if residual_reads_it:
        nodes.append(helper.make_node("Add", ["x", "h"], ["r"], name="residual"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, 16]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 16])], outputs,
                          [numpy_helper.from_array(a, n) for a, n in ((gamma, "gamma"), (w1, "w1"), (w2, "w2"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), gamma, w1, w2


def test_folding_puts_the_division_into_the_producing_scale():
    """fold=True: the readers of Mul(h, gamma) share one s, gamma / s replaces the Muls smoothing
    would add, and the outputs stay what they were; an input the residual also reads is not folded."""
    rng = np.random.default_rng(2)
    h = rng.normal(size=(32, 16)).astype(np.float32)
    h[:, 5] *= 30  # an outlier channel
    model, gamma, w1, w2 = _prenorm(residual_reads_it=False)
    before = _run(model, h, "h")
    a = np.abs(h * gamma).max(0)
    assert sorted(smooth.smooth(model, {"gate": a, "up": a}, 0.75, fold=True)) == ["gate", "up"]
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Mul", "MatMul", "MatMul"]  # no Mul added
    for got, ref in zip(_run(model, h, "h"), before):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    s = gamma / inits["gamma"]  # one s for both readers, from their weights' joint row maxima
    np.testing.assert_allclose(s, smooth.scales(a, np.concatenate([w1, w2], 1), 0.75), rtol=1e-5)
    np.testing.assert_allclose(inits["w1"], w1 * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(inits["w2"], w2 * s[:, None], rtol=1e-5)
    assert np.abs(h * inits["gamma"]).max() < np.abs(h * gamma).max() / 3  # the outlier went into the weights

    model, gamma, _, _ = _prenorm(residual_reads_it=True)
    before = _run(model, h, "h")
    assert sorted(smooth.smooth(model, {"gate": a, "up": a}, 0.75, fold=True)) == ["gate", "up"]
    assert [n.op_type for n in model.graph.node].count("Mul") == 3  # the residual needs x unscaled: two Muls
    assert np.array_equal(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gamma")), gamma)
    for got, ref in zip(_run(model, h, "h"), before):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
