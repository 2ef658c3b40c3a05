"""ONNX exports of a BERT encoder made the way other tools make them, not through optimum: the
sentence-transformers pooling (mean over the attention mask, then L2 normalisation) inside the
graph, four outputs, torch.onnx.export with or without dynamo, a chosen opset, and optionally every
node renamed to a generic name, so that nothing in the graph says which layer a node belongs to.

Used by tests/test_foreign_onnx.py and benchmarks; also runnable:
    python tests/foreign_exports.py HF_DIR OUT.onnx [--dynamo] [--opset N] [--generic-names]
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dynamo", action="store_true")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--generic-names", action="store_true")
    a = ap.parse_args()
    print(export_pooled(a.model_dir, a.out, a.dynamo, a.opset, a.generic_names))
