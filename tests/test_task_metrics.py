"""Task metrics on labelled evaluation data: readers, the statistics, and what a build records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_build
from edgeq.calib import read_eval_set
from edgeq.core import EdgeqError
from edgeq.metrics import pair_cosines, probe_accuracy, spearman


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_set_kinds(tmp_path):
    cls = read_eval_set(_jsonl(tmp_path / "c.jsonl", [{"text": "a b", "label": "pos"}, {"text": " ", "label": "x"},
                                                        {"text": "c d", "label": 0}]))
    assert (cls.kind, cls.texts, cls.labels) == ("classification", ["a b", "c d"], ["pos", 0])
    # the field names are fixed by the first line: a later line without them is an error
    with pytest.raises(EdgeqError, match=":2: expected non-empty strings 'text1' and 'text2'"):
        read_eval_set(_jsonl(tmp_path / "mixed.jsonl", [{"text1": "a", "text2": "b", "score": 1},
                                                         {"sentence1": "x", "sentence2": "y", "score": 0.5}]))
    alt = read_eval_set(_jsonl(tmp_path / "s.jsonl", [{"sentence1": "x", "sentence2": "y", "score": 0.5},
                                                       {"sentence1": "x", "sentence2": "z", "score": 0.1}]))
    assert alt.kind == "pairs" and alt.texts == ["x", "y", "z"]
    ok = read_eval_set(_jsonl(tmp_path / "p2.jsonl", [{"text1": "a", "text2": "b", "score": 1},
                                                       {"text1": "b", "text2": "c", "score": 0.2},
                                                       {"text1": "a", "text2": "c", "score": 0.4}]))
    assert ok.texts == ["a", "b", "c"] and ok.pairs == [(0, 1), (1, 2), (0, 2)] and ok.scores == [1.0, 0.2, 0.4]
    assert len(read_eval_set(tmp_path / "p2.jsonl", limit=2)) == 2
    plain = read_eval_set(_jsonl(tmp_path / "t.jsonl", [{"text": "only text"}]))
    assert plain.kind == "text"


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "at least two labels"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": [1]}], ":2: expected a 'label'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": True}], ":2: expected a 'label'"),
    ([{"text1": "a", "text2": "b", "score": 1}, {"text1": "c", "text2": "d", "score": 1}], "all equal"),
    ([{"text1": "a", "text2": "b", "score": "high"}], ":1: expected a number 'score'"),
    ([{"text1": "a", "text2": "b", "score": float("nan")}], ":1: expected a number 'score'"),
    ([["not", "an", "object"]], ":1: expected a JSON object"),
])
def test_bad_labelled_sets(tmp_path, rows, message):
    with pytest.raises(EdgeqError, match=message):
        read_eval_set(_jsonl(tmp_path / "e.jsonl", rows))


def test_without_drops_calibration_texts_and_reindexes_pairs(tmp_path):
    s = read_eval_set(_jsonl(tmp_path / "p.jsonl", [{"text1": "a", "text2": "b", "score": 1},
                                                     {"text1": "b", "text2": "c", "score": 0.2},
                                                     {"text1": "c", "text2": "d", "score": 0.4}]))
    t = s.without({"a"})
    assert t.texts == ["b", "c", "d"] and t.pairs == [(0, 1), (1, 2)] and t.scores == [0.2, 0.4]
    c = read_eval_set(_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}]))
    assert c.without({"a"}).labels == [2]


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get the average rank: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> r = 0.866...
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)
    # monotone transforms do not change it
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert spearman(a, b) == pytest.approx(spearman(np.exp(a), b ** 3))


def test_pair_cosines():
    emb = np.array([[1, 0], [0, 2], [3, 3]], dtype=np.float32)
    np.testing.assert_allclose(pair_cosines(emb, [(0, 1), (0, 2), (2, 2)]), [0, np.sqrt(0.5), 1], atol=1e-6)


def test_probe_accuracy_separates_classes_and_sees_damage():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 50)
    centers = rng.normal(size=(2, 16)) * 3
    ref = centers[y] + rng.normal(size=(100, 16))
    noisy = ref + rng.normal(size=(100, 16)) * 6  # an artifact that lost most of the signal
    acc = probe_accuracy(ref, {"fp32": ref, "same": ref.copy(), "noisy": noisy}, [["neg", "pos"][i] for i in y])
    assert acc["fp32"] >= 0.95 and acc["same"] == acc["fp32"]
    assert acc["noisy"] < acc["fp32"] - 0.1


def test_build_reports_classification_accuracy(tiny_bert, tmp_path):
    from edgeq.calib import default_eval_path

    texts = default_eval_path().read_text().splitlines()[:40]
    data = _jsonl(tmp_path / "labelled.jsonl",
                  [{"text": t, "label": "long" if len(t) > 60 else "short"} for t in texts])
    m = run_build(tiny_bert, tmp_path / "out", modes=("dynamic",), eval_path=str(data), eval_samples=None)
    arts = {a["name"]: a["metrics"] for a in m["artifacts"]}
    for name, metrics in arts.items():
        task = metrics["task"]
        assert task["metric"] == "accuracy" and task["samples"] == 40 and 0 <= task["value"] <= 1
        assert task["delta_vs_fp32"] == pytest.approx(task["value"] - arts["fp32"]["task"]["value"], abs=1e-6)
    assert arts["fp32"]["task"]["delta_vs_fp32"] == 0
    ev = next(s for s in m["stages"] if s["stage"] == "evaluate")
    assert "logistic-regression" in ev["settings"]["task"]["how"]
    from edgeq.summary import summary_table
    assert " accuracy " in summary_table(m).splitlines()[1]


def test_build_reports_spearman_on_pairs(tiny_bert, tmp_path):
    from edgeq.calib import default_eval_path

    texts = default_eval_path().read_text().splitlines()[:12]
    rows = [{"text1": texts[i], "text2": texts[j], "score": (i * 7 + j * 3) % 5}
            for i in range(len(texts)) for j in range(i + 1, len(texts))]
    data = _jsonl(tmp_path / "sts.jsonl", rows)
    m = run_build(tiny_bert, tmp_path / "out", modes=("dynamic",), eval_path=str(data), eval_samples=None)
    fp32 = next(a for a in m["artifacts"] if a["name"] == "fp32")
    task = fp32["metrics"]["task"]
    assert task["metric"] == "spearman" and task["samples"] == len(rows) and -1 <= task["value"] <= 1
    # recompute from the fp32 artifact: the recorded value is what the model's embeddings give
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from edgeq.metrics import pooled
    build_dir = tmp_path / "out" / m["model"]["name"] / m["target"]["name"]
    sess = ort.InferenceSession(str(build_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(str(build_dir / "tokenizer"))
    emb = []
    for t in texts:
        enc = tok([t], return_tensors="np", truncation=True, max_length=128)
        feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
        emb.append(pooled(sess.run(None, feeds)[0], enc["attention_mask"]))
    emb = np.concatenate(emb)
    pairs = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    expect = spearman(pair_cosines(emb, pairs), [r["score"] for r in rows])
    assert task["value"] == pytest.approx(expect, abs=1e-4)


def test_classifier_accuracy_uses_the_models_classes(tiny_classifier, tmp_path):
    from edgeq.calib import default_eval_path

    texts = default_eval_path().read_text().splitlines()[:30]
    data = _jsonl(tmp_path / "l.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(texts)])
    m = run_build(tiny_classifier, tmp_path / "out", modes=("dynamic",), eval_path=str(data), eval_samples=None)
    assert next(a for a in m["artifacts"] if a["name"] == "fp32")["metrics"]["task"]["metric"] == "accuracy"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": t, "label": ["a", "zzz"][i % 2]} for i, t in enumerate(texts)])
    with pytest.raises(EdgeqError, match="are not classes of the model"):
        run_build(tiny_classifier, tmp_path / "out2", modes=("dynamic",), eval_path=str(bad), eval_samples=None)


def test_hybrid_budget_on_the_task_metric(tiny_bert, tmp_path):
    from edgeq.calib import default_eval_path

    texts = default_eval_path().read_text().splitlines()[:40]
    data = _jsonl(tmp_path / "labelled.jsonl",
                  [{"text": t, "label": "long" if len(t) > 60 else "short"} for t in texts])
    m = run_build(tiny_bert, tmp_path / "out", modes=("static",), eval_path=str(data), eval_samples=None,
                  max_accuracy_drop=0.05, budget_metric="task")
    prec = next(s for s in m["stages"] if s["stage"] == "precision")
    assert prec["settings"]["hybrid"]["budget_metric"] == "task"
    assert "even-indexed half" in prec["settings"]["hybrid"]["metric"]
    curve = prec["metrics"]["hybrid"]["curve"]
    for step in curve:  # every step records the task metric and whether it meets the budget on it
        assert step["meets_budget"] == (step["accuracy_fp32"] - step["accuracy"] <= 0.05 + 1e-12)
    assert curve[-1]["meets_budget"] and not any(s["meets_budget"] for s in curve[:-1])


def test_task_budget_needs_labels(tiny_bert, tmp_path):
    from edgeq.config import resolve_config

    with pytest.raises(EdgeqError, match="needs labelled evaluation data"):
        resolve_config(model=str(tiny_bert), out=str(tmp_path), max_accuracy_drop=0.01, budget_metric="task")
    with pytest.raises(EdgeqError, match="--budget-metric must be"):
        resolve_config(model=str(tiny_bert), out=str(tmp_path), budget_metric="loss")
