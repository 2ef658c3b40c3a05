"""What `edgeq build` prints: the table of artifacts, and the `--json` object (its contract is in
the README)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeq.core import Files


def json_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The `--json` contract (documented in README): artifacts with path, sha256, size and metrics."""
    build_dir = Path(manifest["build_dir"])
    files = {f["path"]: f for f in manifest["files"]}
    arts = []
    for a in manifest["artifacts"]:
        m = a["metrics"]
        arts.append({
            "name": a["name"], "path": str(build_dir / a["path"]), "sha256": files[a["path"]]["sha256"],
            "size_bytes": files[a["path"]]["size_bytes"], "precision": a["precision"],
            "metrics": {k: m.get(k) for k in ("cosine", "cosine_min", "max_abs_err", "mean_abs_err", "top1_agreement", "task",
                                              "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                                              "throughput_per_s", "load_ms", "peak_rss_mb", "speedup_vs_fp32",
                                              "size_vs_fp32", "decode_tokens_per_s", "prefill_p50_ms", "greedy_vs_fp32", "retrieval", "retrieval_codes")
                        if k in m},
        })
    bench = next((s for s in manifest["stages"] if s["stage"] == "benchmark"), {}).get("metrics", {})
    why = (manifest.get("config") or {}).get("target_reason")
    return {"model": manifest["model"]["name"], "target": manifest["target"]["name"],
            **({"target_reason": why} if why else {}),
            "build_dir": str(build_dir), "manifest": str(build_dir / Files.MANIFEST),
            "build_seconds": manifest["build_seconds"], "artifacts": arts,
            "execution_providers": bench.get("execution_providers", {}), "notes": bench.get("notes", []),
            **({"baselines": bench["baselines"]} if bench.get("baselines") else {}),
            **({"gates": {k: manifest["gates"][k] for k in ("passed", "passing", "limits", "failed")}}
               if manifest.get("gates") else {})}


def summary_table(manifest: dict[str, Any]) -> str:
    task = next((a["metrics"]["task"]["metric"] for a in manifest["artifacts"] if "task" in a["metrics"]), None)
    lm = any("decode_tokens_per_s" in a["metrics"] for a in manifest["artifacts"])
    if lm:
        rows = _lm_rows(manifest)
    else:
        rows = _rows(manifest, task)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"{manifest['model']['name']} -> {manifest['target']['name']}  "
            f"({manifest['build_seconds']:.0f}s, {manifest['build_dir']})")
    why = (manifest.get("config") or {}).get("target_reason")
    chosen = [f"target {manifest['target']['name']}: chosen because {why} (--target picks another)"] if why else []
    bench = next((s for s in manifest["stages"] if s["stage"] == "benchmark"), {})
    eps = [f"{ep}: {status}" for ep, status in bench.get("metrics", {}).get("execution_providers", {}).items()]
    notes = [f"note: {n}" for n in bench.get("metrics", {}).get("notes", [])]
    base = [f"* {b['name']}: a baseline, not an artifact: {b.get('recipe')}, {b.get('threads')} threads, interleaved "
            f"with the artifacts; size as torch.save writes it; cosine on {b.get('eval_samples', 0)} evaluation samples"
            + (f" ({b['error']})" if b.get("error") else "")
            for b in _baselines(manifest)] if not lm else []
    return "\n".join([head, *lines, *chosen, *eps, *base, *notes])


