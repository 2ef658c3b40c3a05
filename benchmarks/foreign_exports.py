"""edgeq on ONNX it did not export: all-MiniLM-L6-v2 with the sentence-transformers pooling and L2
normalisation inside the graph (four outputs), exported by torch.onnx with TorchScript at opsets 14,
16, 17 and 18 and with dynamo (which writes opset 18), node names replaced by generic ones
(tests/foreign_exports.py). Each is built with static, dynamic and hybrid int8 and the table says
what optimize found (fusions, shape inference, types filled in), which output was evaluated and
each artifact's fidelity and speed (interleaved with fp32 in each build's own benchmark run).

    .venv/bin/python benchmarks/foreign_exports.py [--out DIR] [--target x86_64] [--runs 100]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = [("torchscript", 14), ("torchscript", 16), ("torchscript", 17), ("torchscript", 18), ("dynamo", 18)]


def main() -> None:
    from foreign_exports import export_pooled

    from edgeq.core import cpu_flags
    from edgeq.intake import default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="edgeq-foreign-")))
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--runs", type=int, default=100)
    a = ap.parse_args()
    rows = []
    for exporter, opset in VARIANTS:
        name = f"minilm-{exporter}-opset{opset}"
        src = export_pooled(default_model_dir(), a.out / "exports" / name / "model.onnx",
                            dynamo=exporter == "dynamo", opset=opset, generic_names=True)
        r = subprocess.run([sys.executable, "-m", "edgeq", "build", str(src), "--target", a.target, "--out",
                            str(a.out / "builds"), "--mode", "static", "--mode", "dynamic", "--mode", "hybrid",
                            "--runs", str(a.runs), "--json"], capture_output=True, text=True)
        if r.returncode != 0:
            rows.append((name, r.stderr.strip().splitlines()[-1]))
            continue
        m = json.loads(Path(json.loads(r.stdout)["manifest"]).read_text())
        opt = next(s for s in m["stages"] if s["stage"] == "optimize")
        fused = opt["metrics"].get("fused_ops", {})
        by = {x["name"]: x for x in json.loads(r.stdout)["artifacts"]}
        rows.append((name, {
            "attention_fused": fused.get("Attention", 0), "shape_inference": opt["settings"]["shape_inference"],
            "evaluated": m["model"].get("evaluated_output"),
            **{k: (by[k]["metrics"].get("cosine"), by[k]["metrics"].get("speedup_vs_fp32")) for k in
               ("int8-static", "int8-dynamic", "int8-hybrid") if k in by}}))
    flags = cpu_flags()
    host = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "other"
    print(f"host: {host} ({subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores), "
          f"target {a.target}, {a.runs} runs")
    print(f"{'export':28s} {'attn':>4s} {'shapes':>8s} {'evaluated output':22s} "
          f"{'static cos/x':>14s} {'dynamic cos/x':>14s} {'hybrid cos/x':>14s}")
    for name, row in rows:
        if isinstance(row, str):
            print(f"{name:28s} FAILED: {row}")
            continue
        cells = [f"{row[k][0]:.4f}/{row[k][1]:.2f}x" if k in row and row[k][1] else "-"
                 for k in ("int8-static", "int8-dynamic", "int8-hybrid")]
        print(f"{name:28s} {row['attention_fused']:>4d} {row['shape_inference']:>8s} {str(row['evaluated']):22s} "
              + " ".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
