"""Retrieval fidelity for embedding models (query/positive sets, recall and nDCG against the labels
and against fp32's own ranking, vector-store embedding precision) and the PyTorch dynamic-int8
baseline row."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_build
from edgeq.calib import read_eval_set
from edgeq.core import EdgeqError
from edgeq.metrics import embedding_codec, encode_embeddings, retrieval_metrics


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corpus(n_docs=14, n_queries=6):
    """Queries q{i} whose positive is document d{i}; the other documents are the corpus's rest."""
    rows = [{"query": f"question number {i}", "positive": f"document {i}"} for i in range(n_queries)]
    return rows + [{"document": f"document {i}"} for i in range(n_docs)]  # repeats are stored once


def test_retrieval_set_reading(tmp_path):
    s = read_eval_set(_jsonl(tmp_path / "r.jsonl", _corpus() + [
        {"query": "two answers", "positive": ["document 3", "document 20"]}]))
    assert s.kind == "retrieval" and len(s) == 7 and len(s.docs) == 15  # "document 20" joins the corpus
    assert [s.texts[s.docs[p]] for p in s.positives[6]] == ["document 3", "document 20"]
    assert [s.texts[q] for q in s.queries[:2]] == ["question number 0", "question number 1"]
    # a limit counts queries; the corpus is read whole
    lim = read_eval_set(tmp_path / "r.jsonl", limit=2)
    assert len(lim) == 2 and len(lim.docs) == 15
    # calibration texts drop queries, never documents; a subset keeps the whole corpus
    w = s.without({"question number 1", "document 2"})
    assert len(w) == 6 and len(w.docs) == 15 and "question number 1" not in [w.texts[q] for q in w.queries]
    sub = s.subset([0, 2])
    assert len(sub) == 2 and len(sub.docs) == 15 and sub.texts[sub.docs[sub.positives[1][0]]] == "document 2"


@pytest.mark.parametrize("rows, message", [
    ([{"query": "q", "positive": ""}] + [{"document": f"d{i}"} for i in range(12)], ":1: expected 'positive'"),
    ([{"query": "q", "positive": "d0"}, {"document": 3}], ":2: a retrieval set's lines are"),
    ([{"query": "", "positive": "d0"}], ":1: expected a non-empty string 'query'"),
    ([{"query": "q", "positive": "d0"}] + [{"document": f"d{i}"} for i in range(5)], "more than 10 documents"),
    ([{"document": f"d{i}"} for i in range(20)], "needs queries"),
])
def test_bad_retrieval_sets(tmp_path, rows, message):
    with pytest.raises(EdgeqError, match=message):
        read_eval_set(_jsonl(tmp_path / "e.jsonl", rows))


def _set(tmp_path):
    return read_eval_set(_jsonl(tmp_path / "r.jsonl", _corpus(n_docs=12, n_queries=4)))


def test_retrieval_metrics_by_hand(tmp_path):
    s = _set(tmp_path)  # texts: q0, d0, q1, d1, ..., then d4..d11
    rng = np.random.default_rng(0)
    dim = 32
    emb = np.zeros((len(s.texts), dim), np.float32)
    docs = rng.normal(size=(len(s.docs), dim)).astype(np.float32)
    emb[s.docs] = docs
    for k, q in enumerate(s.queries):  # every query nearest its positive, then the next document
        p = s.positives[k][0]
        emb[q] = docs[p] + 0.5 * docs[(p + 1) % len(s.docs)]
    r = retrieval_metrics(s, {"fp32": emb, "same": emb.copy(), "swap": emb.copy()})
    assert r["fp32"]["recall@1"] == 1.0 and r["fp32"]["ndcg@10"] == pytest.approx(1.0)
    assert [r["same"][k] for k in ("recall@1_vs_fp32", "recall@10_vs_fp32", "ndcg@10_vs_fp32")] == pytest.approx([1, 1, 1])
    # an artifact whose query 0 points elsewhere: fp32's first document lost for one query of four
    bad = emb.copy()
    bad[s.queries[0]] = -emb[s.queries[0]]
    r = retrieval_metrics(s, {"fp32": emb, "bad": bad})["bad"]
    assert r["recall@1_vs_fp32"] == 0.75 and r["recall@1"] == 0.75
    assert r["recall@10_vs_fp32"] < 1.0 and r["ndcg@10_vs_fp32"] < 1.0
    # nDCG with one relevant document at rank 2 is 1/log2(3)
    two = emb.copy()
    two[s.queries[1]] = docs[s.positives[1][0]] * 0.9 + docs[7] * 1.2
    m = retrieval_metrics(s, {"fp32": emb, "two": two})["two"]
    assert m["recall@1"] == 0.75 and m["ndcg@10"] == pytest.approx((3 + 1 / np.log2(3)) / 4)


