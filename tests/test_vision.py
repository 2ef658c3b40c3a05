"""Image models from a `package.module:factory`: export, image-folder data with the declared
preprocessing, static int8, top-1/top-5 agreement, labelled folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_build
from edgeq.core import EdgeqError


def _photos(folder: Path, n: int = 6, seed: int = 0, size=(48, 40)) -> Path:
    """Small synthetic RGB pictures with structure (gradients and blobs), written as PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    for i in range(n):
        img = np.stack([(xx * rng.uniform(2, 6) + rng.uniform(0, 80)) % 256,
                        (yy * rng.uniform(2, 6) + rng.uniform(0, 80)) % 256,
                        255 * (((xx - rng.uniform(0, size[0])) ** 2 + (yy - rng.uniform(0, size[1])) ** 2) < 150)], -1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"p{i}.{'png' if i % 2 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def cnn_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    return run_build("tiny_cnn:factory", root / "out", calib=str(_photos(root / "calib")),
                     eval_path=str(_photos(root / "eval", seed=1)), eval_samples=None)


def test_factory_model_is_exported_and_checked_on_photos(cnn_build):
    export = next(s for s in cnn_build["stages"] if s["stage"] == "export")
    assert export["metrics"]["max_abs_diff"] < 1e-4 and export["metrics"]["validation_samples"] == 4
    assert export["settings"]["input_shape"] == [1, 3, 32, 32]
    pre = export["settings"]["preprocess"]
    assert (pre["resize"], pre["crop"], pre["mean"], pre["std"]) == (36, 32, [127.5] * 3, [64.0] * 3)
    assert cnn_build["config"]["family"] == "vision" and cnn_build["config"]["modes"] == ["static"]
    assert (Path(cnn_build["build_dir"]) / "preprocess.json").is_file()


def test_static_int8_quantizes_the_convolutions(cnn_build):
    import onnx

    g = onnx.load(str(Path(cnn_build["build_dir"]) / "model.int8-static.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("DequantizeLinear") + ops.count("QLinearConv") >= 3
    # every convolution weight is stored as int8 (the model is too small for size ratios to mean much)
    int8 = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.INT8}
    dq_of = {n.output[0]: n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in g.node if n.op_type in ("Conv", "QLinearConv")]
    assert len(convs) == 3
    assert all(dq_of.get(n.input[1], n.input[1] if n.op_type == "Conv" else n.input[3]) in int8 for n in convs)
    q = next(s for s in cnn_build["stages"] if s["stage"] == "quantize")
    assert q["settings"]["static"]["bias_correction"] is True
    assert q["metrics"]["static"]["corrected_nodes"] == 4  # 3 convs and the classifier's Gemm
    assert q["metrics"]["static"]["kept_float"] == []  # keep_float_first does not apply to a 4-layer model


def test_first_layers_rule_keeps_deep_networks_first_convs_and_their_activations():
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.pipeline.ops.static_plan import first_layers_kept_float

    def chain(n):
        nodes, inits, x = [], [], "x"
        for i in range(n):
            inits.append(numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), f"w{i}"))
            nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
            x = f"r{i}"
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
        return helper.make_model(g)
    ops = {"Conv", "Relu", "Gemm", "MatMul"}
    kept = first_layers_kept_float(chain(30), ops, 3)
    assert sorted(k["node"] for k in kept) == ["conv0", "conv1", "conv2", "relu0", "relu1", "relu2"]
    assert [k["node"] for k in first_layers_kept_float(chain(20), ops, 3)] == ["conv0", "conv1", "relu0", "relu1"]
    assert first_layers_kept_float(chain(9), ops, 3) == [] and first_layers_kept_float(chain(30), ops, 0) == []


def test_every_view_is_evaluated_with_top1_and_top5(cnn_build):
    arts = {a["name"]: a["metrics"] for a in cnn_build["artifacts"]}
    assert arts["fp32"]["eval_samples"] == 6 * 12  # 6 photos x 12 views
    assert arts["fp32"]["top1_agreement"] == 1.0 and arts["fp32"]["top5_overlap"] == 1.0
    assert 0 <= arts["int8-static"]["top5_overlap"] <= 1 and 0 <= arts["int8-static"]["top1_agreement"] <= 1


