"""Stage 5, evaluate: fidelity of every artifact against the fp32 artifact on held-out data that was
not used for calibration.

Each sample runs alone (batch 1, no padding), as on a device. Metrics per artifact:
  cosine / cosine_min  cosine similarity of the pooled output (mean over real tokens for embeddings,
                       the logits for classifiers), mean and worst case over samples;
  max_abs_err / mean_abs_err  over every element of the primary output (real tokens only);
  top1_agreement       classifiers: share of samples whose argmax matches fp32's.

With labelled evaluation data (calib.read_eval_set), every artifact also gets `task`: the task
metric and its change against fp32 -- accuracy for a classification set (a classifier's own argmax,
or for an embedding model a logistic-regression head trained on fp32 embeddings, 5-fold), Spearman
correlation of embedding cosines with gold scores for a pair set, nDCG@10 for a retrieval set
(queries with their relevant documents, and a corpus), which also gives every artifact `retrieval`:
recall@1/@10 and nDCG@10 against the labels and against fp32's own ranking.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.calib.source import for_build
from edgeq.core import BuildContext, EdgeqError, StageResult
from edgeq.metrics import fidelity, pooled, retrieval_metrics, task_metric


def run(ctx: BuildContext) -> StageResult:
    import onnxruntime as ort

    if ctx.family == "causal-lm":
        return _causal_lm(ctx)

    # never a calibration sample: the source leaves them out (photos: other views than calibration's)
    samples, removed, evalset = for_build(ctx).evaluation()
    classifier = ctx.model.task in ("text-classification", "image-classification")
    outputs: dict[str, tuple[list, np.ndarray]] = {}
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures are raised with their message below
    wanted = [ctx.model.primary_output] if ctx.model.primary_output else None  # None: the first output
    fp32_sess = None  # kept: --embedding-precision embeds the calibration texts with it
    for a in ctx.artifacts:
        sess = ort.InferenceSession(str(ctx.path(a.path)), so, providers=["CPUExecutionProvider"])
        if a.name == "fp32":
            fp32_sess = sess
        raw, pools = [], []
        for feeds, mask in ctx.track(samples, len(samples), f"evaluate {a.name}"):
            try:
                o = sess.run(wanted, feeds)[0].astype(np.float32)  # fp16 outputs compared in fp32
            except Exception as e:  # the evaluation data does not fit the model
                raise EdgeqError(f"{a.path} fails on evaluation data {ctx.config.evaluation.path}: "
                                 f"{str(e).strip().splitlines()[0][:300]}") from None
            if o.ndim == 0:  # a per-sample comparison needs a batch axis
                raise EdgeqError(f"{a.path}: the evaluated output {ctx.model.primary_output or 'the first'} is a "
                                 "scalar: pass --output with a per-sample output")
            if not np.isfinite(o).all():  # every metric would be NaN, and NaN compares as passing nothing
                raise EdgeqError(_non_finite(a.name, ctx.config.evaluation.path))
            pools.append(pooled(o, mask))
            raw.append(o[mask.astype(bool)] if (o.ndim == 3 and mask is not None) else o)
        outputs[a.name] = (raw, np.concatenate(pools))
    ref_raw, ref_pool = outputs["fp32"]
    for a in ctx.artifacts:
        raw, pool = outputs[a.name]
        a.metrics.update(fidelity(ref_raw, raw, ref_pool, pool, classifier))
    task_settings = {}
    if evalset is not None and evalset.kind != "text":
        scores, task_settings = task_metric(evalset, {k: v[1] for k, v in outputs.items()}, ctx.model.task,
                                            ctx.model.hf_config)
        for a in ctx.artifacts:
            a.metrics["task"] = {"metric": task_settings["metric"], "value": round(scores[a.name], 6),
                                 "delta_vs_fp32": round(scores[a.name] - scores["fp32"], 6),
                                 "samples": len(evalset)}
        if evalset.kind == "retrieval":
            pools = {k: v[1] for k, v in outputs.items()}
            found = retrieval_metrics(evalset, pools)
            for a in ctx.artifacts:
                a.metrics["retrieval"] = {k: round(v, 6) for k, v in found[a.name].items()}
            task_settings["retrieval"] = RETRIEVAL_HOW
            if ctx.config.evaluation.embedding_precisions:
                task_settings["embedding_codes"] = _embedding_codes(ctx, fp32_sess, evalset, pools)
    return StageResult(
        settings={"data": ctx.config.evaluation.path, "samples": len(samples), "batch_size": 1,
                  "reference": "fp32", "pooling": "mean over attention mask" if not classifier else "logits",
                  **({"views": "12 per photo (scales 0.875-1.75 of the resize, shifted crops, mirrors); calibration "
                              "used 8 other views" + (" of the same photos" if ctx.config.vision.eval_is_calibration_folder
                                                      else "")} if ctx.family == "vision" else {}),
                  **({"task": task_settings} if task_settings else {})},
        metrics={"overlap_with_calibration_removed": removed,
                 **{a.name: {k: a.metrics[k] for k in ("cosine", "cosine_min", "max_abs_err", "top1_agreement",
                                                       "top5_overlap", "task", "retrieval", "retrieval_codes")
                             if k in a.metrics} for a in ctx.artifacts}},
    )


RETRIEVAL_HOW = ("the corpus ranked by cosine of mean-pooled embeddings for every query; recall@1 (first "
                 "document relevant), recall@10, nDCG@10 (binary) against the labels; *_vs_fp32: the same against "
                 "fp32's own top 10 (recall@1: fp32's first document first; recall@10: share of fp32's top 10 kept)")


CODE_CALIBRATION_SAMPLES = 256  # calibration texts whose fp32 embeddings set the int8 codes' ranges


def _embedding_codes(ctx: BuildContext, sess, evalset, pools: dict) -> dict:
    """--embedding-precision: every artifact's retrieval with its query and document embeddings
    stored as int8 codes or bits (edgeq.metrics.embedding_codec), against fp32's float ranking, in
    `retrieval_codes`. The int8 ranges come from the fp32 model's embeddings of the calibration texts
    (never evaluation data), and are recorded so an app can encode the same way."""
    from edgeq.metrics import embedding_codec

    data = for_build(ctx)
    wanted = [ctx.model.primary_output] if ctx.model.primary_output else None
    cal = data.singles(data.calibration_samples(), CODE_CALIBRATION_SAMPLES)
    cal_emb = np.concatenate([pooled(sess.run(wanted, f)[0].astype(np.float32), m) for f, m in cal])
    out = {}
    for prec in ctx.config.evaluation.embedding_precisions:
        codec = embedding_codec(prec, cal_emb)
        found = retrieval_metrics(evalset, pools, codec)
        for a in ctx.artifacts:
            a.metrics.setdefault("retrieval_codes", {})[prec] = {k: round(v, 6) for k, v in found[a.name].items()}
        out[prec] = {"precision": prec, **({"min": [round(float(v), 6) for v in codec["min"]],
                                            "max": [round(float(v), 6) for v in codec["max"]],
                                            "encode": "unit-normalise, q = clip(round((e - min) / ((max - min) / 255)), "
                                                      "0, 255) - 128 per dimension; score: int8 dot product",
                                            "calibration_samples": len(cal)} if prec == "int8" else
                                           {"encode": "bit = e > 0 per dimension; score: dim - 2 * Hamming distance"})}
    return out


def _non_finite(name: str, data: str) -> str:
    if name == "fp32":
        return (f"the model gives NaN or infinite outputs on evaluation data {data} (fp32, before any "
                "quantization): check the model and the data")
    return (f"{name} gives NaN or infinite outputs on evaluation data {data} where fp32 does not: this "
            "recipe breaks the model (try another --mode, --calib-method or target)")


GREEDY_PROMPTS = 4  # evaluation rows whose first tokens prompt the greedy check


def _causal_lm(ctx: BuildContext) -> StageResult:
    """Perplexity of every artifact on held-out text (each sample a row of at most --max-length
    tokens, one call with an empty cache), and agreement with fp32's next-token predictions."""
    from edgeq import causal_lm

    path = Path(ctx.config.evaluation.path)
    data = for_build(ctx)
    rows = data.evaluation_rows()
    # greedy generation from the first prompts of the evaluation rows (their first 16 tokens at most)
    prompts = [r[:, :16] for r in rows[:GREEDY_PROMPTS]]
    try:
        results = causal_lm.evaluate({a.name: ctx.path(a.path) for a in ctx.artifacts}, rows, ctx.track,
                                     prompts=prompts, new_tokens=causal_lm.GREEDY_TOKENS)
    except EdgeqError:
        raise
    except Exception as e:  # e.g. a sample longer than the model's positions
        raise EdgeqError(f"a model fails on evaluation data {path}: {str(e).strip().splitlines()[0][:300]}") from None
    ref = results["fp32"]["perplexity"]
    for a in ctx.artifacts:
        r = results[a.name]
        a.metrics.update({k: r[k] for k in ("cosine", "cosine_min", "top1_agreement", "greedy_vs_fp32")})
        a.metrics["eval_samples"] = len(rows)
        a.metrics["task"] = {"metric": "perplexity", "value": round(r["perplexity"], 4),
                             "delta_vs_fp32": round(r["perplexity"] - ref, 4),
                             "relative_vs_fp32": round(r["perplexity"] / ref - 1, 6), "tokens": r["tokens"],
                             "samples": len(rows)}
    return StageResult(
        settings={"data": str(path), "samples": len(rows), "max_length": ctx.config.max_length,
                  "reference": "fp32", "task": {"metric": "perplexity", "how": "exp(mean negative log-likelihood "
                  "of each next token), every sample a separate sequence"},
                  "agreement": "top-1 next-token agreement and cosine of the logit vectors vs fp32, every position",
                  "greedy": f"greedy generation of {causal_lm.GREEDY_TOKENS} tokens from the first {len(prompts)} "
                            "evaluation rows (16 tokens of each as the prompt): the tokens equal to fp32's before "
                            "the first difference"},
        metrics={a.name: {"perplexity": results[a.name]["perplexity"], "top1_agreement": a.metrics["top1_agreement"]}
                 for a in ctx.artifacts},
    )