def test_embedding_codecs():
    rng = np.random.default_rng(1)
    cal = rng.normal(size=(200, 16)).astype(np.float32)
    c = embedding_codec("int8", cal)
    e = encode_embeddings(cal[:5], c)
    assert e.min() >= -128 and e.max() <= 127 and np.all(e == np.round(e))
    b = encode_embeddings(cal[:5], embedding_codec("binary"))
    assert set(np.unique(b)) <= {-1.0, 1.0}
    # a dot product of +-1 codes is dim - 2 * Hamming distance
    bits = cal[:2] > 0
    assert b[0] @ b[1] == 16 - 2 * int((bits[0] != bits[1]).sum())
    with pytest.raises(ValueError):
        embedding_codec("int8", None)


def test_lee_retrieval_set_from_gensim(tmp_path):
    from edgeq.calib import gensim_data

    rows = gensim_data.lee_retrieval()
    s = read_eval_set(_jsonl(tmp_path / "lee.jsonl", rows))
    assert len(s.docs) >= 1000 and len(s) >= 300
    queries = {s.texts[q] for q in s.queries}
    assert not queries & {s.texts[d] for d in s.docs}  # a query is never a document
    assert len(queries) == len(s)  # each story asks once


def _real_corpus(tmp_path, n_queries=10, n_docs=30):
    from edgeq.calib import default_eval_path

    lines = [t for t in default_eval_path().read_text().splitlines() if t.strip()]
    rows = [{"query": lines[i], "positive": lines[i + 1]} for i in range(0, 2 * n_queries, 2)]
    rows += [{"document": t} for t in lines[2 * n_queries:2 * n_queries + n_docs]]
    return _jsonl(tmp_path / "ret.jsonl", rows)


