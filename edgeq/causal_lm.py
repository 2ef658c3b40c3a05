"""Decoder-only language models (Llama, SmolLM2, GPT-2 style): loading GGUF checkpoints, export with
the key/value cache, the checks against PyTorch, perplexity.

Not a stage: the family's library, which the export, optimize and evaluate stages call when the
build's model family is "causal-lm" (its int4 is pipeline/ops/int4.py, its text calib/, its
generation edgeq/commands/generate.py).
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np

from edgeq.core import EdgeqError, sha256_file

EXPORT_TASK = "text-generation-with-past"
GREEDY_TOKENS = 16
GREEDY_PROMPTS = ("The capital of France is", "def fibonacci(n):")


def hf_dir_from_gguf(gguf: Path, cache_root: Path, log) -> tuple[Path, str]:
    """A Hugging Face folder (fp32 safetensors, config, tokenizer) converted from a GGUF file, cached
    under `cache_root/<sha256 prefix>` because the conversion is slow and the export reads it.

    Why not `from_pretrained(gguf_file=...)` alone: in transformers 4.57 it requires `accelerate`
    for GGUF (a dependency we don't otherwise need); the same conversion is done here with
    transformers' own `load_gguf_checkpoint` into a model built from the GGUF's config."""
    digest = sha256_file(gguf)
    out = cache_root / f"{digest[:32]}-v2"  # v2: tokenizer special tokens taken from the GGUF metadata
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out, digest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log(f"  converting {gguf.name} to a Hugging Face folder (cached for later builds)")
    d, f = str(gguf.parent), gguf.name
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # trust_remote_code=False: a GGUF carries no code, and nothing in its folder may run (left at
        # None, transformers would ask on a terminal when a file there names custom code)
        config = AutoConfig.from_pretrained(d, gguf_file=f, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
            state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, _ = model.load_state_dict(state, strict=False)
    except Exception as e:  # a damaged or unsupported GGUF: the user's file
        raise EdgeqError(f"cannot load {gguf.name} as a causal language model: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None
    finally:
        hf_logging.set_verbosity(level)
    _fix_special_tokens(tok, gguf)
    model.tie_weights()
    missing = [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings]
    if missing:
        raise EdgeqError(f"{gguf.name}: weights missing after conversion: {', '.join(missing[:5])}")
    tmp = cache_root / f".tmp-{digest[:16]}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out, digest


def _fix_special_tokens(tok, gguf: Path) -> None:
    """transformers' GGUF tokenizer conversion (4.57) ignores the file's add_bos_token and eos id
    (SmolLM2: it adds a BOS the model was not trained with, and names <|im_start|> as EOS, so
    generation would not stop at <|im_end|>); take them from the GGUF metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def value(key):
        f = fields.get(key)
        return f.parts[f.data[0]][0] if f is not None and f.data else None

    add_bos, eos = value("tokenizer.ggml.add_bos_token"), value("tokenizer.ggml.eos_token_id")
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)
    if eos is not None and 0 <= int(eos) < len(tok):
        tok.eos_token = tok.convert_ids_to_tokens(int(eos))


def export(model_dir: Path, out_dir: Path, opset: int, trust_remote_code: bool = False) -> None:
    """optimum's export with the key/value cache. `trust_remote_code`: let transformers run the
    folder's own modeling code (the build's --trust-remote-code; off by default)."""
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), output=str(out_dir), task=EXPORT_TASK, opset=lm_opset(opset),
                library_name="transformers", do_validation=False, local_files_only=True,
                trust_remote_code=trust_remote_code, device="cpu")


