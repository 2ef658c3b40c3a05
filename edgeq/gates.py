"""Release gates (--max-accuracy-drop, --min-speedup, --max-size-mb) on a finished build's
artifacts: the record the manifest keeps, and the one line `edgeq build` prints when they fail."""
from __future__ import annotations

from typing import Any


def check_gates(config, artifacts: list[dict]) -> dict[str, Any] | None:
    """The release gates (--max-accuracy-drop, --min-speedup, --max-size-mb) on every artifact but
    fp32. The build passes when at least one artifact meets all of them; the record says, for each
    artifact, each gate's value, limit and margin (`by`: how far inside (+) or outside (-) the limit)."""
    limits = config.gates.limits()
    if not limits:
        return None
    family, metric = config.family, config.budget_metric
    results, passing = {}, []
    for a in artifacts:
        if a["name"] == "fp32":
            continue
        m = a["metrics"]
        checks = []
        for gate, limit in limits.items():
            value, what = _gate_value(gate, m, family, metric)
            if value is None:
                checks.append({"gate": gate, "limit": limit, "value": None, "passed": False,
                               "why": f"no {what} measured"})
                continue
            by = (value - limit) if gate == "min_speedup" else (limit - value)
            checks.append({"gate": gate, "measure": what, "value": round(value, 6), "limit": limit,
                           "passed": by >= -1e-12, "by": round(by, 6)})
        ok = all(c["passed"] for c in checks)
        results[a["name"]] = {"passed": ok, "checks": checks}
        if ok:
            passing.append(a["name"])
    failed = [] if passing else [
        {"artifact": n, **c} for n, r in results.items() for c in r["checks"] if not c["passed"]]
    return {"limits": limits, "policy": "at least one artifact (other than fp32) meets every gate",
            "passed": bool(passing), "passing": passing, "artifacts": results, "failed": failed}


def _gate_value(gate: str, m: dict, family: str | None, metric: str) -> tuple[float | None, str]:
    if gate == "min_speedup":
        what = "decode tokens/s vs fp32" if family == "causal-lm" else "speedup vs fp32 (latency p50)"
        return m.get("speedup_vs_fp32"), what
    if gate == "max_size_mb":
        return (m["size_bytes"] / 1e6 if isinstance(m.get("size_bytes"), int) else None), "size in MB"
    task = m.get("task") or {}
    if family == "causal-lm":
        return task.get("relative_vs_fp32"), "perplexity increase vs fp32 (relative)"
    if metric == "retrieval":
        r = m.get("retrieval") or {}
        v = r.get("recall@10_vs_fp32")
        return (1 - v if isinstance(v, (int, float)) else None), "1 - recall@10 vs fp32's ranking"
    if metric == "task" and "delta_vs_fp32" in task:
        return -task["delta_vs_fp32"], f"{task.get('metric', 'task metric')} drop vs fp32"
    return (1 - m["cosine"] if isinstance(m.get("cosine"), (int, float)) else None), "1 - cosine vs fp32"


def gate_failure_text(gates: dict[str, Any]) -> str:
    """One line: which gates failed, by how much, for the artifact closest to passing."""
    by_artifact: dict[str, list] = {}
    for f in gates["failed"]:
        by_artifact.setdefault(f["artifact"], []).append(f)
    name, fails = min(by_artifact.items(), key=lambda kv: (len(kv[1]), -sum(f.get("by") or -1e9 for f in kv[1])))
    parts = [(f"{f['gate']}: {f['value']:.4g} vs limit {f['limit']:g} (off by {abs(f['by']):.4g})"
              if f.get("value") is not None else f"{f['gate']}: {f['why']}") for f in fails]
    return (f"gate failed: no artifact meets every gate; closest, {name}: " + "; ".join(parts))
