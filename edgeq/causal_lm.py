"""Decoder-only language models (Llama, SmolLM2, GPT-2 style): loading GGUF checkpoints, export with
the key/value cache, the checks against PyTorch, block-wise int4, perplexity.

Not a stage: the export, quantize, evaluate and benchmark stages call into it when the build's
model family is "causal-lm".
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
    under `cache_root/<sha256 prefix>` because the conversion takes ~30 s and the export reads it.

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


def quantize_int4(src: Path, dst: Path, block_size: int, symmetric: bool, accuracy_level: int,
                  embeddings: bool = True, exclude: list[str] = ()) -> dict:
    """Block-wise 4-bit weight-only quantization with onnxruntime's MatMulNBitsQuantizer: every
    MatMul with a constant weight becomes MatMulNBits (int4 blocks of `block_size` along the input
    axis, one scale per block); `accuracy_level` 4 lets the CPU kernel compute with int8 activations
    (the fast path). With `embeddings`, the token-embedding Gather becomes GatherBlockQuantized
    (quantized along the hidden axis), which halves the size again: the vocabulary-sized table is
    the largest tensor of a small LM."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # it warns that it raises the opset to 21 and the IR version to 10 (int4 types need them): expected
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    kw = {}
    if embeddings:
        kw = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))}
    model = onnx.load(str(src))
    # the correction MatMuls of a GGUF repack (see repack_gguf_grids) stay fp32
    exclude = list(exclude) + [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.endswith("_corr")]
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude, **kw)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    g = onnx.load(str(dst), load_external_data=False).graph
    return {"MatMulNBits": sum(n.op_type == "MatMulNBits" for n in g.node),
            "GatherBlockQuantized": sum(n.op_type == "GatherBlockQuantized" for n in g.node),
            "MatMul_left_float": sum(n.op_type == "MatMul" and not n.name.endswith("_corr") for n in g.node)}


