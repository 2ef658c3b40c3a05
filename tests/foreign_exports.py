"""ONNX exports of a BERT encoder made the way other tools make them, not through optimum: the
sentence-transformers pooling (mean over the attention mask, then L2 normalisation) inside the
graph, four outputs, torch.onnx.export with or without dynamo, a chosen opset, and optionally every
node renamed to a generic name, so that nothing in the graph says which layer a node belongs to.

Used by tests/test_foreign_onnx.py and benchmarks; also runnable:
    python tests/foreign_exports.py HF_DIR OUT.onnx [--dynamo] [--opset N] [--generic-names]
    python tests/foreign_exports.py HF_DIR OUT.onnx --qdq    (a QAT export: export_qdq)
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

OUTPUTS = ("token_embeddings", "pooler_output", "sentence_embedding", "normalized_embedding")


def _pooled_module(model_dir: Path):
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        """What sentence-transformers computes for all-MiniLM-L6-v2, plus BERT's pooler output."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            tokens = out.last_hidden_state
            # sentence-transformers' mean pooling, as its Pooling module writes it
            m = attention_mask.unsqueeze(-1).expand(tokens.size()).to(tokens.dtype)
            emb = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return tokens, out.pooler_output, emb, torch.nn.functional.normalize(emb, p=2, dim=1)

    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager").eval()
    return Pooled(bert).eval()


def export_pooled(model_dir: Path, out: Path, dynamo: bool = False, opset: int = 17,
                  generic_names: bool = False, output_names: tuple[str, ...] | None = OUTPUTS) -> Path:
    """`model_dir` (a Hugging Face BERT folder) exported to `out` with its tokenizer files beside."""
    import warnings

    import onnx
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    model = _pooled_module(model_dir)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0, 0], [101, 2178, 6251, 2182, 102, 0, 0, 0]])
    ids = ids.clamp(max=model.bert.config.vocab_size - 1)
    mask = (ids != 0).long()
    args = (ids, mask, torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    kw = dict(input_names=names, opset_version=opset, dynamo=dynamo)
    if output_names:
        kw["output_names"] = list(output_names)
    if dynamo:
        B, S = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=512)
        kw["dynamic_shapes"] = {n: {0: B, 1: S} for n in names}
        kw["external_data"] = False
    else:
        kw["dynamic_axes"] = dyn
        kw["do_constant_folding"] = True
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(out), **kw)
    m = onnx.load(str(out))
    if generic_names:
        for i, n in enumerate(m.graph.node):
            n.name = f"n{i}"
    onnx.save(m, str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, out.parent / f)
    return out


def export_qdq(model_dir: Path, out: Path, opset: int = 17, texts: list[str] | None = None) -> Path:
    """A user's QAT export: `model_dir` (a Hugging Face BERT folder) with every nn.Linear
    fake-quantized as PyTorch's QAT does it (weights per output channel, symmetric int8; inputs per
    tensor, uint8, ranges observed on `texts`, else on random token ids), exported by torch.onnx.export(dynamo=False),
    which writes FakeQuantize as QuantizeLinear/DequantizeLinear; tokenizer files beside it.
    Output: last_hidden_state. Returns the path; the float model's outputs on the export's example
    inputs are saved beside it as reference.npz (what the float reference must reproduce)."""
    import warnings

    import numpy as np
    import torch
    from transformers import AutoModel

    class FakeQuantLinear(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin, self.lo, self.hi, self.frozen = lin, 0.0, 0.0, False
            w = lin.weight.detach()
            self.register_buffer("w_scale", (w.abs().amax(1) / 127).clamp(min=1e-8))
            self.register_buffer("w_zero", torch.zeros(w.shape[0], dtype=torch.int32))

        def forward(self, x):
            if self.frozen:
                x = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, 0, 255)
                w = torch.fake_quantize_per_channel_affine(self.lin.weight, self.w_scale, self.w_zero, 0, -128, 127)
                return torch.nn.functional.linear(x, w, self.lin.bias)
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
            return self.lin(x)

        def freeze(self):
            self.a_scale = (self.hi - self.lo) / 255
            self.a_zero, self.frozen = int(round(-self.lo / self.a_scale)), True

    class Hidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    out.parent.mkdir(parents=True, exist_ok=True)
    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager").eval()
    model = Hidden(bert).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, bert.config.vocab_size, (4, 12), generator=gen)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    with torch.no_grad():
        reference = model(*args).numpy()
    fqs = []
    for module in list(bert.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                fqs.append(FakeQuantLinear(child))
                setattr(module, child_name, fqs[-1])
    with torch.no_grad():  # observe the activation ranges
        if texts:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            for i in range(0, len(texts), 16):
                enc = tok(texts[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
                model(enc["input_ids"], enc["attention_mask"], torch.zeros_like(enc["input_ids"]))
        else:
            model(*args)
    for f in fqs:
        f.freeze()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(out), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["last_hidden_state"], do_constant_folding=True,
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
        fake_quantized = model(*args).numpy()
    np.savez(out.parent / "reference.npz", **{n: a.numpy() for n, a in zip(names, args)},
             float=reference, fake_quantized=fake_quantized)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json"):
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, out.parent / f)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dynamo", action="store_true")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--generic-names", action="store_true")
    ap.add_argument("--qdq", action="store_true", help="a QAT-style fake-quantized export (export_qdq)")
    a = ap.parse_args()
    if a.qdq:
        from edgeq.calib import default_calibration_path, read_texts
    print(export_qdq(a.model_dir, a.out, a.opset, read_texts(default_calibration_path(), limit=256)) if a.qdq else
          export_pooled(a.model_dir, a.out, a.dynamo, a.opset, a.generic_names))
