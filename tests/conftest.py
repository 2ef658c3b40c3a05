"""Fixtures: tiny randomly initialised BERT models built inside the tests (no download), and one
build of each that many tests read."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The default target follows the CPU (intake.host_target), and CI machines differ (AVX2, VNNI):
# the tests' expectations are written for the x86_64 profile, so pin it, as a CI with mixed hosts
# would. tests/test_targets.py checks the detection itself.
os.environ["EDGEQ_TARGET"] = "x86_64"


def _vocab_from_calibration(n_words: int = 600) -> list[str]:
    """Special tokens + the most frequent words of the bundled text, so the tiny tokenizer produces
    real token ids (not all [UNK]) on the calibration and evaluation data."""
    from edgeq.calib import default_calibration_path, default_eval_path

    text = default_calibration_path().read_text() + default_eval_path().read_text()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", text.lower()))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(n_words)]


def make_tiny_bert(path: Path, classifier: bool = False, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = _vocab_from_calibration()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tinycls") / "tiny-bert-cls", classifier=True, seed=1)


FAST = dict(runs=5, warmup=1, calib_samples=32, eval_samples=24)


def run_build(model: Path, out: Path, **kw) -> dict:
    from edgeq.build import build
    from edgeq.config import resolve_config

    cfg = resolve_config(model=str(model), out=str(out), **{**FAST, **kw})
    return build(cfg, log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_build(tiny_bert, tmp_path_factory) -> dict:
    """One full build of the tiny feature-extraction BERT for x86_64, both modes."""
    return run_build(tiny_bert, tmp_path_factory.mktemp("out"), target="x86_64")


@pytest.fixture(scope="session")
def tiny_cls_build(tiny_classifier, tmp_path_factory) -> dict:
    return run_build(tiny_classifier, tmp_path_factory.mktemp("outcls"), target="arm64")


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama (the SmolLM2 architecture: grouped-query attention, tied embeddings) with
    a word-level tokenizer over the bundled text."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["<unk>", "<s>", "</s>"] + _vocab_from_calibration()[5:]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def disk_manifest(path) -> dict:
    """A manifest.json as readers see it: edgeq.core.load_manifest puts the volatile values that the
    file keeps in its "run" section back in place."""
    from edgeq.core import load_manifest

    return load_manifest(Path(path).parent)