def _rows(manifest: dict[str, Any], task: str | None) -> list[tuple]:
    cls = any("top1_agreement" in a["metrics"] for a in manifest["artifacts"])
    ret = any("retrieval" in a["metrics"] for a in manifest["artifacts"])
    codes = list(dict.fromkeys(c for a in manifest["artifacts"] for c in a["metrics"].get("retrieval_codes") or {}))
    rows = [("artifact", "precision", "size MB", "size x", "cosine", "cos min", *(("top1",) if cls else ()),
             *((task,) if task else ()), *(("R@1 fp32", "R@10 fp32") if ret else ()),
             *(f"R@10 {c}" for c in codes),
             "p50 ms", "p90 ms", "speedup", "RSS MB", "EP nodes")]
    for a in manifest["artifacts"]:
        m = a["metrics"]

        def f(k, fmt):
            return format(m[k], fmt) if isinstance(m.get(k), (int, float)) else "-"
        t = (f("top1_agreement", ".1%"),) if cls else ()
        t += (format(m["task"]["value"], ".4f") if "task" in m else "-",) if task else ()
        r = m.get("retrieval") or {}
        t += tuple(format(r[k], ".3f") if k in r else "-" for k in ("recall@1_vs_fp32", "recall@10_vs_fp32")) if ret else ()
        rc = m.get("retrieval_codes") or {}
        t += tuple(format(rc[c]["recall@10_vs_fp32"], ".3f") if c in rc else "-" for c in codes)
        rows.append((a["name"], a["precision"], f"{m.get('size_bytes', 0) / 1e6:.1f}", f("size_vs_fp32", ".2f"),
                     f("cosine", ".4f"), f("cosine_min", ".4f"), *t, f("latency_p50_ms", ".2f"),
                     f("latency_p90_ms", ".2f"), f("speedup_vs_fp32", ".2f") + ("x" if "speedup_vs_fp32" in m else ""),
                     f("peak_rss_mb", ".0f"), f"{m['ep_coverage']:.0%}" if m.get("ep_coverage") is not None else "-"))
    for b in _baselines(manifest):  # measured beside the artifacts, not one of them: marked with *
        def g(k, fmt):
            return format(b[k], fmt) if isinstance(b.get(k), (int, float)) else "-"
        blanks = (("-",) if cls else ()) + (("-",) if task else ()) + (("-", "-") if ret else ()) + ("-",) * len(codes)
        rows.append((b["name"] + "*", b.get("precision", "-"), f"{b.get('size_bytes', 0) / 1e6:.1f}" if "size_bytes" in b
                     else "-", g("size_vs_fp32", ".2f"), g("cosine", ".4f"), g("cosine_min", ".4f"), *blanks,
                     g("latency_p50_ms", ".2f"), g("latency_p90_ms", ".2f"),
                     g("speedup_vs_fp32", ".2f") + ("x" if "speedup_vs_fp32" in b else ""), "-", "-"))
    return rows


def _baselines(manifest: dict[str, Any]) -> list[dict]:
    bench = next((s for s in manifest["stages"] if s["stage"] == "benchmark"), {})
    return list((bench.get("metrics") or {}).get("baselines") or [])


def _lm_rows(manifest: dict[str, Any]) -> list[tuple]:
    """A causal LM's table: what the weight-only methods are compared on (size, perplexity and its
    change, next-token and greedy agreement with fp32, decode and prefill speed, quantize seconds)."""
    quant = next((s for s in manifest["stages"] if s["stage"] == "quantize"), {}).get("metrics") or {}
    rows = [("artifact", "precision", "size MB", "size x", "perplexity", "ppl +%", "top1", "greedy", "tok/s",
             "prefill ms", "speedup", "quant s", "RSS MB", "EP nodes")]
    for a in manifest["artifacts"]:
        m = a["metrics"]

        def f(k, fmt):
            return format(m[k], fmt) if isinstance(m.get(k), (int, float)) else "-"
        t = m.get("task") or {}
        g = m.get("greedy_vs_fp32")
        greedy = f"{sum(g['matching_prefix'])}/{g['prompts'] * g['tokens']}" if g else "-"
        secs = (quant.get(a["name"]) or {}).get("quantize_seconds")
        rows.append((a["name"], a["precision"], f"{m.get('size_bytes', 0) / 1e6:.1f}", f("size_vs_fp32", ".2f"),
                     format(t["value"], ".3f") if "value" in t else "-",
                     "-" if a["name"] == "fp32" or "relative_vs_fp32" not in t else f"{t['relative_vs_fp32']:+.1%}",
                     f("top1_agreement", ".1%"), greedy, f("decode_tokens_per_s", ".1f"), f("latency_p50_ms", ".2f"),
                     f("speedup_vs_fp32", ".2f") + ("x" if "speedup_vs_fp32" in m else ""),
                     f"{secs:.0f}" if isinstance(secs, (int, float)) else "-",
                     f("peak_rss_mb", ".0f"), f"{m['ep_coverage']:.0%}" if m.get("ep_coverage") is not None else "-"))
    return rows