def test_views_follow_the_declared_preprocessing(tmp_path):
    from PIL import Image

    from edgeq.calib.images import resolve_preprocess, view

    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = 200  # left half bright
    pil = Image.fromarray(img)
    pre = resolve_preprocess({"resize": 20, "crop": 20, "mean": 100, "std": 50}, [1, 3, 20, 20])
    x = view(pil, pre)
    assert x.shape == (1, 3, 20, 20) and x.dtype == np.float32
    # short side 40 -> 20: the image is 30 x 20, centre crop keeps columns 5..24; left of 15 is bright
    np.testing.assert_allclose(x[0, 0, 10, 0], (200 - 100) / 50, atol=0.05)
    np.testing.assert_allclose(x[0, 0, 10, 19], (0 - 100) / 50, atol=0.05)
    mirrored = view(pil, pre, mirror=True)
    np.testing.assert_allclose(mirrored[..., ::-1], x, atol=1e-6)
    nhwc = view(pil, resolve_preprocess({"resize": 20, "crop": 20, "layout": "NHWC"}, [1, 20, 20, 3]))
    assert nhwc.shape == (1, 20, 20, 3)


@pytest.mark.parametrize("given, shape, message", [
    ({"crop": 30}, [1, 3, 32, 32], "does not match the model's input size 32"),
    ({"resize": 20}, [1, 3, 32, 32], "smaller than the crop"),
    ({"mean": [1, 2]}, [1, 3, 32, 32], "mean needs 3 values"),
    ({"std": 0}, [1, 3, 32, 32], "std values must be positive"),
    ({"layout": "CHW"}, [1, 3, 32, 32], "layout must be NCHW or NHWC"),
    ({"gamma": 2}, [1, 3, 32, 32], "unknown preprocessing key"),
    ({}, [3, 32, 32], "4-D input"),
])
def test_bad_preprocessing(given, shape, message):
    from edgeq.calib.images import resolve_preprocess

    with pytest.raises(EdgeqError, match=message):
        resolve_preprocess(given, shape)


def test_labelled_folders_give_accuracy(tmp_path):
    root = tmp_path / "eval"
    for cls in ("3", "7"):
        _photos(root / cls, n=2, seed=int(cls))
    m = run_build("tiny_cnn:factory", tmp_path / "out", calib=str(_photos(tmp_path / "calib")),
                  eval_path=str(root), eval_samples=None)
    task = next(a for a in m["artifacts"] if a["name"] == "fp32")["metrics"]["task"]
    assert task["metric"] == "accuracy" and task["samples"] == 4 * 12 and 0 <= task["value"] <= 1


