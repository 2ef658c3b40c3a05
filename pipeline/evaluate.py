"""Stage 5, evaluate: fidelity of every artifact against the fp32 artifact on held-out data that was
not used for calibration.

Each sample runs alone (batch 1, no padding), as on a device. Metrics per artifact:
  cosine / cosine_min  cosine similarity of the pooled output (mean over real tokens for embeddings,
                       the logits for classifiers), mean and worst case over samples;
  max_abs_err / mean_abs_err  over every element of the primary output (real tokens only);
  top1_agreement       classifiers: share of samples whose argmax matches fp32's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.core import BuildContext, EdgeqError, StageResult
from edgeq.pipeline.metrics import fidelity, pooled


def run(ctx: BuildContext) -> StageResult:
    import onnxruntime as ort

    samples, removed = _eval_samples(ctx)
    classifier = ctx.facts.get("task") == "text-classification"
    outputs: dict[str, tuple[list, np.ndarray]] = {}
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures are raised with their message below
    for a in ctx.artifacts:
        sess = ort.InferenceSession(str(ctx.path(a.path)), so, providers=["CPUExecutionProvider"])
        raw, pools = [], []
        for feeds, mask in ctx.track(samples, len(samples), f"evaluate {a.name}"):
            try:
                o = sess.run(None, feeds)[0].astype(np.float32)  # fp16 outputs compared in fp32
            except Exception as e:  # the evaluation data does not fit the model
                raise EdgeqError(f"{a.path} fails on evaluation data {ctx.config['evaluation']['path']}: "
                                 f"{str(e).strip().splitlines()[0][:300]}") from None
            pools.append(pooled(o, mask))
            raw.append(o[mask.astype(bool)] if (o.ndim == 3 and mask is not None) else o)
        outputs[a.name] = (raw, np.concatenate(pools))
    ref_raw, ref_pool = outputs["fp32"]
    for a in ctx.artifacts:
        raw, pool = outputs[a.name]
        a.metrics.update(fidelity(ref_raw, raw, ref_pool, pool, classifier))
    return StageResult(
        settings={"data": ctx.config["evaluation"]["path"], "samples": len(samples), "batch_size": 1,
                  "reference": "fp32", "pooling": "mean over attention mask" if not classifier else "logits"},
        metrics={"overlap_with_calibration_removed": removed,
                 **{a.name: {k: a.metrics[k] for k in ("cosine", "cosine_min", "max_abs_err", "top1_agreement")
                             if k in a.metrics} for a in ctx.artifacts}},
    )


def _eval_samples(ctx: BuildContext):
    from edgeq.calib import TextFeeds, mask_of, model_feeds, read_npz, read_texts

    cfg = ctx.config["evaluation"]
    path = Path(cfg["path"])
    if path.suffix.lower() == ".npz":
        from edgeq.calib import npz_calibration_share

        arrays = read_npz(path, ctx.facts["input_names"], what="evaluation", specs=ctx.facts.get("input_specs"))
        n = len(next(iter(arrays.values())))
        shared = ctx.config["calibration"]["path"] == str(path) and "static" in ctx.config["modes"]
        held = range(n)[npz_calibration_share(n, shared)[1]]
        removed = n - len(held)  # the samples calibration used
        return [({k: v[i:i + 1] for k, v in arrays.items()}, None) for i in held[: cfg["samples"]]], removed
    if ctx.facts.get("tokenizer") is None:
        raise EdgeqError("text evaluation data needs a tokenizer: pass --tokenizer DIR, or tensors as .npz")
    calib = set(ctx.facts.get("calibration_samples") or [])
    texts = read_texts(path, limit=cfg["samples"] + len(calib), what="evaluation")
    held_out = [t for t in texts if t not in calib][: cfg["samples"]]
    if not held_out:
        raise EdgeqError(f"evaluation file {path} has no samples that are not also calibration samples")
    feeds = TextFeeds(ctx.facts["tokenizer"], ctx.facts["input_names"], ctx.config["max_length"])
    out = []
    for t in held_out:
        f = feeds([t])
        out.append((model_feeds(f), mask_of(f)))
    return out, sum(t in calib for t in texts)