@pytest.fixture(scope="module")
def retrieval_build(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ret")
    data = _real_corpus(tmp)
    return run_build(tiny_bert, tmp / "out", target="x86_64", modes=("static", "dynamic"), eval_path=str(data),
                     eval_samples=None, max_accuracy_drop=0.2, budget_metric="retrieval",
                     embedding_precisions=("int8,binary",)), data


def test_build_reports_retrieval_and_gates_on_it(retrieval_build):
    m, data = retrieval_build
    arts = {a["name"]: a["metrics"] for a in m["artifacts"]}
    assert set(arts) == {"fp32", "int8-static", "int8-dynamic", "int8-hybrid"}
    keys = {"recall@1", "recall@10", "ndcg@10", "recall@1_vs_fp32", "recall@10_vs_fp32", "ndcg@10_vs_fp32"}
    for name, a in arts.items():
        assert set(a["retrieval"]) == keys and all(0 <= v <= 1 for v in a["retrieval"].values())
        assert a["task"]["metric"] == "ndcg@10" and a["task"]["value"] == a["retrieval"]["ndcg@10"]
        assert a["task"]["samples"] == 10  # queries
    assert [arts["fp32"]["retrieval"][k] for k in ("recall@1_vs_fp32", "recall@10_vs_fp32")] == [1.0, 1.0]
    # the hybrid search's steps are judged on recall@10 vs fp32, the gate likewise
    prec = next(s for s in m["stages"] if s["stage"] == "precision")
    assert prec["settings"]["hybrid"]["budget_metric"] == "retrieval"
    for step in prec["metrics"]["hybrid"]["curve"]:
        assert step["meets_budget"] == (1 - step["recall@10_vs_fp32"] <= 0.2 + 1e-12)
    checks = {c["gate"]: c for c in m["gates"]["artifacts"]["int8-static"]["checks"]}
    acc = checks["max_accuracy_drop"]
    assert acc["measure"] == "1 - recall@10 vs fp32's ranking"
    assert acc["value"] == pytest.approx(1 - arts["int8-static"]["retrieval"]["recall@10_vs_fp32"], abs=1e-6)
    from edgeq.summary import json_summary, summary_table
    head = summary_table(m).splitlines()[1]
    assert "ndcg@10" in head and "R@1 fp32" in head and "R@10 fp32" in head
    assert json_summary(m)["artifacts"][1]["metrics"]["retrieval"] == m["artifacts"][1]["metrics"]["retrieval"]


def _fp32_embeddings(manifest: dict, texts: list[str]) -> np.ndarray:
    """Mean-pooled embeddings of `texts` by the build's fp32 artifact, one text per run."""
    from pathlib import Path

    import onnxruntime as ort
    from transformers import AutoTokenizer

    from edgeq.metrics import pooled
    build_dir = Path(manifest["build_dir"])
    sess = ort.InferenceSession(str(build_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(str(build_dir / "tokenizer"))
    emb = []
    for t in texts:
        enc = tok([t], return_tensors="np", truncation=True, max_length=128)
        emb.append(pooled(sess.run(None, {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()})[0],
                          enc["attention_mask"]))
    return np.concatenate(emb)


def test_retrieval_recomputed_from_the_artifact(retrieval_build, tmp_path):
    """The recorded recall is what the fp32 model's own embeddings give on the file."""
    m, data = retrieval_build
    s = read_eval_set(data)
    got = retrieval_metrics(s, {"fp32": _fp32_embeddings(m, s.texts)})["fp32"]
    rec = next(a for a in m["artifacts"] if a["name"] == "fp32")["metrics"]["retrieval"]
    assert got["recall@10"] == pytest.approx(rec["recall@10"], abs=1e-6)
    assert got["ndcg@10"] == pytest.approx(rec["ndcg@10"], abs=1e-6)


def test_embedding_codes_measured_for_every_artifact(retrieval_build):
    m, data = retrieval_build
    ev = next(s for s in m["stages"] if s["stage"] == "evaluate")
    codes = ev["settings"]["task"]["embedding_codes"]
    assert set(codes) == {"int8", "binary"} and len(codes["int8"]["min"]) == len(codes["int8"]["max"])
    assert all(lo <= hi for lo, hi in zip(codes["int8"]["min"], codes["int8"]["max"]))
    for a in m["artifacts"]:
        rc = a["metrics"]["retrieval_codes"]
        assert set(rc) == {"int8", "binary"} and all(0 <= v <= 1 for c in rc.values() for v in c.values())
    # recomputed: fp32's own int8 codes with the recorded ranges give the recorded recall
    s = read_eval_set(data)
    emb = _fp32_embeddings(m, s.texts)
    codec = {"precision": "int8", "min": np.array(codes["int8"]["min"], np.float32),
             "max": np.array(codes["int8"]["max"], np.float32)}
    got = retrieval_metrics(s, {"fp32": emb, "c": emb}, codec)["c"]
    rec = next(a for a in m["artifacts"] if a["name"] == "fp32")["metrics"]["retrieval_codes"]["int8"]
    assert got["recall@10_vs_fp32"] == pytest.approx(rec["recall@10_vs_fp32"], abs=2e-3)
    from edgeq.summary import summary_table
    head = summary_table(m).splitlines()[1]
    assert "R@10 int8" in head and "R@10 binary" in head


def test_torch_dynamic_baseline_row(retrieval_build):
    m, _ = retrieval_build
    bench = next(s for s in m["stages"] if s["stage"] == "benchmark")
    (b,) = bench["metrics"]["baselines"]
    assert b["name"] == "torch-dynamic-int8" and "quantize_dynamic" in b["recipe"]
    assert b["size_bytes"] > 0 and 0 < b["size_vs_fp32"] < 1.2
    assert b["latency_p50_ms"] > 0 and b["speedup_vs_fp32"] > 0 and 0.5 < b["cosine"] <= 1.0 + 1e-6
    assert b["threads"] == bench["settings"]["threads"] and b["provider"].startswith("torch ")
    assert b["provider"].endswith(f"{b['threads']} threads")
    from edgeq.summary import json_summary, summary_table
    table = summary_table(m)
    row = next(line for line in table.splitlines() if line.startswith("torch-dynamic-int8*"))
    assert f"{b['cosine']:.4f}" in row and f"{b['speedup_vs_fp32']:.2f}x" in row
    assert "* torch-dynamic-int8: a baseline, not an artifact" in table
    assert json_summary(m)["baselines"][0]["name"] == "torch-dynamic-int8"
    # nothing of it is packaged
    assert not any("torch" in f["path"] for f in m["files"])


def test_bad_retrieval_and_baseline_settings_exit_2(tiny_bert, tiny_classifier, retrieval_build, tmp_path):
    from edgeq.calib import default_eval_path

    onnx_file = __import__("pathlib").Path(retrieval_build[0]["build_dir"]) / "model.fp32.onnx"
    for args, message in [
        ([str(tiny_bert), "--budget-metric", "retrieval", "--max-accuracy-drop", "0.05", "--eval",
          str(default_eval_path())], "--budget-metric retrieval needs a retrieval set"),
        ([str(tiny_bert), "--embedding-precision", "int8"], "--embedding-precision measures vector-store codes"),
        ([str(tiny_bert), "--embedding-precision", "int4"], "--embedding-precision int4: choose from int8, binary"),
        ([str(onnx_file), "--tokenizer", str(onnx_file.parent / "tokenizer"), "--torch-baseline"],
         "--torch-baseline measures PyTorch's dynamic int8 of a Hugging Face"),
        # a classifier's output is logits: ranking documents by them would measure nothing
        ([str(tiny_classifier), "--eval", str(retrieval_build[1])], "is a text classifier (its output is class logits)"),
    ]:
        r = subprocess.run([sys.executable, "-m", "edgeq", "build", *args, "--out", str(tmp_path)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_distilbert_end_to_end(tmp_path):
    """The seeds' worked example's architecture (a small random DistilBertConfig): export, the
    attention fusions, static and dynamic int8, and the PyTorch baseline beside them."""
    import torch
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel

    from conftest import _vocab_from_calibration
    d = tmp_path / "tiny-distilbert"
    d.mkdir()
    vocab = _vocab_from_calibration()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=128)
    DistilBertModel(cfg).eval().save_pretrained(str(d))
    m = run_build(d, tmp_path / "out", target="x86_64", modes=("static", "dynamic"))
    opt = next(s for s in m["stages"] if s["stage"] == "optimize")
    assert opt["metrics"]["fused_ops"].get("Attention", 0) + opt["metrics"]["fused_ops"].get("MultiHeadAttention", 0) == 2
    arts = {a["name"]: a["metrics"] for a in m["artifacts"]}
    assert set(arts) == {"fp32", "int8-static", "int8-dynamic"}
    for name in ("int8-static", "int8-dynamic"):
        assert arts[name]["cosine"] > 0.95 and arts[name]["size_vs_fp32"] < 0.6
    (b,) = next(s for s in m["stages"] if s["stage"] == "benchmark")["metrics"]["baselines"]
    assert b["cosine"] > 0.95 and b["latency_p50_ms"] > 0


def test_a_baseline_pytorch_cannot_run_is_recorded_and_the_artifacts_still_measured(tmp_path):
    """The runner: a torch spec whose model cannot load gives `torch_error`, and every ONNX model
    is still timed."""
    import onnx
    from onnx import TensorProto, helper

    from edgeq.measure import measure
    g = helper.make_graph([helper.make_node("Relu", ["input_ids"], ["y"])], "g",
                          [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "in.npz", input_ids=np.ones((1, 4), np.float32))
    rs = measure([tmp_path / "m.onnx"], tmp_path / "in.npz", "CPUExecutionProvider", 1, 1, 3, partition=False,
                 torch={"dir": str(tmp_path / "no-such-model"), "task": "feature-extraction"})
    assert len(rs) == 2 and rs[0]["latency_p50_ms"] > 0
    assert "error" in rs[1] and "latency_p50_ms" not in rs[1]
