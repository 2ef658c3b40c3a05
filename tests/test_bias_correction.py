"""Bias correction (pipeline/ops/bias_correction.py): the output shift dW.E[x] it removes is the one the
convolution or matrix product really produces, and the quantized model's biases absorb it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.pipeline.ops import bias_correction


def _conv_model(w, b, group):
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("group,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4)])
def test_output_shift_is_what_the_convolution_of_the_mean_gives(group, cin, cout):
    rng = np.random.default_rng(group)
    dw = rng.normal(size=(cout, cin // group, 3, 3)).astype(np.float32)
    ex = rng.normal(size=cin).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group)
    shift = bias_correction._output_shift(node, dw.astype(np.float64), ex.astype(np.float64))
    # a constant image of the channel means, no padding: every output pixel is dW * E[x]
    x = np.broadcast_to(ex[None, :, None, None], (1, cin, 5, 5)).astype(np.float32)
    m = _conv_model(dw, np.zeros(cout, np.float32), group)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y[0, :, 1, 1], shift, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_output_shift_of_gemm(trans_b):
    rng = np.random.default_rng(trans_b)
    dw = rng.normal(size=(5, 3) if trans_b else (3, 5))
    ex = rng.normal(size=3)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)
    np.testing.assert_allclose(bias_correction._output_shift(node, dw, ex), ex @ (dw.T if trans_b else dw))


def test_means_are_per_channel_over_every_other_axis():
    c = bias_correction.MeanCollector()
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    c.add("t", a[:1])
    c.add("t", a[1:])
    c.add("g", np.array([[1.0, 2.0], [3.0, 6.0]]))
    np.testing.assert_allclose(c.result()["t"], a.transpose(1, 0, 2).reshape(3, -1).mean(axis=1))
    np.testing.assert_allclose(c.result()["g"], [2.0, 4.0])


def test_quantized_bias_absorbs_the_weight_rounding_shift(tmp_path):
    """A QDQ conv with coarse weights: after correction its mean output equals fp32's on the data."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    w[:, :, 0, 0] *= 40  # one large weight per filter: a coarse scale, so the others round badly
    b = rng.normal(size=8).astype(np.float32)
    fp32 = _conv_model(w, b, 1)
    onnx.save(fp32, tmp_path / "fp32.onnx")
    xs = [(rng.normal(size=(4, 4, 8, 8)) + np.arange(1, 5)[None, :, None, None]).astype(np.float32) for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x} for x in xs])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    q = onnx.load(str(tmp_path / "q.onnx"))
    means = bias_correction.MeanCollector()
    for x in xs:
        means.add("x", x)
    fixed = onnx.load(str(tmp_path / "q.onnx"))
    stats = bias_correction.correct(fixed, fp32, means.result())
    assert stats["corrected_nodes"] == 1

    def mean_out(m):
        # Q/DQ left unfused, so the product is computed in float from the dequantized values: the
        # arithmetic the correction reasons about, without the int8 kernel's own saturation on AVX2
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        # interior pixels: the padding-free part, where dW.E[x] is the whole shift
        return np.mean([s.run(None, {"x": x})[0][:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3)) for x in xs], axis=0)
    ref, before, after = mean_out(fp32), mean_out(q), mean_out(fixed)
    assert np.abs(after - ref).max() < 0.25 * np.abs(before - ref).max()
    assert np.abs(before - ref).max() > 0.05  # the test's weights do shift the mean