def test_image_model_user_errors(tmp_path):
    from edgeq.build import build
    from edgeq.config import resolve_config

    photos = str(_photos(tmp_path / "p", n=2))
    with pytest.raises(EdgeqError, match="module 'no_such_pkg.mod' not found"):
        resolve_config(model="no_such_pkg.mod:factory", out=str(tmp_path))
    with pytest.raises(EdgeqError, match="needs calibration photos"):
        resolve_config(model="tiny_cnn:factory", out=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeqError, match="has no images"):
        resolve_config(model="tiny_cnn:factory", out=str(tmp_path), calib=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    cfg = resolve_config(model="tiny_cnn:factory", out=str(tmp_path / "o1"), calib=str(tmp_path / "bad"))
    with pytest.raises(EdgeqError, match="cannot read image .*x.png"):
        build(cfg, log=lambda m: None)
    cfg = resolve_config(model="tiny_cnn:not_a_module", out=str(tmp_path / "o2"), calib=photos)
    with pytest.raises(EdgeqError, match="returned str, not a torch.nn.Module"):
        build(cfg, log=lambda m: None)
    with pytest.raises(EdgeqError, match="--input-shape must be 4 positive sizes"):
        resolve_config(model="tiny_cnn:factory", out=str(tmp_path), calib=photos, input_shape=(3, 32, 32))
    assert not any(tmp_path.rglob("manifest.json"))


def test_reverting_every_node_of_a_cnn_gives_back_fp32(cnn_build):
    """ORT's quantizer removes the ReLU6 (Clip) after a quantized Conv (the output's quantization
    range clips instead); taking nodes back to float must bring the activation back."""
    import onnx
    import onnxruntime as ort

    from edgeq.pipeline.ops import hybrid, quantizer
    from edgeq.targets import load

    d = Path(cnn_build["build_dir"])
    fp32 = onnx.load(str(d / "model.fp32.onnx"))
    recipe = load("x86_64").static_vision
    full_path = d.parent / "full.onnx"
    method = cnn_build["config"]["calibration"]["method"]
    assert method == recipe.calibration == "percentile"  # the image-model default
    ranges = d / "calibration" / f"ranges-{method}.json"
    quantizer.quantize_static_recipe(d / "model.fp32.onnx", full_path, recipe, ranges, method)
    full = onnx.load(str(full_path))
    assert sum(n.op_type == "Clip" for n in full.graph.node) < sum(n.op_type == "Clip" for n in fp32.graph.node)
    nodes = hybrid.quantized_nodes(full, {"Conv", "Gemm", "MatMul"})
    assert len(nodes) >= 3
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = run(fp32)
    back = hybrid.revert(full, fp32, nodes, set(recipe.op_types))
    onnx.checker.check_model(back, full_check=True)
    np.testing.assert_allclose(run(back), ref, atol=1e-4)
    # half of them back: still valid and closer to fp32 than full int8
    half = hybrid.revert(full, fp32, nodes[: len(nodes) // 2 + 1], set(recipe.op_types))
    assert np.abs(run(half) - ref).max() <= np.abs(run(full) - ref).max() + 1e-6


def test_reverting_a_node_whose_producer_stays_int8_keeps_the_folded_activation(cnn_build):
    """The quantizer folds the ReLU6 after the first conv into its output's Q range; a later node taken
    back to float must read that quantized (clipped) output, not the raw conv output it replaced."""
    import onnx
    import onnxruntime as ort

    from edgeq.pipeline.ops import hybrid
    from edgeq.targets import load

    d = Path(cnn_build["build_dir"])
    fp32 = onnx.load(str(d / "model.fp32.onnx"))
    full = onnx.load(str(d / "model.int8-static.onnx"))
    recipe = load("x86_64").static_vision
    convs = [n.name for n in full.graph.node if n.op_type == "Conv"]
    back = hybrid.revert(full, fp32, [convs[1]], set(recipe.op_types))  # the depthwise conv
    onnx.checker.check_model(back, full_check=True)
    prod = {o: n for n in back.graph.node for o in n.output}
    dw = next(n for n in back.graph.node if n.name == convs[1])
    assert prod[dw.input[0]].op_type == "DequantizeLinear"
    assert dw.input[1] in {i.name for i in back.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = run(fp32)
    # one more node in float: about as close to fp32 as full int8 (reading the un-clipped output: 5x off)
    assert np.abs(run(back) - ref).max() <= 1.5 * np.abs(run(full) - ref).max()


def test_depthwise_weights_keep_8_bits_under_reduce_range(cnn_build):
    import onnx

    from edgeq.pipeline.ops.quantizer import depthwise_full_range

    fp32 = onnx.load(str(Path(cnn_build["build_dir"]) / "model.fp32.onnx"))
    overrides = depthwise_full_range(fp32)
    dw = [n for n in fp32.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(dw) == 1 and overrides == {dw[0].input[1]: [{"axis": 0, "reduce_range": False}]}
    g = onnx.load(str(Path(cnn_build["build_dir"]) / "model.int8-static.onnx")).graph
    q = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    for n in g.node:
        if n.op_type == "Conv":
            w = q[dq[n.input[1]].input[0]]
            depthwise = any(a.name == "group" and a.i > 1 for a in n.attribute)
            # x86_64 has reduce_range: 7-bit weights for the GEMM convs, the full 8 bits for depthwise
            assert (np.abs(w.astype(int)).max() > 64) == depthwise, n.name


def test_task_budget_is_refused_for_image_models(tmp_path):
    from edgeq.config import resolve_config

    with pytest.raises(EdgeqError, match="--budget-metric task is not supported for image models"):
        resolve_config(model="tiny_cnn:factory", out=str(tmp_path), calib=str(_photos(tmp_path / "p", n=2)),
                       max_accuracy_drop=0.01, budget_metric="task")
