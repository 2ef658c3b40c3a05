"""`edgeq generate`: text from a causal LM build, greedy, with the key/value cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.causal_lm import session
from edgeq.core import EdgeqError, load_manifest
from edgeq.pipeline.runners.lm_runtime import KVModel


def generate_text(build_dir: Path, prompt: str, artifact: str | None, max_new_tokens: int, chat: bool,
                  threads: int, write, trust_remote_code: bool = False) -> dict:
    """`edgeq generate`: greedy decoding with one of a build's artifacts, the text written as it
    comes (`write(str)`), decoded incrementally so multi-byte characters split over tokens print whole.

    `trust_remote_code` is the caller's decision, never the manifest's: a build directory may come
    from elsewhere, and its tokenizer/ folder could name code to run."""
    from transformers import AutoTokenizer


    manifest = load_manifest(build_dir)
    if (manifest.get("config") or {}).get("family") != "causal-lm":
        raise EdgeqError(f"{build_dir} is not a causal language model build (edgeq generate needs one)")
    arts = {a["name"]: a for a in manifest["artifacts"]}
    # default: the int4 artifact (the first of several algorithms), else int8, else fp32
    name = artifact or next(n for n in ["int4", *(a for a in arts if a.startswith("int4-")), "nf4", "int8-dynamic",
                                        "fp32"] if n in arts)
    if name not in arts:
        raise EdgeqError(f"no artifact '{name}' in {build_dir} (it has: {', '.join(arts)})")
    tok_dir = build_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise EdgeqError(f"{build_dir} has no tokenizer/ folder")
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    text = prompt
    if chat:
        if not getattr(tok, "chat_template", None):
            raise EdgeqError("--chat: the tokenizer has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(text, return_tensors="np", add_special_tokens=not chat)["input_ids"].astype(np.int64)
    if ids.shape[1] == 0:
        raise EdgeqError("the prompt is empty after tokenization")
    eos = _eos_ids(build_dir, tok)
    lm = KVModel(session(build_dir / arts[name]["path"], threads))
    generated: list[int] = []
    shown = ""

    def on_token(t: int) -> None:
        nonlocal shown
        if t in eos:
            return
        generated.append(t)
        full = tok.decode(generated, skip_special_tokens=True)
        if not full.endswith("\ufffd"):  # wait for the rest of a split multi-byte character
            write(full[len(shown):])
            shown = full

    _, prefill_s, steps = lm.generate(ids, max_new_tokens, eos=eos, on_token=on_token)
    step_ms = float(np.median(steps)) * 1000 if steps else float("nan")
    return {"artifact": name, "prompt_tokens": int(ids.shape[1]), "new_tokens": len(generated),
            "prefill_ms": prefill_s * 1000, "decode_tokens_per_s": 1000 / step_ms if steps else float("nan")}


def _eos_ids(build_dir: Path, tok) -> set[int]:
    import json

    ids = set()
    gen = build_dir / "generation_config.json"
    if gen.is_file():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids |= set(e) if isinstance(e, list) else {e} if isinstance(e, int) else set()
        except (ValueError, AttributeError):
            pass
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids
