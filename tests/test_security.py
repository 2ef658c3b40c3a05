"""What a model file may make edgeq do: read only inside the model's folder (ONNX external data), run
no code from a Hugging Face folder (auto_map) unless --trust-remote-code, unpickle no checkpoint
unless --allow-pickle. The CLI cases run `edgeq` in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FAST
from edgeq.core import EdgeqError, onnx_files
from edgeq.intake import check_model_safety, check_onnx


def edgeq(*args, cwd=None, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("EDGEQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def fast_args():
    return ["--runs", str(FAST["runs"]), "--calib-samples", str(FAST["calib_samples"]),
            "--eval-samples", str(FAST["eval_samples"])]


def assert_refused(r, *fragments, out: Path | None = None):
    """Exit 2, one line `edgeq: error: ...` naming every fragment, no traceback, nothing written."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgeq: error:"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in r.stderr and r.stdout == ""
    if out is not None:
        assert not out.exists(), sorted(out.rglob("*"))


# ---------------------------------------------------------------------------------------------------
# ONNX external data


def matmul_model(folder: Path, location: str | None, offset=None, length=None, write_data: bool = True,
                 name: str = "model.onnx") -> Path:
    """x[1,4] @ W[4,4] with W's 64 bytes stored externally at `location` (written there when
    `write_data` and the location is an ordinary file inside `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    data = w.raw_data
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = w.external_data.add()
            entry.key, entry.value = key, str(value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / name
    onnx.save(model, str(path))
    if write_data and location and not os.path.isabs(location) and ".." not in location:
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        (folder / location).write_bytes(b"\0" * int(offset or 0) + data)
    return path


@pytest.fixture
def secret(tmp_path) -> Path:
    """A FIFO outside the model's folder: whatever opens it to read blocks (the subprocess times out),
    so a passing test proves the file was never opened, not only that its bytes went unused."""
    p = tmp_path / "secret.bin"
    os.mkfifo(p)
    return p


def test_external_data_outside_the_folder_is_refused_before_anything_reads_it(tmp_path, secret):
    link_dir = tmp_path / "link"
    link_model = matmul_model(link_dir, "weights.bin", write_data=False)
    (link_dir / "weights.bin").symlink_to(secret)
    # a symlinked folder on the way out counts too
    dirlink_dir = tmp_path / "dirlink"
    dirlink_model = matmul_model(dirlink_dir, "sub/secret.bin", write_data=False)
    (dirlink_dir / "sub").symlink_to(tmp_path)
    cases = [
        (matmul_model(tmp_path / "dotdot", "../secret.bin"), "'../secret.bin'", "outside the model's folder"),
        (matmul_model(tmp_path / "deeper", "sub/../../secret.bin"), "'sub/../../secret.bin'", "outside"),
        (matmul_model(tmp_path / "abs", "/etc/passwd"), "'/etc/passwd'", "outside the model's folder"),
        (matmul_model(tmp_path / "abs2", str(secret)), repr(str(secret)), "outside the model's folder"),
        (link_model, "'weights.bin'", "a symlink to"),
        (dirlink_model, "'sub/secret.bin'", "a symlink to"),
        (matmul_model(tmp_path / "missing", "nope.bin", write_data=False), "'nope.bin'", "file missing"),
    ]
    for model, location, why in cases:
        out = tmp_path / "out"
        for command in ("build", "config"):
            try:
                r = edgeq(command, str(model), "-o", str(out), cwd=tmp_path, timeout=120)
            except subprocess.TimeoutExpired:  # pragma: no cover - the failure this test exists for
                pytest.fail(f"edgeq {command} {model} opened {secret} (it blocked on the FIFO)")
            assert_refused(r, location, why, str(model), out=out)
        assert not (tmp_path / "artifacts").exists()


def test_external_data_byte_ranges_must_lie_inside_the_file(tmp_path):
    far = matmul_model(tmp_path / "offset", "w.bin", offset=1000, write_data=False)
    (tmp_path / "offset" / "w.bin").write_bytes(b"\0" * 74)
    with pytest.raises(EdgeqError, match=r"bytes 1000\.\.1064 lie beyond the end of the file \(74 bytes\)"):
        check_onnx(far)
    short = matmul_model(tmp_path / "len", "w.bin", length=8)
    with pytest.raises(EdgeqError, match="length 8 bytes, but a tensor of its type and shape has 64"):
        check_onnx(short)
    notint = matmul_model(tmp_path / "nan", "w.bin", offset="abc", write_data=False)
    (tmp_path / "nan" / "w.bin").write_bytes(b"\0" * 64)
    with pytest.raises(EdgeqError, match="offset/length are not integers"):
        check_onnx(notint)
    noloc = matmul_model(tmp_path / "noloc", None, write_data=False)
    with pytest.raises(EdgeqError, match="names no location"):
        check_onnx(noloc)


def test_valid_external_data_passes_and_onnx_files_lists_it(tmp_path):
    model = matmul_model(tmp_path / "ok", "weights/w.bin", offset=0, length=64)
    check_onnx(model)
    assert onnx_files(model) == [model, tmp_path / "ok" / "weights" / "w.bin"]
    # a symlink that stays inside the folder resolves inside it: not an escape (onnx.checker itself
    # refuses symlinked external data, so the model is still refused, for that reason)
    inside = matmul_model(tmp_path / "inner", "alias.bin", write_data=False)
    (tmp_path / "inner" / "real.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    (tmp_path / "inner" / "alias.bin").symlink_to("real.bin")
    assert onnx_files(inside)[1] == tmp_path / "inner" / "alias.bin"
    with pytest.raises(EdgeqError) as e:
        check_onnx(inside)
    assert "outside" not in str(e.value)


def _wrap_external(tensor: TensorProto, location: str) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_external_data_is_found_wherever_a_tensor_hides(tmp_path):
    """Sparse initializers, Constant attributes inside an If branch, model-local functions: every
    tensor ONNX Runtime could read from a file is checked, and onnx_files refuses the same models."""
    def save(name, graph, functions=()):
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=list(functions))
        path = tmp_path / name / "model.onnx"
        path.parent.mkdir()
        onnx.save(m, str(path))
        return path

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    values = _wrap_external(numpy_helper.from_array(np.ones(2, np.float32), "S"), "../sparse.bin")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 2], np.int64), "S_idx"), [4])
    models = {
        "sparse": save("sparse", helper.make_graph([helper.make_node("Add", ["x", "S"], ["y"])], "g", [x], [y],
                                                   sparse_initializer=[sparse])),
    }
    const = helper.make_node("Constant", [], ["c"], value=_wrap_external(
        numpy_helper.from_array(np.ones(4, np.float32), "C"), "/etc/passwd"))
    then_g = helper.make_graph([const, helper.make_node("Add", ["x", "c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    models["subgraph"] = save("subgraph", helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)], "g", [cond, x], [y]))
    fconst = helper.make_node("Constant", [], ["k"], value=_wrap_external(
        numpy_helper.from_array(np.ones(4, np.float32), "K"), "../../f.bin"))
    func = helper.make_function("local", "AddK", ["a"], ["b"], [fconst, helper.make_node("Add", ["a", "k"], ["b"])],
                                [helper.make_opsetid("", 17)])
    models["function"] = save("function", helper.make_graph([helper.make_node("AddK", ["x"], ["y"], domain="local")],
                                                            "g", [x], [y]), [func])
    for kind, path in models.items():
        with pytest.raises(EdgeqError, match="outside the model's folder"):
            check_onnx(path)
        with pytest.raises(EdgeqError, match="outside the model's folder"):
            onnx_files(path)


def test_onnx_files_never_leaves_the_model_folder(tmp_path, secret):
    for i, location in enumerate(("../secret.bin", "/etc/passwd", "a/../../secret.bin", "")):
        # (""): data_location EXTERNAL without a location, not a file inside the folder either
        model = matmul_model(tmp_path / f"m{i}", location or None, write_data=False)
        with pytest.raises(EdgeqError, match="outside the model's folder"):
            onnx_files(model)
    link_dir = tmp_path / "link"
    model = matmul_model(link_dir, "w.bin", write_data=False)
    (link_dir / "w.bin").symlink_to(secret)
    with pytest.raises(EdgeqError, match="'w.bin' is outside the model's folder"):
        onnx_files(model)


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders: custom code and pickles

CUSTOM_MODELING = '''
import os
from pathlib import Path

Path(os.environ["EDGEQ_TEST_SENTINEL"]).write_text("custom modeling code ran")

from transformers import BertModel


class CustomBertModel(BertModel):
    pass
'''


@pytest.fixture(scope="module")
def custom_code_model(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT whose config.json maps AutoModel to a .py file of the folder; importing that
    file creates the file named by $EDGEQ_TEST_SENTINEL."""
    d = tmp_path_factory.mktemp("remote") / "custom-bert"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_custom.CustomBertModel"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "modeling_custom.py").write_text(CUSTOM_MODELING)
    return d