def lm_opset(target_opset: int) -> int:
    """optimum's decoder exports want opset 18 or later (earlier ones export, with a warning that
    the graph may be suboptimal); ONNX Runtime 1.16+ (mobile included) runs 18."""
    return max(target_opset, 18)


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validate(model_dir: Path, onnx_path: Path, tokenizer, texts: list[str], trust_remote_code: bool = False) -> dict:
    """Prefill logits of ONNX vs PyTorch on real text, and the greedy check: the ONNX model decoding
    with its key/value cache must produce PyTorch's first GREEDY_TOKENS tokens for each prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeq.pipeline.runners.lm_runtime import KVModel

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                 trust_remote_code=trust_remote_code, dtype=torch.float32).eval()
    lm = KVModel(session(onnx_path))
    worst = 0.0
    for t in texts:
        ids = tokenizer(t, return_tensors="np", truncation=True, max_length=64)["input_ids"].astype(np.int64)
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).logits.numpy()
        got, _ = lm.forward(ids, lm.empty_past(1), 0)
        worst = max(worst, float(np.abs(ref - got).max()))
    greedy = []
    for p in GREEDY_PROMPTS:
        ids = tokenizer(p, return_tensors="np")["input_ids"].astype(np.int64)
        eos = tokenizer.eos_token_id
        with torch.no_grad():  # both sides stop at EOS (min_new_tokens would suppress it in PyTorch only)
            ref = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
                                 )[0, ids.shape[1]:].tolist()
        got = lm.generate(ids, GREEDY_TOKENS, eos=() if eos is None else (eos,))[0][0].tolist()
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        greedy.append({"prompt": p, "tokens": len(ref), "matching_prefix": same, "match": got == ref,
                       "onnx": tokenizer.decode(got), "pytorch": tokenizer.decode(ref)})
    return {"validation_samples": len(texts), "max_abs_diff": worst, "greedy": greedy,
            "greedy_match": all(g["match"] for g in greedy)}


def evaluate(paths: dict[str, Path], batches: list[np.ndarray], track=lambda x, n, label: x,
             prompts: list[np.ndarray] = (), new_tokens: int = GREEDY_TOKENS) -> dict[str, dict]:
    """Perplexity of every model on the token rows, and its agreement with fp32's next-token
    predictions: top-1 agreement and the cosine of the logit vectors, over every position. With
    `prompts` (token rows), also greedy generation: each model decodes `new_tokens` tokens from each
    prompt with its cache, and how many of fp32's it reproduces before the first difference."""
    from edgeq.pipeline.runners.lm_runtime import KVModel, next_token_nll
    from edgeq.metrics import row_cosine

    ref_top, ref_logits = [], []
    out = {}
    for name in ["fp32"] + [n for n in paths if n != "fp32"]:
        lm = KVModel(session(paths[name]))
        nll, tokens, agree, cos = 0.0, 0, 0, []
        for k, ids in enumerate(track(batches, len(batches), f"evaluate {name}")):
            logits, _ = lm.forward(ids, lm.empty_past(1), 0)
            nll += float(next_token_nll(logits, ids).sum())
            tokens += ids.shape[1] - 1
            logits = logits[0].astype(np.float64)
            top = logits.argmax(-1)
            if name == "fp32":
                ref_top.append(top)
                ref_logits.append(logits.astype(np.float32))
            else:
                agree += int((top == ref_top[k]).sum())
                cos.append(row_cosine(ref_logits[k], logits))
        positions = sum(len(t) for t in ref_top)
        greedy = [lm.generate(p, new_tokens)[0][0].tolist() for p in prompts]
        if name == "fp32":
            ref_greedy = greedy
        same = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
                for g, r in zip(greedy, ref_greedy)]
        out[name] = {**({"greedy_vs_fp32": {"prompts": len(prompts), "tokens": new_tokens,
                                            "matching_prefix": same, "identical": sum(g == r for g, r in
                                                                                      zip(greedy, ref_greedy))}}
                        if prompts else {}),"perplexity": float(np.exp(nll / tokens)), "tokens": tokens,
                     "top1_agreement": 1.0 if name == "fp32" else agree / positions,
                     "cosine": 1.0 if name == "fp32" else float(np.concatenate(cos).mean()),
                     "cosine_min": 1.0 if name == "fp32" else float(np.concatenate(cos).min())}
    return out
