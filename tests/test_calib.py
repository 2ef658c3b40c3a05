import json

import numpy as np
import pytest

from edgeq.calib import TextFeeds, default_calibration_path, default_eval_path, iter_texts, read_npz, read_texts
from edgeq.core import EdgeqError


def test_bundled_sets_are_large_varied_and_disjoint():
    calib = read_texts(default_calibration_path())
    held_out = read_texts(default_eval_path(), what="evaluation")
    assert len(calib) >= 200 and len(held_out) >= 100
    assert len(set(calib)) == len(calib)
    assert not set(calib) & set(held_out)
    lengths = [len(t.split()) for t in calib]
    assert min(lengths) <= 5 and max(lengths) >= 30


def test_text_lines_skip_blank_lines_and_respect_limit(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\n\n  two  \nthree\n")
    assert read_texts(f) == ["one", "two", "three"]
    assert read_texts(f, limit=2) == ["one", "two"]


def test_jsonl_reads_the_text_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "a b", "label": 1}) + "\n" + json.dumps({"body": "x", "text": "c"}) + "\n")
    assert read_texts(f) == ["a b", "c"]
    f2 = tmp_path / "d.jsonl"
    f2.write_text(json.dumps({"body": "x"}) + "\n")
    assert read_texts(f2, text_field="body") == ["x"]


@pytest.mark.parametrize("content, message", [
    ("", "no samples"),
    ("\n\n   \n", "no samples"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(EdgeqError, match=message):
        read_texts(f)


def test_bad_jsonl_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(EdgeqError, match=r"bad.jsonl:2: invalid JSON"):
        read_texts(f)
    f.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(EdgeqError, match=r":2: expected an object"):
        read_texts(f)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(EdgeqError, match="not found"):
        list(iter_texts(tmp_path / "nope.txt"))
    with pytest.raises(EdgeqError, match="not a file"):
        list(iter_texts(tmp_path))


def test_npz_reader_checks_inputs(tmp_path):
    f = tmp_path / "x.npz"
    np.savez(f, pixel_values=np.zeros((4, 3), np.float32))
    assert read_npz(f, ["pixel_values"])["pixel_values"].shape == (4, 3)
    with pytest.raises(EdgeqError, match="lacks arrays for model inputs: other"):
        read_npz(f, ["other"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EdgeqError, match="is not a .npz archive"):
        read_npz(bad, ["x"])
    specs = {"input_ids": {"dtype": "int64", "rank": 2}}
    for arr, msg in ((np.zeros((4, 8), np.float32), "is float32, the model takes int64"),
                     (np.zeros(4, np.int64), "has 1 dimensions, the model takes 2"),
                     (np.array(3, np.int64), "is a scalar")):
        np.savez(tmp_path / "m.npz", input_ids=arr)
        with pytest.raises(EdgeqError, match=msg):
            read_npz(tmp_path / "m.npz", ["input_ids"], specs=specs)


def test_npz_shared_between_calibration_and_evaluation_is_split():
    from edgeq.calib import npz_calibration_share

    cal, ev = npz_calibration_share(100, shared=True)
    assert (cal, ev) == (slice(0, 75), slice(75, 100))
    assert npz_calibration_share(10, shared=False) == (slice(0, 10), slice(0, 10))
    assert npz_calibration_share(1, shared=True)[0] == slice(0, 1)


def test_text_feeds_match_model_inputs(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    feeds = TextFeeds(tok, ["input_ids", "attention_mask", "token_type_ids"], max_length=16)
    out = feeds(["a short one", "a much longer sentence that will certainly be cut at sixteen tokens " * 3]).feeds
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, 16)
    assert out["attention_mask"][0].sum() < 16 and out["attention_mask"][1].sum() == 16
    padded = feeds(["a"], pad_to=8).feeds
    assert padded["input_ids"].shape == (1, 8)
    # a model without attention_mask input still gets the mask for pooling, beside its feeds
    no_mask_input = TextFeeds(tok, ["input_ids"])(["a b"])
    assert set(no_mask_input.feeds) == {"input_ids"} and no_mask_input.mask is not None