def token_batches(tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Each text as one row of at most `max_length` tokens (texts under 2 tokens carry no
    prediction and are skipped)."""
    out = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=max_length, return_tensors="np")["input_ids"].astype(np.int64)
        if ids.shape[1] >= 2:
            out.append(ids)
    return out


def evaluate(paths: dict[str, Path], batches: list[np.ndarray], track=lambda x, n, label: x) -> dict[str, dict]:
    """Perplexity of every model on the token rows, and its agreement with fp32's next-token
    predictions: top-1 agreement and the cosine of the logit vectors, over every position."""
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
        out[name] = {"perplexity": float(np.exp(nll / tokens)), "tokens": tokens,
                     "top1_agreement": 1.0 if name == "fp32" else agree / positions,
                     "cosine": 1.0 if name == "fp32" else float(np.concatenate(cos).mean()),
                     "cosine_min": 1.0 if name == "fp32" else float(np.concatenate(cos).min())}
    return out


def generate_text(build_dir: Path, prompt: str, artifact: str | None, max_new_tokens: int, chat: bool,
                  threads: int, write, trust_remote_code: bool = False) -> dict:
    """`edgeq generate`: greedy decoding with one of a build's artifacts, the text written as it
    comes (`write(str)`), decoded incrementally so multi-byte characters split over tokens print whole.

    `trust_remote_code` is the caller's decision, never the manifest's: a build directory may come
    from elsewhere, and its tokenizer/ folder could name code to run."""
    from transformers import AutoTokenizer

    from edgeq.core import load_manifest
    from edgeq.pipeline.runners.lm_runtime import KVModel

    manifest = load_manifest(build_dir)
    if (manifest.get("config") or {}).get("family") != "causal-lm":
        raise EdgeqError(f"{build_dir} is not a causal language model build (edgeq generate needs one)")
    arts = {a["name"]: a for a in manifest["artifacts"]}
    name = artifact or next(n for n in ("int4", "int8-dynamic", "fp32") if n in arts)
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


# --- GGUF checkpoints: carry their quantization grids over instead of re-quantizing ---------------
# A GGUF file is already quantized (SmolLM2's: Q4_1 transformer weights, Q8_0 embeddings); the fp32
# artifact holds those weights de-quantized. Re-quantizing them with a different int4 grid (round to
# nearest on new block scales) adds a second rounding error as large as the first: measured on
# SmolLM2-135M, perplexity +20% to +38% over fp32 whatever the RTN settings. Weights still lying on
# their GGUF grid are instead repacked exactly into onnxruntime's block-quantized ops, so the int4
# artifact computes with the very weights the fp32 one does.

GGUF_BLOCK = 32


def _blocks(w: np.ndarray) -> np.ndarray:  # [K, N] -> [N, K/32, 32]
    k, n = w.shape
    return w.T.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)


def _pack4(q: np.ndarray) -> np.ndarray:  # [N, kb, 32] values 0..15 -> [N, kb, 16], even index in the low nibble
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def on_q4_1_grid(w: np.ndarray, tol: float = 1e-3):
    """(packed q, scales d, float zero points) when every block of 32 along K is d*q + m with q in
    0..15 (GGUF Q4_1), else None."""
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = _blocks(w.astype(np.float64))
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = np.where(hi > lo, (hi - lo) / 15, 1.0)
    t = (b - lo) / d
    q = np.round(t)
    if np.abs(t - q).max() > tol:
        return None
    return _pack4(q), d[..., 0].astype(np.float32), (-lo / d)[..., 0].astype(np.float32)


def on_q8_0_grid(w: np.ndarray, tol: float = 1e-3):
    """(uint8 q with zero point 128, scales) when every block of 32 along K is d*q, q in -127..127
    (GGUF Q8_0), else None."""
    if w.shape[0] % GGUF_BLOCK:
        return None
    b = _blocks(w.astype(np.float64))
    d = np.abs(b).max(-1, keepdims=True) / 127
    d = np.where(d > 0, d, 1.0)
    t = b / d
    q = np.round(t)
    if np.abs(t - q).max() > tol:
        return None
    return (q + 128).astype(np.uint8), d[..., 0].astype(np.float32)


def repack_gguf_grids(src: Path, dst: Path, accuracy_level: int) -> dict:
    """The int4 artifact of a GGUF-sourced model, losslessly: Q4_1 weights -> MatMulNBits (4 bits,
    blocks of 32) with zero point 8 plus a per-block correction term, Q8_0 weights -> MatMulNBits (8
    bits), the Q8_0 token embedding -> GatherBlockQuantized (8 bits). MatMulNBits takes only integer
    zero points on its fast int8-activation path, while Q4_1's offset m is any float, so
        x @ (d * (q - zp_f)) = MatMulNBits(x, q, d, zp=8) + blocksum(x) @ (d * (8 - zp_f)),
    the correction being a MatMul 32x smaller than the weight's. Q4_1 MatMuls that read the same
    activation are packed into one MatMulNBits (their output columns side by side), one correction
    and one Split. Weights off every grid are left to `quantize_int4` (round to nearest)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_inits, removed, nodes, made = [], set(), [], set()
    stats = {"q4_1_exact": 0, "q8_0_exact": 0, "embedding_q8_0_exact": 0, "off_grid": 0}

    added: set[str] = set()

    def add(name: str, arr: np.ndarray) -> str:
        if name not in added:  # a weight two MatMuls share is packed (identically) once
            added.add(name)
            new_inits.append(numpy_helper.from_array(arr, name))
        return name

    # Q4_1 MatMuls reading the same activation (a layer's q/k/v projections, its gate/up pair) are
    # packed side by side into one MatMulNBits, one correction and one Add, then Split: fewer
    # kernels per decode step, whose dispatch is much of its time (see README, int4 decode).
    q4_grids, groups = {}, {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            r = on_q4_1_grid(numpy_helper.to_array(inits[n.input[1]]))
            if r is not None:
                q4_grids[n.name] = r
                groups.setdefault(n.input[0], []).append(n)
    for n in g.node:
        if n.name in q4_grids:
            members = groups[n.input[0]]
            removed.add(n.input[1])
            stats["q4_1_exact"] += 1
            if n is not members[0]:
                continue  # packed with the group's first member, which comes earlier in the graph
            x, k = n.input[0], int(inits[n.input[1]].dims[0])
            kb = k // GGUF_BLOCK
            bsum = f"{x}_blocksum{kb}"
            if bsum not in made:
                shape = add(bsum + "_shape", np.array([0, 0, kb, GGUF_BLOCK], np.int64))
                axes = add(bsum + "_axes", np.array([-1], np.int64))
                nodes.append(helper.make_node("Reshape", [x, shape], [bsum + "_r"], bsum + "_Reshape"))
                nodes.append(helper.make_node("ReduceSum", [bsum + "_r", axes], [bsum], bsum + "_ReduceSum",
                                              keepdims=0))
                made.add(bsum)
            grids = [q4_grids[m.name] for m in members]
            packed = len(members) > 1
            wname = f"{n.name}_packed{len(members)}" if packed else n.input[1]
            q = np.concatenate([r[0] for r in grids])  # [N, kb, 16]: the members' output columns side by side
            d = np.concatenate([r[1] for r in grids])
            corr_w = np.concatenate([((8.0 - r[2]) * r[1]).T for r in grids], axis=1)  # [kb, N]
            main, total = n.output[0] + "_nbits", (n.output[0] + "_packed" if packed else n.output[0])
            nodes.append(helper.make_node(
                "MatMulNBits", [x, add(wname + "_q4", q), add(wname + "_scales", d.reshape(-1))], [main],
                n.name + "_Q4", domain="com.microsoft", bits=4, K=k, N=int(q.shape[0]), block_size=GGUF_BLOCK,
                accuracy_level=accuracy_level))
            nodes.append(helper.make_node("MatMul", [bsum, add(wname + "_corr", corr_w)], [n.output[0] + "_corr"],
                                          n.name + "_corr"))
            nodes.append(helper.make_node("Add", [main, n.output[0] + "_corr"], [total], n.name + "_add"))
            if packed:
                sizes = add(wname + "_sizes", np.array([r[0].shape[0] for r in grids], np.int64))
                nodes.append(helper.make_node("Split", [total, sizes], [m.output[0] for m in members],
                                              n.name + "_split", axis=-1))
                stats["q4_1_packed_groups"] = stats.get("q4_1_packed_groups", 0) + 1
            continue
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            wname = n.input[1]
            w = numpy_helper.to_array(inits[wname])
            k, nout = w.shape
            attrs = {"K": k, "N": nout, "block_size": GGUF_BLOCK, "accuracy_level": accuracy_level}
            q8 = on_q8_0_grid(w)
            if q8 is not None:
                q, d = q8  # no zero-point input: MatMulNBits' default for 8 bits is 128
                nodes.append(helper.make_node(
                    "MatMulNBits", [n.input[0], add(wname + "_q8", q), add(wname + "_scales", d.reshape(-1))],
                    list(n.output), n.name + "_Q8", domain="com.microsoft", bits=8, **attrs))
                removed.add(wname)
                stats["q8_0_exact"] += 1
                continue
            stats["off_grid"] += 1
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 and \
                not any(a.name == "axis" and a.i != 0 for a in n.attribute):
            table = numpy_helper.to_array(inits[n.input[0]])  # [vocab, hidden], blocks along hidden
            q8 = on_q8_0_grid(table.T)
            if q8 is not None:
                q, d = q8  # [V, H/32, 32], [V, H/32]
                v, h = table.shape
                name = n.input[0]
                nodes.append(helper.make_node(
                    "GatherBlockQuantized",
                    [add(name + "_q8", q.reshape(v, h)), n.input[1], add(name + "_scales", d),
                     add(name + "_zp", np.full(d.shape, 128, np.uint8))],
                    list(n.output), n.name + "_Q8", domain="com.microsoft", bits=8, block_size=GGUF_BLOCK,
                    gather_axis=0, quantize_axis=1))
                removed.add(name)
                stats["embedding_q8_0_exact"] += 1
                continue
        nodes.append(n)
    if not (stats["q4_1_exact"] + stats["q8_0_exact"]):
        return stats
    g.ClearField("node")
    g.node.extend(nodes)
    keep = [i for i in g.initializer if i.name not in removed] + new_inits
    g.ClearField("initializer")
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return stats