def test_custom_code_is_refused_without_trust_remote_code(custom_code_model, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    env = {"EDGEQ_TEST_SENTINEL": str(sentinel), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "out"
    for command in ("build", "config"):
        r = edgeq(command, str(custom_code_model), "-o", str(out), *fast_args(), cwd=tmp_path, env_extra=env)
        assert_refused(r, "config.json", "auto_map", "modeling_custom.CustomBertModel", "--trust-remote-code",
                       out=out)
    assert not sentinel.exists() and not (tmp_path / "modules").exists()


def test_trust_remote_code_runs_the_folders_code(custom_code_model, tmp_path):
    """With the flag the same folder builds, through its own class: the sentinel proves the code ran
    (so the refusal above is what kept it from running)."""
    sentinel = tmp_path / "SENTINEL"
    env = {"EDGEQ_TEST_SENTINEL": str(sentinel), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "out"
    r = edgeq("config", str(custom_code_model), "--trust-remote-code", "-o", str(out), cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "trust_remote_code = true" in r.stdout and not sentinel.exists()  # config resolves, runs nothing
    r = edgeq("build", str(custom_code_model), "--trust-remote-code", "--mode", "dynamic", "-o", str(out),
              *fast_args(), cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert sentinel.read_text() == "custom modeling code ran"
    manifest = json.loads((out / "custom-bert" / "x86_64" / "manifest.json").read_text())
    assert manifest["config"]["trust_remote_code"] is True


@pytest.fixture(scope="module")
def pickled_model(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with its weights as pytorch_model.bin (a pickle) and no safetensors."""
    from transformers import BertModel

    d = tmp_path_factory.mktemp("pickled") / "pickled-bert"
    shutil.copytree(tiny_bert, d, ignore=shutil.ignore_patterns("*.safetensors"))
    BertModel.from_pretrained(str(tiny_bert)).save_pretrained(str(d), safe_serialization=False)
    assert (d / "pytorch_model.bin").is_file() and not list(d.glob("*.safetensors"))
    return d


def test_pickle_weights_need_allow_pickle(pickled_model, tmp_path):
    out = tmp_path / "out"
    for command in ("build", "config"):
        r = edgeq(command, str(pickled_model), "-o", str(out), *fast_args(), cwd=tmp_path)
        assert_refused(r, "pytorch_model.bin", "pickle", "--allow-pickle", out=out)
    r = edgeq("build", str(pickled_model), "--allow-pickle", "--mode", "dynamic", "-o", str(out), *fast_args(),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "pickled-bert" / "x86_64" / "manifest.json").is_file()


class _Evil:
    """Unpickling this calls open(path, "w"): the file appearing means the pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_never_runs(tiny_bert, tmp_path):
    """Refused without --allow-pickle; with it, transformers loads weights with
    torch.load(weights_only=True), which rejects the payload: a user error, and still no code ran."""
    d = tmp_path / "evil-bert"
    shutil.copytree(tiny_bert, d, ignore=shutil.ignore_patterns("*.safetensors"))
    sentinel = tmp_path / "PWNED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.embeddings": _Evil(str(sentinel))}))
    out = tmp_path / "out"
    assert_refused(edgeq("build", str(d), "-o", str(out), *fast_args(), cwd=tmp_path), "pytorch_model.bin",
                   "--allow-pickle", out=out)
    r = edgeq("build", str(d), "--allow-pickle", "--mode", "dynamic", "-o", str(out), *fast_args(), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgeq: error: cannot export evil-bert"), r.stderr
    assert not sentinel.exists()
    assert not any(out.rglob("manifest.json"))


def _hf_dir(path: Path, config: dict | None = None, files: dict[str, bytes | str] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", **(config or {})}))
    for name, content in (files or {}).items():
        (path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_check_model_safety_rules(tmp_path):
    ok = [
        _hf_dir(tmp_path / "plain", files={"model.safetensors": b"x"}),
        # safetensors beside a pickle: transformers loads the safetensors, the pickle is never opened
        _hf_dir(tmp_path / "both", files={"model.safetensors": b"x", "pytorch_model.bin": b"x", "optimizer.pt": b"x"}),
        _hf_dir(tmp_path / "sharded-safe", files={"model.safetensors.index.json": "{}",
                                                  "pytorch_model-00001-of-00002.bin": b"x"}),
        _hf_dir(tmp_path / "empty-map", config={"auto_map": {}}, files={"model.safetensors": b"x"}),
        # a .py file nobody names is never imported
        _hf_dir(tmp_path / "stray-py", files={"model.safetensors": b"x", "helper.py": "raise SystemExit"}),
    ]
    for d in ok:
        check_model_safety(d, trust_remote_code=False, allow_pickle=False)
    refused = [
        (_hf_dir(tmp_path / "map", config={"auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                        "AutoModel": "modeling_x.XModel"}}),
         "config.json: 'auto_map' names custom code (configuration_x.XConfig, modeling_x.XModel)",
         "--trust-remote-code"),
        (_hf_dir(tmp_path / "tok", files={"model.safetensors": b"x", "tokenizer_config.json": json.dumps(
            {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}})}),
         "tokenizer_config.json: 'auto_map' names custom code (tokenization_x.XTokenizer)", "--trust-remote-code"),
        (_hf_dir(tmp_path / "pipe", config={"custom_pipelines": {"x": {"impl": "pipe.X"}}}),
         "'custom_pipelines'", "--trust-remote-code"),
        (_hf_dir(tmp_path / "bin", files={"pytorch_model.bin": b"x"}), "pytorch_model.bin: pickle-based weights",
         "--allow-pickle"),
        (_hf_dir(tmp_path / "shards", files={"pytorch_model-00001-of-00002.bin": b"x",
                                             "pytorch_model.bin.index.json": "{}"}),
         "pytorch_model-00001-of-00002.bin", "--allow-pickle"),
        (_hf_dir(tmp_path / "pt", files={"weights.pt": b"x"}), "weights.pt", "--allow-pickle"),
        (_hf_dir(tmp_path / "ckpt", files={"last.ckpt": b"x"}), "last.ckpt", "--allow-pickle"),
        (_hf_dir(tmp_path / "pth", files={"model.pth": b"x"}), "model.pth", "--allow-pickle"),
        (_hf_dir(tmp_path / "pkl", files={"state.pkl": b"x"}), "state.pkl", "--allow-pickle"),
    ]
    for d, fragment, flag in refused:
        with pytest.raises(EdgeqError) as e:
            check_model_safety(d, trust_remote_code=False, allow_pickle=False)
        msg = str(e.value)
        assert fragment in msg and flag in msg and "\n" not in msg, msg
        # the flag named in the message is the one that lets it through
        check_model_safety(d, trust_remote_code=flag == "--trust-remote-code", allow_pickle=flag == "--allow-pickle")
    # both problems: each flag lifts only its own refusal
    both = _hf_dir(tmp_path / "both-bad", config={"auto_map": {"AutoModel": "m.M"}}, files={"pytorch_model.bin": b"x"})
    with pytest.raises(EdgeqError, match="--allow-pickle"):
        check_model_safety(both, trust_remote_code=True, allow_pickle=False)
    with pytest.raises(EdgeqError, match="--trust-remote-code"):
        check_model_safety(both, trust_remote_code=False, allow_pickle=True)
    check_model_safety(both, trust_remote_code=True, allow_pickle=True)


def test_a_folder_that_only_lends_its_tokenizer(tmp_path):
    """An .onnx model's folder (or --tokenizer DIR): only code the tokenizer would import counts, and
    weights there are never loaded."""
    model_code = _hf_dir(tmp_path / "model-code", config={"auto_map": {"AutoModel": "modeling_x.X"}},
                         files={"pytorch_model.bin": b"x"})
    check_model_safety(model_code, tokenizer_only=True)
    tok_code = _hf_dir(tmp_path / "tok-code", config={"auto_map": {"AutoTokenizer": ["tokenization_x.T", None]}})
    with pytest.raises(EdgeqError, match=r"config.json: 'auto_map' names custom code \(tokenization_x.T\)"):
        check_model_safety(tok_code, tokenizer_only=True)
    tok_config = _hf_dir(tmp_path / "tok-config", files={"tokenizer_config.json": json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_y.T", "tokenization_y.TFast"]}})})
    with pytest.raises(EdgeqError, match="tokenization_y.T, tokenization_y.TFast.*--trust-remote-code"):
        check_model_safety(tok_config, tokenizer_only=True)
    check_model_safety(tok_config, trust_remote_code=True, tokenizer_only=True)


def test_no_unsafe_loaders_in_the_code_base():
    """No torch.load without weights_only=True, no np.load(allow_pickle=True), no pickle.load, and no
    hard-coded trust_remote_code=True in edgeq's own code."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("edgeq", "pipeline", "calib", "targets") for p in (root / d).rglob("*.py")]
    assert len(sources) > 10
    for p in sources:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{p}: {m.group(0)}"
        assert not re.search(r"\b(np|numpy)\.load\([^)]*allow_pickle\s*=\s*True", text), p
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.load", text), p
        assert not re.search(r"trust_remote_code\s*=\s*True", text), p


def test_a_safetensors_decoy_beside_a_pickle_is_refused(pickled_model, tmp_path):
    """transformers loads model.safetensors (or its shard index) only; any other *.safetensors
    beside pytorch_model.bin leaves the pickle to be loaded, so it does not count."""
    d = tmp_path / "decoy-bert"
    shutil.copytree(pickled_model, d)
    (d / "decoy.safetensors").write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    assert_refused(edgeq("config", str(d), "-o", str(out), cwd=tmp_path), "pytorch_model.bin", "--allow-pickle",
                   out=out)
