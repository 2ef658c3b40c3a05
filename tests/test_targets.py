import pytest

from edgeq import targets
from edgeq.core import EdgeqError


def test_profiles_load_and_differ_where_devices_differ():
    assert {"arm64", "x86_64"} <= set(targets.available())
    x86, arm = targets.load("x86_64"), targets.load("arm64")
    # AVX2 without VNNI: U8S8 with 7-bit weights; ARM: full-range S8S8
    assert (x86.static.activation_type, x86.static.weight_type, x86.static.reduce_range) == ("uint8", "int8", True)
    assert (arm.static.activation_type, arm.static.reduce_range) == ("int8", False)
    assert arm.fp16_compute and not x86.fp16_compute
    assert "BiasGelu" in x86.static.keep_float_after
    assert x86.to_dict()["static"]["op_types"] == ("MatMul",)


def test_unknown_target_is_a_user_error():
    with pytest.raises(EdgeqError, match="unknown target 'nope'.*arm64"):
        targets.load("nope")


GOOD = """
name = "t"
description = "d"
arch = "any"
execution_providers = ["CPUExecutionProvider"]
fp16_compute = false
opset = 17
[static]
format = "QDQ"
[dynamic]
"""


def test_parse_minimal_profile_gets_defaults():
    t = targets.parse(GOOD)
    assert t.static.format == "QDQ" and t.static.per_channel and t.dynamic.op_types == ("MatMul",)
    assert t.static.fallback == "float" and t.dynamic.smooth_alpha == 0.0


def test_smoothing_and_fallback_keys():
    t = targets.parse(GOOD.replace("[dynamic]", "[dynamic]\nsmooth_alpha = 1").replace(
        'format = "QDQ"', 'format = "QDQ"\nfallback = "dynamic"'))
    assert t.dynamic.smooth_alpha == 1.0 and isinstance(t.dynamic.smooth_alpha, float)
    assert t.static.fallback == "dynamic"
    assert t.static_vision.fallback == "float"  # image models never inherit it: ConvInteger is slow
    x86, arm = targets.load("x86_64"), targets.load("arm64")
    assert x86.static.fallback == "dynamic" and arm.static.fallback == "float"
    assert x86.dynamic.smooth_alpha == arm.dynamic.smooth_alpha == 0.75
    # static smoothing: x86 only (measured there); image models and arm64's int8 EPs keep it off
    assert x86.static.smooth_alpha == 0.75 and arm.static.smooth_alpha == 0.0
    assert x86.static_vision.smooth_alpha == 0.0
    t = targets.parse(GOOD.replace('format = "QDQ"', 'format = "QDQ"\nsmooth_alpha = 0.5'))
    assert t.static.smooth_alpha == 0.5 and t.static_vision.smooth_alpha == 0.0


@pytest.mark.parametrize("bad, message", [
    (GOOD.replace('format = "QDQ"', 'format = "QQQ"'), "static.format"),
    (GOOD.replace("opset = 17", "opset = 9"), "opset"),
    (GOOD.replace('["CPUExecutionProvider"]', "[]"), "execution_providers"),
    (GOOD.replace('format = "QDQ"', 'format = "QDQ"\nactivation_symmetric = true'), "activation_symmetric"),
    (GOOD.replace('format = "QDQ"', 'format = "QDQ"\ncalibration = "magic"'), "static.calibration"),
    (GOOD + "\nbogus_key = 1\n", "invalid target profile"),
    (GOOD.replace('format = "QDQ"', 'format = "QDQ"\nop_types = "MatMul"'), "'static.op_types' must be a list of strings"),
    (GOOD.replace('["CPUExecutionProvider"]', '"CPUExecutionProvider"'), "'execution_providers' must be a list"),
    (GOOD.replace("fp16_compute = false", 'fp16_compute = "no"'), "'fp16_compute' must be a bool"),
    (GOOD.replace("opset = 17", "opset = 17.5"), "'opset' must be a int"),
    (GOOD.replace('name = "t"', "name = 5"), "'name' must be a str"),
    (GOOD.replace('name = "t"', 'name = "../../evil"'), "name must be letters"),
    (GOOD.replace('name = "t"', 'name = ".hidden"'), "name must be letters"),
    (GOOD.replace('name = "t"\n', ""), r"missing key\(s\): name"),
    (GOOD.replace("[dynamic]", "[dynamic]\nper_chanel = true"), "unknown key 'dynamic.per_chanel'"),
    ("static = 3\n" + GOOD.replace('[static]\nformat = "QDQ"\n', ""), "must be a table"),
    ("name = ", "invalid target profile"),
    (GOOD.replace("[dynamic]", "[dynamic]\nsmooth_alpha = 1.5"), "dynamic.smooth_alpha must be within"),
    (GOOD.replace("[dynamic]", "[dynamic]\nsmooth_alpha = nan"), "dynamic.smooth_alpha must be within"),
    (GOOD.replace("[dynamic]", "[dynamic]\nsmooth_alpha = true"), "'dynamic.smooth_alpha' must be a float"),
    (GOOD.replace("[dynamic]", '[dynamic]\nsmooth_alpha = "0.5"'), "'dynamic.smooth_alpha' must be a float"),
    (GOOD.replace('format = "QDQ"', 'format = "QDQ"\nfallback = "fp16"'), "static.fallback"),
    (GOOD.replace('format = "QDQ"', 'format = "QDQ"\nsmooth_alpha = -0.1'), "static.smooth_alpha must be within"),
])
def test_invalid_profiles_are_rejected(bad, message):
    with pytest.raises(EdgeqError, match=message):
        targets.parse(bad)


def test_the_default_target_follows_the_cpu(monkeypatch):
    from edgeq.intake import host_target

    monkeypatch.delenv("EDGEQ_TARGET", raising=False)
    assert host_target("x86_64", {"avx2", "fma"})[0] == "x86_64"
    name, why = host_target("x86_64", {"avx2", "avx512f", "avx512_vnni"})
    assert name == "x86_64-vnni" and "avx512_vnni" in why
    assert host_target("x86_64", {"avx2", "avx_vnni"})[0] == "x86_64-vnni"  # Alder Lake-style AVX-VNNI
    assert host_target("x86_64", {"amx_int8"})[0] == "x86_64-vnni"
    assert host_target("aarch64", set())[0] == "arm64"
    monkeypatch.setenv("EDGEQ_TARGET", "arm64")
    assert host_target("x86_64", {"avx512_vnni"}) == ("arm64", "EDGEQ_TARGET")


def test_the_chosen_target_and_why_are_recorded_and_shown(tiny_bert, tmp_path, monkeypatch):
    from edgeq.config import resolve_config
    from edgeq.summary import summary_table

    monkeypatch.delenv("EDGEQ_TARGET", raising=False)
    monkeypatch.setattr("edgeq.intake.cpu_flags", lambda: {"avx2", "avx512_vnni"})
    monkeypatch.setattr("edgeq.intake.platform.machine", lambda: "x86_64")
    cfg = resolve_config(model=str(tiny_bert), out=str(tmp_path))
    assert cfg.target == "x86_64-vnni" and cfg.to_dict()["target_reason"] == "this CPU has avx512_vnni"
    given = resolve_config(model=str(tiny_bert), out=str(tmp_path), target="x86_64")
    assert given.target_reason is None and "target_reason" not in given.to_dict()
    head = summary_table({"model": {"name": "m"}, "target": {"name": cfg.target}, "build_seconds": 1,
                          "build_dir": "d", "config": cfg.to_dict(), "artifacts": [], "stages": []})
    assert "target x86_64-vnni: chosen because this CPU has avx512_vnni" in head
