"""Fuzzing the command line with malformed inputs: ONNX files, calibration/evaluation data, edgeq.toml
and target profiles, fed to `edgeq config` (which reads and checks them exactly as `edgeq build`
does, and builds nothing).

Whatever the input, the contract holds: exit 0 or 2 (never 1, an internal error), no traceback, on
failure exactly one line on stderr starting `edgeq: error:` (on success: nothing on stderr, the
options as TOML on stdout), nothing written, no hang. The CLI runs in-process (`edgeq.cli.main` with
sys.argv patched): ~2,800 cases in under a minute. stdout and stderr are captured at the Python level
and at the file-descriptor level (native libraries), and warnings count as stderr lines, as they
would print in a terminal.

Hypothesis runs derandomized: the same cases on every run and machine. The last test checks the
total number of cases run. For a longer hunt: EDGEQ_FUZZ_SCALE=10 EDGEQ_FUZZ_RANDOM=1 pytest
tests/test_fuzz.py (ten times the cases, new ones each run); EDGEQ_FUZZ_STATS=1 with -s prints the
errors seen, most frequent first.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeq import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CASES: Counter = Counter()
OUTCOMES: Counter = Counter()  # (kind, exit code) -> cases
PLANNED = {"onnx_bytes": 400, "onnx_graphs": 600, "data_files": 700, "config_files": 700, "hf_folders": 400}
MIN_TOTAL = 1000
assert sum(PLANNED.values()) >= MIN_TOTAL

SCALE = float(os.environ.get("EDGEQ_FUZZ_SCALE", "1"))
PLANNED = {k: max(1, round(v * SCALE)) for k, v in PLANNED.items()}
FUZZ = dict(deadline=5000, derandomize=not os.environ.get("EDGEQ_FUZZ_RANDOM"), database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
WATCHDOG_S = 30  # a case still running after this is a hang: the test fails instead of waiting forever
QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case ran longer than {WATCHDOG_S} s")


@contextlib.contextmanager
def _fd_capture():
    """What native code writes to file descriptors 1 and 2 while the block runs."""
    got = {}
    with tempfile.TemporaryFile() as f1, tempfile.TemporaryFile() as f2:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {1: os.dup(1), 2: os.dup(2)}
        os.dup2(f1.fileno(), 1)
        os.dup2(f2.fileno(), 2)
        try:
            yield got
        finally:
            os.dup2(saved[1], 1)
            os.dup2(saved[2], 2)
            os.close(saved[1])
            os.close(saved[2])
            for fd, f in ((1, f1), (2, f2)):
                f.seek(0)
                got[fd] = f.read().decode("utf-8", "replace")


def run_edgeq(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`edgeq ARGS` in this process, from `cwd`: (exit code, stdout, stderr), stderr including
    native output and the warnings a terminal would show. Signal handlers, argv and cwd restored."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    argv, old_cwd = sys.argv, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = ["edgeq", *args]
    os.chdir(cwd)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
    try:
        with _fd_capture() as native, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli.main()
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in handlers.items():
            signal.signal(s, h)
        sys.argv = argv
        os.chdir(old_cwd)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, QUIET_WARNINGS)]
    stderr = err.getvalue() + native[2] + "".join(f"warning: {s}\n" for s in shown)
    return code, out.getvalue() + native[1], stderr


def files_under(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def check_contract(args: list[str], case: Path, kind: str) -> tuple[int, str, str]:
    """Run `edgeq ARGS` from the case folder; assert the CLI contract and that nothing was written."""
    CASES[kind] += 1
    before = files_under(case)
    code, out, err = run_edgeq(args, case)
    OUTCOMES[kind, code] += 1
    if code and os.environ.get("EDGEQ_FUZZ_STATS"):
        OUTCOMES[kind, re.sub(r"\S*/case\d+/", "", err.strip())[14:74]] += 1
    shown = f"edgeq {' '.join(args)}\n--- stdout:\n{out[-2000:]}\n--- stderr:\n{err[-4000:]}"
    assert code in (0, 2), f"exit {code}: {shown}"
    assert "Traceback" not in err and "Traceback" not in out, shown
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgeq: error:"), shown
        assert out == "", shown
    else:
        assert err.strip() == "", shown
        tomllib.loads(out)  # `edgeq config` prints the resolved options as TOML
    assert files_under(case) == before, f"files written: {sorted(files_under(case) - before)}; {shown}"
    return code, out, err


_case_ids = iter(range(10**9))


@contextlib.contextmanager
def new_case(world: dict):
    """A fresh, empty folder for one example (removed afterwards)."""
    case = world["root"] / f"case{next(_case_ids)}"
    case.mkdir()
    try:
        yield case
    finally:
        shutil.rmtree(case, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# A small valid encoder (input_ids, attention_mask -> last_hidden_state), its data, a tokenizer


VOCAB = 700


def encoder_model(hidden: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((VOCAB, hidden)).astype(np.float32), "emb")
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="gather"),
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["m"], name="unsqueeze"),
        helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["h", "mf"], ["last_hidden_state"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [emb, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeq-fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def valid_npz(path: Path, n: int = 8, seq: int = 12) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, input_ids=rng.integers(0, VOCAB, (n, seq)).astype(np.int64),
             attention_mask=np.ones((n, seq), np.int64))
    return path


@pytest.fixture(scope="module")
def world(tiny_bert, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    model = encoder_model()
    onnx_dir = root / "onnx-model"
    onnx_dir.mkdir()
    onnx.save(model, str(onnx_dir / "encoder.onnx"))
    w = {"root": root, "hf": tiny_bert, "tokenizer": tiny_bert, "onnx": onnx_dir / "encoder.onnx",
         "onnx_bytes": model.SerializeToString(), "model": model, "npz": valid_npz(root / "data.npz"),
         "profile": (Path(cli.__file__).parents[1] / "targets" / "x86_64.toml").read_text()}
    # warm up (imports, first reads) so no example pays for them against the deadline
    with new_case(w) as case:
        for args in (["config", str(w["hf"]), "-o", str(case / "out")],
                     ["config", str(w["onnx"]), "--tokenizer", str(w["tokenizer"]), "-o", str(case / "out")],
                     ["config", str(w["onnx"]), "--calib", str(w["npz"]), "--eval", str(w["npz"]), "-o", "out"]):
            code, out, err = run_edgeq(args, case)
            assert code == 0, err
    return w


def test_a_valid_case_passes_the_contract(world):
    """The harness itself: valid inputs exit 0 with the options as TOML; a known-bad one is one line."""
    with new_case(world) as case:
        code, out, _ = check_contract(["config", str(world["onnx"]), "--tokenizer", str(world["tokenizer"]),
                                       "--calib-samples", "7", "-o", str(case / "out")], case, "harness")
        assert code == 0 and tomllib.loads(out)["calib_samples"] == 7
        code, _, err = check_contract(["config", str(case / "nope.onnx")], case, "harness")
        assert code == 2 and "model not found" in err
    assert signal.getsignal(signal.SIGINT) is not cli._terminate  # handlers restored


def test_the_harness_catches_what_it_must(world, monkeypatch):
    """A contract violation fails check_contract: an internal error, native stderr noise, a visible
    warning, a written file."""
    import edgeq.config

    real = edgeq.config.resolve_config
    faults = {
        "internal": lambda **kw: 1 / 0,
        "native": lambda **kw: (os.write(2, b"[W] native library noise\n"), real(**kw))[1],
        "warning": lambda **kw: (warnings.warn("something odd", UserWarning), real(**kw))[1],
        "writes": lambda **kw: (Path("stray.txt").write_text("x"), real(**kw))[1],
    }
    for name, fault in faults.items():
        monkeypatch.setattr(edgeq.config, "resolve_config", fault)
        with new_case(world) as case, pytest.raises(AssertionError):
            check_contract(["config", str(world["hf"]), "-o", str(case / "out")], case, "harness")


# ---------------------------------------------------------------------------------------------------
# 1. ONNX files


def _onnx_args(world, path: Path, case: Path, data: str) -> list[str]:
    args = ["config", str(path), "-o", str(case / "out")]
    if data == "npz":
        return args + ["--calib", str(world["npz"]), "--eval", str(world["npz"])]
    return args + ["--tokenizer", str(world["tokenizer"])]


@st.composite
def onnx_bytes(draw, valid: bytes):
    how = draw(st.sampled_from(["random", "truncated", "bitflips", "splice"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    if how == "truncated":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if how == "splice":  # a valid prefix, then garbage
        cut = draw(st.integers(0, len(valid)))
        return valid[:cut] + draw(st.binary(min_size=1, max_size=256))
    data = bytearray(valid)
    for pos, bit in draw(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 7)), min_size=1,
                                  max_size=8)):
        data[pos] ^= 1 << bit
    return bytes(data)


def test_fuzz_onnx_bytes(world):
    valid = world["onnx_bytes"]

    @settings(max_examples=PLANNED["onnx_bytes"], **FUZZ)
    @given(blob=onnx_bytes(valid), data=st.sampled_from(["tokenizer", "npz"]))
    def fuzz(blob, data):
        with new_case(world) as case:
            path = case / "model.onnx"
            path.write_bytes(blob)
            check_contract(_onnx_args(world, path, case, data), case, "onnx_bytes")

    fuzz()


NAMES = st.sampled_from(["input_ids", "attention_mask", "emb", "axes", "h", "m", "mf", "last_hidden_state", "",
                         "dangling", "past_key_values.0.key", "present.0.key", "x" * 300]) | st.text(max_size=12)
ELEM_TYPES = st.integers(0, 26) | st.sampled_from([-1, 27, 1000, 2**31 - 1])
DIMS = st.lists(st.integers(-3, 4) | st.sampled_from([0, 2**31, 2**62, 2**63 - 1]) | st.text(max_size=6), max_size=5)
OP_TYPES = st.sampled_from(["MatMul", "Gather", "Add", "Relu", "Loop", "If", "Scan", "Conv", "Attention", "Bogus",
                            "Constant", "QuantizeLinear", "MatMulNBits", ""]) | st.text(max_size=10)
EXTERNAL_KEYS = st.sampled_from(["location", "offset", "length", "checksum", "basepath", "junk"])
EXTERNAL_VALUES = st.sampled_from(["w.bin", "../w.bin", "/etc/passwd", "", ".", "sub/../w.bin", "model.onnx", "a" * 300,
                                   "0", "-1", "64", "9" * 30, "abc", "\\..\\w.bin", "C:\\w.bin"]) | st.text(max_size=8)


def _set_type(vi, draw) -> None:
    kind = draw(st.sampled_from(["tensor", "tensor", "none", "sequence", "map", "optional", "sparse"]))
    vi.type.Clear()
    if kind == "none":
        return
    if kind == "tensor":
        t = helper.make_tensor_type_proto(draw(ELEM_TYPES), None)
        for d in draw(DIMS):
            dim = t.tensor_type.shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
        vi.type.CopyFrom(t)
    elif kind == "sequence":
        vi.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(draw(ELEM_TYPES), [2])))
    elif kind == "map":
        vi.type.CopyFrom(helper.make_map_type_proto(TensorProto.INT64,
                                                    helper.make_tensor_type_proto(TensorProto.FLOAT, [1])))
    elif kind == "optional":
        vi.type.CopyFrom(helper.make_optional_type_proto(helper.make_tensor_type_proto(draw(ELEM_TYPES), None)))
    else:
        vi.type.CopyFrom(helper.make_sparse_tensor_type_proto(draw(ELEM_TYPES), [2, 2]))


MUTATIONS = ["opset", "domain", "ir_version", "drop_input", "drop_output", "drop_node", "dangling", "op_type",
             "input_type", "output_type", "initializer", "external", "duplicate_output", "kv_cache", "attribute",
             "subgraph", "duplicate_input", "no_graph", "function", "metadata", "empty_graph", "sparse"]


@st.composite
def broken_model(draw, valid: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """A valid protobuf of a broken (or, by chance, still valid) model, and files to put beside it."""
    m = onnx.ModelProto()
    m.CopyFrom(valid)
    g = m.graph
    files: dict[str, bytes] = {}
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4)):
        if mutation == "opset":
            m.opset_import[0].version = draw(st.integers(-5, 30) | st.sampled_from([2**62, 10**6]))
        elif mutation == "domain":
            op = m.opset_import.add()
            op.domain, op.version = draw(st.sampled_from(["", "ai.onnx", "com.microsoft", "ai.onnx.ml"])
                                         | st.text(max_size=8)), draw(st.integers(-2, 40))
        elif mutation == "ir_version":
            m.ir_version = draw(st.integers(0, 20) | st.sampled_from([2**40, 2**63 - 1]))
        elif mutation in ("drop_input", "drop_output", "drop_node") and len(
                seq := {"drop_input": g.input, "drop_output": g.output, "drop_node": g.node}[mutation]):
            del seq[draw(st.integers(0, len(seq) - 1))]
        elif mutation == "dangling" and len(g.node):
            node = g.node[draw(st.integers(0, len(g.node) - 1))]
            target = node.input if draw(st.booleans()) or not len(node.output) else node.output
            if len(target):
                target[draw(st.integers(0, len(target) - 1))] = draw(NAMES)
            else:
                target.append(draw(NAMES))
        elif mutation == "op_type" and len(g.node):
            g.node[draw(st.integers(0, len(g.node) - 1))].op_type = draw(OP_TYPES)
        elif mutation in ("input_type", "output_type"):
            seq = g.input if mutation == "input_type" else g.output
            if len(seq):
                _set_type(seq[draw(st.integers(0, len(seq) - 1))], draw)
        elif mutation == "initializer" and len(g.initializer):
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            what = draw(st.sampled_from(["dims", "type", "raw", "name", "huge"]))
            if what == "dims":
                del t.dims[:]
                t.dims.extend(draw(st.lists(st.integers(-2, 10**6), max_size=4)))
            elif what == "type":
                t.data_type = draw(ELEM_TYPES)
            elif what == "raw":
                t.raw_data = draw(st.binary(max_size=64))
            elif what == "name":
                t.name = draw(NAMES)
            else:  # claims 2**40 elements, holds a few bytes
                del t.dims[:]
                t.dims.extend([2**20, 2**20])
        elif mutation == "external" and len(g.initializer):
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            t.ClearField("raw_data")
            t.data_location = draw(st.sampled_from([TensorProto.EXTERNAL, TensorProto.EXTERNAL, TensorProto.DEFAULT]))
            for _ in range(draw(st.integers(0, 3))):
                e = t.external_data.add()
                e.key, e.value = draw(EXTERNAL_KEYS), draw(EXTERNAL_VALUES)
            if draw(st.booleans()):
                files["w.bin"] = draw(st.binary(max_size=300))
            if draw(st.booleans()):
                files["sub/w.bin"] = draw(st.binary(max_size=64))
        elif mutation == "duplicate_output" and len(g.node) > 1:
            g.node[1].output[0] = g.node[0].output[0]
        elif mutation == "kv_cache" and len(g.input):
            g.input[draw(st.integers(0, len(g.input) - 1))].name = "past_key_values.0.key"
        elif mutation == "attribute" and len(g.node):
            node = g.node[draw(st.integers(0, len(g.node) - 1))]
            a = node.attribute.add()
            a.name = draw(st.sampled_from(["to", "axis", "value", "then_branch", "perm"]) | st.text(max_size=5))
            a.type = draw(st.integers(0, 14))
            a.i = draw(st.integers(-2**63, 2**63 - 1))
            if draw(st.booleans()):
                a.ints.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=3)))
        elif mutation == "subgraph" and len(g.node):
            node = g.node[draw(st.integers(0, len(g.node) - 1))]
            sub = helper.make_graph([helper.make_node(draw(OP_TYPES), [draw(NAMES)], [draw(NAMES)])], "sub", [], [])
            node.attribute.append(helper.make_attribute(draw(st.sampled_from(["then_branch", "body", "g"])), sub))
        elif mutation == "duplicate_input" and len(g.input):
            g.input.append(g.input[0])
        elif mutation == "no_graph":
            m.ClearField("graph")
            g = m.graph
        elif mutation == "function":
            f = m.functions.add()
            f.name, f.domain = draw(st.text(max_size=5)), draw(st.sampled_from(["", "local"]))
            f.node.append(helper.make_node(draw(OP_TYPES), [draw(NAMES)], [draw(NAMES)]))
            if len(g.node) and draw(st.booleans()):
                g.node[0].op_type, g.node[0].domain = f.name, f.domain
        elif mutation == "metadata":
            p = m.metadata_props.add()
            p.key, p.value = draw(st.text(max_size=5)), draw(st.text(max_size=20))
        elif mutation == "empty_graph":
            del g.node[:]
        elif mutation == "sparse":
            values = numpy_helper.from_array(np.ones(2, np.float32), draw(NAMES))
            idx = numpy_helper.from_array(np.array(draw(st.lists(st.integers(-5, 10), min_size=1, max_size=3)),
                                                   np.int64), "idx")
            g.sparse_initializer.append(helper.make_sparse_tensor(values, idx, draw(st.lists(st.integers(-1, 8),
                                                                                             max_size=2))))
    return m, files


def test_fuzz_onnx_graphs(world):
    @settings(max_examples=PLANNED["onnx_graphs"], **FUZZ)
    @given(model_files=broken_model(world["model"]), data=st.sampled_from(["tokenizer", "npz"]))
    def fuzz(model_files, data):
        model, files = model_files
        with new_case(world) as case:
            for name, content in files.items():
                (case / name).parent.mkdir(parents=True, exist_ok=True)
                (case / name).write_bytes(content)
            path = case / "model.onnx"
            path.write_bytes(model.SerializeToString())
            check_contract(_onnx_args(world, path, case, data), case, "onnx_graphs")

    fuzz()


# ---------------------------------------------------------------------------------------------------
# 2. Calibration and evaluation data


JSON_KEYS = st.sampled_from(["text", "label", "text1", "text2", "sentence1", "sentence2", "score", "body"]) | st.text(
    max_size=6)
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=30) | st.sampled_from(["", " ", "a b c", "the cat sat"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(JSON_KEYS, c, max_size=4),
                           max_leaves=8)
WORDS = st.sampled_from(["the", "a", "model", "is", "small", "fast", "é", "中文", "\u200b", "\t", "\x00", "🙂"])


@st.composite
def jsonl_line(draw) -> bytes:
    how = draw(st.sampled_from(["object", "object", "labelled", "pair", "value", "broken", "bytes"]))
    if how == "object":
        return json.dumps(draw(st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=4))).encode()
    if how == "labelled":
        return json.dumps({"text": draw(JSON_SCALARS | WORDS), "label": draw(JSON_SCALARS)}).encode()
    if how == "pair":
        return json.dumps({draw(st.sampled_from(["text1", "sentence1"])): draw(JSON_SCALARS | WORDS),
                           draw(st.sampled_from(["text2", "sentence2"])): draw(JSON_SCALARS | WORDS),
                           "score": draw(JSON_SCALARS)}).encode()
    if how == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    if how == "broken":
        return draw(st.sampled_from([b"{", b"{\"text\": }", b"[1,", b"{'text': 'x'}", b"NaN", b"{\"text\": \"a\"}}",
                                     b"\"text\"", b"{\"text\": \"\\ud800\"}"]))
    return draw(st.binary(max_size=40)).replace(b"\n", b" ")


@st.composite
def text_file(draw) -> bytes:
    how = draw(st.sampled_from(["random", "lines", "bad_utf8", "blank", "long"]))
    if how == "random":
        return draw(st.binary(max_size=2048))
    lines = [" ".join(draw(st.lists(WORDS, max_size=8))) for _ in range(draw(st.integers(0, 12)))]
    raw = "\n".join(lines).encode()
    if how == "bad_utf8":
        pos = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xff", b"\x80\x80"]))
        raw = raw[:pos] + bad + raw[pos:]
    elif how == "blank":
        raw = draw(st.sampled_from([b"", b"\n", b" \n\t\n", b"\r\n\r\n", b"\x0c"]))
    elif how == "long":
        raw = b"word " * draw(st.integers(1, 20000))
    return raw


def _npz_array(draw) -> np.ndarray:
    kind = draw(st.sampled_from(["int64", "int32", "float32", "float64", "bool", "uint8", "object", "str",
                                 "complex64", "structured", "float16"]))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    if kind == "object":
        a = np.empty(shape, dtype=object)
        for i in np.ndindex(shape):
            a[i] = draw(st.none() | st.integers() | st.text(max_size=3) | st.just([1, 2]))
        return a
    if kind == "str":
        return np.full(shape, draw(st.text(max_size=3)), dtype="<U3")
    if kind == "structured":
        return np.zeros(shape, dtype=[("a", "i8"), ("b", "f4")])
    value = draw(st.integers(-2**31, 2**31 - 1))
    with np.errstate(all="ignore"):  # out-of-range values wrap or become inf, as a careless writer's would
        return np.full(shape, value, dtype=np.int64).astype(kind)


@st.composite
def npz_file(draw) -> bytes:
    how = draw(st.sampled_from(["arrays", "arrays", "arrays", "random", "zip_junk", "npy", "truncated"]))
    buf = io.BytesIO()
    if how == "random":
        return draw(st.binary(max_size=1024))
    if how == "npy":
        np.save(buf, np.arange(draw(st.integers(0, 10))))
        return buf.getvalue()
    if how == "zip_junk":
        with zipfile.ZipFile(buf, "w") as z:
            for name in draw(st.lists(st.sampled_from(["input_ids.npy", "attention_mask.npy", "x.txt", "../up.npy",
                                                       "/abs.npy"]), max_size=3, unique=True)):
                z.writestr(name, draw(st.binary(max_size=64)))
        return buf.getvalue()
    names = draw(st.lists(st.sampled_from(["input_ids", "attention_mask", "token_type_ids"]) | st.text(
        alphabet="abcdefghij_", min_size=1, max_size=8), max_size=4, unique=True))
    np.savez(buf, **{n: _npz_array(draw) for n in names})
    data = buf.getvalue()
    if how == "truncated" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    return data


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from([".txt", ".jsonl", ".npz", ".ndjson", ".text", ".TXT", ".json", ".csv", ""]))
    fmt = draw(st.sampled_from(["matching", "matching", "matching", "other"]))
    if fmt == "other":
        content = draw(st.sampled_from([text_file(), npz_file(), st.binary(max_size=512)]).flatmap(lambda s: s))
    elif ext.lower() in (".jsonl", ".ndjson"):
        content = b"\n".join(draw(st.lists(jsonl_line(), max_size=10)))
    elif ext == ".npz":
        content = draw(npz_file())
    else:
        content = draw(text_file())
    return ext, content


def test_fuzz_data_files(world):
    @settings(max_examples=PLANNED["data_files"], **FUZZ)
    @given(file=data_file(), slot=st.sampled_from(["calib", "eval", "both"]),
           model=st.sampled_from(["hf", "onnx"]),
           extra=st.lists(st.sampled_from([("--text-field", "body"), ("--budget-metric", "task"),
                                           ("--calib-samples", "1"), ("--eval-samples", "2"), ("--max-length", "2"),
                                           ("--mode", "static")]), max_size=2, unique=True))
    def fuzz(file, slot, model, extra):
        ext, content = file
        with new_case(world) as case:
            path = case / f"data{ext}"
            path.write_bytes(content)
            args = ["config", str(world[model]), "-o", str(case / "out")]
            if model == "onnx":
                args += ["--tokenizer", str(world["tokenizer"])]
            if slot in ("calib", "both"):
                args += ["--calib", str(path)]
            if slot in ("eval", "both"):
                args += ["--eval", str(path)]
            check_contract(args + [x for pair in extra for x in pair], case, "data_files")

    fuzz()


# ---------------------------------------------------------------------------------------------------
# 3. Hugging Face model folders: config.json, tokenizer files, weights


ARCHS = st.sampled_from(["BertModel", "BertForSequenceClassification", "BertForTokenClassification",
                         "LlamaForCausalLM", "GPT2LMHeadModel", "T5ForConditionalGeneration", "", "Nope"])
HF_PLAUSIBLE = {
    "architectures": st.lists(ARCHS, max_size=2) | ARCHS,
    "model_type": st.sampled_from(["bert", "llama", "t5", "gpt2", "", "nope"]),
    "is_encoder_decoder": st.booleans(),
    "max_position_embeddings": st.sampled_from([0, 1, 127, 128, 512, -1, 2**70, 1.5, True]),
    "auto_map": st.sampled_from([{}, {"AutoModel": "modeling_x.X"}, {"AutoTokenizer": ["tok_x.T", None]}, "x", [1]]),
    "custom_pipelines": st.sampled_from([{}, {"p": {"impl": "p.P"}}, None]),
    "vocab_size": st.sampled_from([0, 10, 705, -1]),
    "num_labels": st.sampled_from([0, 3, -1]),
}


@st.composite
def hf_config(draw) -> bytes:
    how = draw(st.sampled_from(["object", "object", "object", "object", "value", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    doc = {}
    for key in draw(st.lists(st.sampled_from(sorted(HF_PLAUSIBLE)) | JSON_KEYS, max_size=5, unique=True)):
        doc[key] = draw(HF_PLAUSIBLE[key] if key in HF_PLAUSIBLE and draw(st.integers(0, 3)) else JSON_VALUES)
    return json.dumps(doc).encode()


def test_fuzz_hf_folders(world):
    tokenizer_files = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    @settings(max_examples=PLANNED["hf_folders"], **FUZZ)
    @given(config=hf_config(), tok_files=st.lists(st.sampled_from(tokenizer_files), max_size=4, unique=True),
           tok_config=st.none() | hf_config(),
           weights=st.lists(st.sampled_from(["model.safetensors", "pytorch_model.bin", "weights.pt", "x.ckpt",
                                             "model.safetensors.index.json", "modeling_x.py"]),
                            max_size=3, unique=True),
           flags=st.lists(st.sampled_from(["--trust-remote-code", "--allow-pickle", "--tokenizer", "--seq-len",
                                           "--mode"]), max_size=3, unique=True))
    def fuzz(config, tok_files, tok_config, weights, flags):
        with new_case(world) as case:
            d = case / "model"
            d.mkdir()
            (d / "config.json").write_bytes(config)
            for name in tok_files:
                shutil.copyfile(world["tokenizer"] / name, d / name)
            if tok_config is not None:
                (d / "tokenizer_config.json").write_bytes(tok_config)
            for name in weights:
                (d / name).write_bytes(b"not really weights")
            args = ["config", str(d), "-o", str(case / "out")]
            for flag in flags:
                args += {"--tokenizer": ["--tokenizer", str(world["tokenizer"])], "--seq-len": ["--seq-len", "300"],
                         "--mode": ["--mode", "int4"]}.get(flag, [flag])
            check_contract(args, case, "hf_folders")

    fuzz()


# ---------------------------------------------------------------------------------------------------
# 4. edgeq.toml and target profiles


INT_KEYS = ["calib_samples", "eval_samples", "runs", "warmup", "threads", "seq_len", "max_length", "batch_size",
            "block_size", "accuracy_level", "new_tokens"]
FLOAT_KEYS = ["percentile", "max_accuracy_drop", "min_speedup", "max_size_mb"]
BOOL_KEYS = ["fp16_io", "trust_remote_code", "allow_pickle", "int4_symmetric"]
PATH_KEYS = ["model", "target", "calib", "eval", "tokenizer", "out"]
BUILD_KEYS = INT_KEYS + FLOAT_KEYS + BOOL_KEYS + PATH_KEYS + [
    "modes", "mode", "calib_method", "text_field", "task", "name", "input_shape", "preprocess", "budget_metric",
    "int4_algo", "int4_algos"]
OTHER_KEYS = ["config", "config_file", "eval_path", "json", "fresh", "write", "from_build", "Model", "calib-samples",
              "help", ""]
TOML_SCALARS = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20)
                | st.datetimes() | st.dates() | st.times())
TOML_VALUES = st.recursive(TOML_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                             max_size=2), max_leaves=6)
PATHS = st.sampled_from(["data.txt", "data.jsonl", "data.npz", "missing.txt", ".", "..", "sub", "images",
                         "profile.toml", "/dev/null", "/etc/passwd", "/", "~/nope.txt", "model.onnx", "tok",
                         "edgeq.toml", "edgeq.zoo:efficientnet_lite0", "os.path:join", "nope.nope:f", "x86_64",
                         "arm64", "riscv", "", "dat\x00a.txt", "data.txt/", "./data.txt", "a" * 300])
MODES = st.sampled_from(["static", "dynamic", "fp16", "hybrid", "int4", "nf4", "fp8", "", "STATIC"])
INT4_ALGOS = st.sampled_from(["rtn", "gptq", "awq", "hqq", "kquant", "gguf", "rtn,gptq", "GPTQ", "", ",", "spqr"])
PLAUSIBLE = {
    **{k: st.integers(-3, 6) | st.sampled_from([0, 10**6, 2**31, 2**63 - 1, -2**63, 1.0, "12"]) for k in INT_KEYS},
    "block_size": st.sampled_from([8, 16, 32, 33, 256, 512, 0, -32]),
    "accuracy_level": st.integers(-1, 6),
    **{k: st.floats() | st.sampled_from([0, 1, -1, 0.01, 0.5, 1.0, 100, 101, 1e-320, "0.1"]) for k in FLOAT_KEYS},
    **{k: st.booleans() | st.sampled_from([0, 1, "true", "yes"]) for k in BOOL_KEYS},
    **{k: PATHS for k in PATH_KEYS},
    "modes": st.lists(MODES, max_size=3) | MODES, "mode": st.lists(MODES, max_size=3) | MODES,
    "calib_method": st.sampled_from(["minmax", "entropy", "percentile", "distribution", "MinMax", "", "magic"]),
    "text_field": st.sampled_from(["text", "label", "", "body", "\x00"]) | st.text(max_size=5),
    "task": st.sampled_from(["feature-extraction", "text-classification", "text-generation", ""]),
    "name": st.sampled_from(["ok-name", "../x", "", ".", "..", "a" * 200, "x/y", "名前", "-x", "x y"]),
    "input_shape": st.lists(st.integers(-1, 300) | st.sampled_from([2**40, 0]), max_size=5) | st.sampled_from(
        ["1,3,224,224", "1x3x8x8", "a,b", "", "1,3", "1,,2", "-1,3,2,2"]),
    "preprocess": st.sampled_from(["resize=256,crop=224", "mean=1,2,3", "std=0", "resize=-1", "crop=0", "bogus=1",
                                   "resize=abc", "", "=", ",,,", "layout=NHWC", "mean=nan", "std=inf,1,1",
                                   "resize=10,crop=20"]),
    "budget_metric": st.sampled_from(["cosine", "task", "", "Cosine"]),
    "int4_algo": st.lists(INT4_ALGOS, max_size=3) | INT4_ALGOS, "int4_algos": st.lists(INT4_ALGOS, max_size=3) | INT4_ALGOS,
}


@st.composite
def options(draw) -> dict:
    """edgeq build options, most with plausible but often wrong values, some with anything TOML holds."""
    doc = {}
    for key in draw(st.lists(st.sampled_from(BUILD_KEYS) | st.sampled_from(OTHER_KEYS), max_size=6, unique=True)):
        plausible = PLAUSIBLE.get(key)
        doc[key] = draw(plausible if plausible is not None and draw(st.integers(0, 3)) else TOML_VALUES)
    return doc


@st.composite
def toml_doc(draw) -> str:
    how = draw(st.sampled_from(["structured", "structured", "structured", "lines", "random", "bytes"]))
    if how == "random":
        return draw(st.text(max_size=300))
    if how == "bytes":
        return draw(st.binary(max_size=300)).decode("latin-1")
    if how == "lines":
        keys = st.sampled_from(BUILD_KEYS) | st.text(max_size=6)
        line = st.one_of(
            st.builds(lambda k, v: f"{k} = {v}", keys, st.sampled_from(
                ["1", "-1", "1.5", "true", "\"x\"", "'x'", "[\"static\"]", "[", "\"unterminated", "{a = 1}", "nan",
                 "inf", "1979-05-27", "0x10", "1_000", "\"\"\"multi\"\"\"", "[[1], \"a\"]", ""])),
            st.sampled_from(["[table]", "[[array]]", "[options]", "# comment", "=", "key", "a.b.c = 1", "\"q\" = 2"]),
            st.text(max_size=20))
        return "\n".join(draw(st.lists(line, max_size=8)))
    doc = draw(options())
    import tomli_w

    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):  # something TOML cannot hold: what a user could write instead
        return "\n".join(f"{k} = {v!r}" for k, v in doc.items())


def as_argv(doc: dict) -> list[str]:
    """The same options on the command line (`--calib-samples 3`, `--mode a --mode b`, flags)."""
    args = []
    for key, value in doc.items():
        if not key or key not in BUILD_KEYS or key == "model":
            continue
        flag = "--" + {"modes": "mode"}.get(key, key).replace("_", "-")
        if key in BOOL_KEYS:
            args += [flag] if value is True else []
        elif isinstance(value, list):
            args += [x for v in value for x in (flag, str(v))] if key in ("modes", "mode") else [
                flag, ",".join(map(str, value))]
        else:
            args += [flag, str(value)]
    return args


PROFILE_VALUES = ["1", "-1", "true", "[]", "[1]", '"x"', "{}", "1e999", "2**64", "9223372036854775808", "'QDQ'",
                  "['MatMul', 1]", "'int8'", "12", "24"]


@st.composite
def target_profile(draw, valid: str) -> str:
    """The bundled x86_64 profile with a few lines replaced, dropped or added."""
    lines = valid.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["replace", "drop", "add", "value"]))
        i = draw(st.integers(0, len(lines) - 1))
        if how == "drop":
            del lines[i]
        elif how == "add":
            lines.insert(i, draw(st.sampled_from(["[static_vision]", "[fp16]", "[package]", "[bogus]", "opset = 99",
                                                  "name = '../x'", "modes = []", "static = 1", "package = 3",
                                                  "execution_providers = []", "arch = 'riscv'"])
                                 | st.text(max_size=20)))
        elif how == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(st.sampled_from(PROFILE_VALUES))}"
        else:
            lines[i] = draw(st.text(max_size=30))
        if not lines:
            break
    return "\n".join(lines)


def test_fuzz_config_files(world):
    @settings(max_examples=PLANNED["config_files"], **FUZZ)
    @given(what=st.sampled_from(["edgeq.toml", "edgeq.toml", "edgeq.toml", "argv", "profile"]), data=st.data(),
           model_arg=st.sampled_from(["hf", "onnx", "none"]))
    def fuzz(what, data, model_arg):
        with new_case(world) as case:
            (case / "data.txt").write_text("one sample\nanother sample\n")
            (case / "data.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
            shutil.copyfile(world["npz"], case / "data.npz")
            shutil.copyfile(world["onnx"], case / "model.onnx")
            (case / "sub").mkdir()
            (case / "images").mkdir()
            (case / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
            args = ["config"] + ({"hf": [str(world["hf"])], "onnx": [str(world["onnx"])], "none": []}[model_arg])
            if model_arg == "onnx":
                args += ["--tokenizer", str(world["tokenizer"])]
            if what == "profile":
                (case / "profile.toml").write_text(data.draw(target_profile(world["profile"])), encoding="utf-8")
                args += ["--target", "profile.toml"]
                if model_arg == "none":
                    args.insert(1, str(world["hf"]))
            elif what == "argv":
                args += as_argv(data.draw(options()))
                if "\x00" in "".join(args):
                    args = [a.replace("\x00", "") for a in args]  # argv cannot hold NUL
            else:
                (case / "edgeq.toml").write_text(data.draw(toml_doc()), encoding="utf-8")
                args += ["--config", "edgeq.toml"]
            check_contract(args, case, "config_files")

    fuzz()


# ---------------------------------------------------------------------------------------------------
# Crashes the fuzzing found in code outside this test's reach: reproducers, expected to fail until fixed


LONG = "a" * 300  # longer than a file name may be (NAME_MAX 255): every stat() of it raises ENAMETOOLONG


@pytest.mark.parametrize("option", ["MODEL", "--calib", "--eval", "--tokenizer", "--out", "--config"])
def test_found_by_fuzzing_over_long_path(world, option):
    with new_case(world) as case:
        args = ["config", LONG] if option == "MODEL" else ["config", str(world["hf"]), option, LONG]
        code, _, err = check_contract(args, case, "regressions")
        assert code == 2 and "File name too long" in err


def test_found_by_fuzzing_npz_member_that_is_not_an_array(world):
    from edgeq.calib import read_npz
    from edgeq.core import EdgeqError

    with new_case(world) as case:
        path = case / "junk.npz"
        buf = io.BytesIO()
        np.save(buf, np.ones((2, 3), np.int64))
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("input_ids.npy", b"not an array")
            z.writestr("attention_mask.npy", buf.getvalue())
        with pytest.raises(EdgeqError, match="input_ids"):
            read_npz(path, ["input_ids", "attention_mask"], "calibration")


def test_fuzz_ran_enough_cases():
    """Runs last (file order): the fuzz tests above ran at least MIN_TOTAL cases in all."""
    ran = {k: CASES[k] for k in PLANNED}
    codes = ", ".join(f"{kind}:{code}={n}" for (kind, code), n in sorted(OUTCOMES.items(), key=str)
                      if isinstance(code, int))
    print(f"\nfuzz cases run: {ran}, total {sum(ran.values())}; exit codes: {codes}")
    if os.environ.get("EDGEQ_FUZZ_STATS"):
        for (kind, msg), n in OUTCOMES.most_common():
            if isinstance(msg, str) and n:
                print(f"  {n:4d} {kind}: {msg}")
    if not all(ran.values()):
        pytest.skip(f"not every fuzz test ran in this session ({ran})")
    assert sum(ran.values()) >= MIN_TOTAL, ran
