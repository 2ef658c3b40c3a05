"""Fidelity metrics of an artifact's outputs against the fp32 reference (evaluate stage, hybrid search)."""
from __future__ import annotations

import numpy as np


def pooled(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[B, T, H] token outputs -> [B, H] by mean over real tokens; 2-D outputs pass through."""
    if output.ndim == 3:
        if mask is None:
            return output.mean(axis=1)
        m = mask[..., None].astype(output.dtype)
        return (output * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1)
    return output.reshape(output.shape[0], -1)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis) of two arrays."""
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(den, 1e-12)


def fidelity(ref: list[np.ndarray], got: list[np.ndarray], ref_pool: np.ndarray, got_pool: np.ndarray,
             classifier: bool) -> dict:
    cos = row_cosine(ref_pool, got_pool)
    err = np.concatenate([np.abs(r - g).reshape(-1) for r, g in zip(ref, got)])
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs_err": float(err.max()),
           "mean_abs_err": float(err.mean()), "eval_samples": len(ref)}
    if classifier:
        out["top1_agreement"] = float((ref_pool.argmax(1) == got_pool.argmax(1)).mean())
        if ref_pool.shape[1] >= 5:  # share of fp32's top five classes that are also in the artifact's
            r5, g5 = np.argsort(-ref_pool, 1)[:, :5], np.argsort(-got_pool, 1)[:, :5]
            out["top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r5, g5)]))
    return out


# --- task metrics on labelled evaluation data ---------------------------------------------------
# scipy and scikit-learn are not dependencies; the two statistics needed are a few lines of numpy.

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def pair_cosines(emb: np.ndarray, pairs) -> np.ndarray:
    idx = np.asarray(pairs)
    return row_cosine(emb[idx[:, 0]], emb[idx[:, 1]])


def _fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3, iters: int = 300) -> np.ndarray:
    """Multinomial logistic regression (weights incl. bias) by full-batch gradient descent with
    Nesterov momentum: deterministic, and convex, so the starting point does not matter."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros((xb.shape[1], classes))
    v = np.zeros_like(w)
    onehot = np.eye(classes)[y]
    lr = 1.0 / (0.25 * (np.linalg.norm(xb, 2) ** 2) / len(x) + l2)  # 1 / Lipschitz constant of the gradient
    for _ in range(iters):
        ahead = w + 0.9 * v
        z = xb @ ahead
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = xb.T @ (p - onehot) / len(x) + l2 * ahead
        v = 0.9 * v - lr * grad
        w = w + v
    return w


def probe_accuracy(ref_emb: np.ndarray, embs: dict[str, np.ndarray], labels: list, folds: int = 5) -> dict[str, float]:
    """Classification accuracy of an embedding model: a logistic-regression head trained on the fp32
    embeddings of k-1 folds classifies each artifact's embeddings of the held-out fold, as a head
    trained once and deployed beside a quantized encoder would. Folds are fixed (sample i is in fold
    i mod k), so every artifact is scored on the same split."""
    names = sorted({str(v) for v in labels})
    y = np.array([names.index(str(v)) for v in labels])

    def norm(e):
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    ref = norm(ref_emb.astype(np.float64))
    fold = np.arange(len(y)) % folds
    correct = {k: 0 for k in embs}
    for f in range(folds):
        train, test = fold != f, fold == f
        if not test.any() or len(set(y[train])) < 2:
            continue
        mu = ref[train].mean(0)
        w = _fit_logistic(ref[train] - mu, y[train], len(names))
        for k, e in embs.items():
            xt = norm(e[test].astype(np.float64)) - mu
            pred = (np.hstack([xt, np.ones((len(xt), 1))]) @ w).argmax(1)
            correct[k] += int((pred == y[test]).sum())
    return {k: correct[k] / len(y) for k in embs}


def label_accuracy(logits: np.ndarray, labels: list, label2id: dict[str, int]) -> float:
    """Accuracy of a classifier's argmax against labels given as class indices or class names."""
    y = np.array([label2id[str(v)] for v in labels])
    return float((logits.argmax(1) == y).mean())


def task_metric(evalset, pooled_by_artifact: dict[str, np.ndarray], task: str | None,
                hf_config: dict) -> tuple[dict[str, float], dict]:
    """The task metric of every model from its pooled outputs (one row per text of `evalset`, a
    calib.EvalSet); `pooled_by_artifact` must hold "fp32", the reference the probe is trained on."""
    from edgeq.core import EdgeqError

    ref = pooled_by_artifact["fp32"]
    if evalset.kind == "retrieval":
        r = retrieval_metrics(evalset, pooled_by_artifact)
        return ({k: v["ndcg@10"] for k, v in r.items()},
                {"metric": "ndcg@10", "how": "nDCG@10 of the labelled documents, the corpus ranked by cosine to "
                                             "each query", "queries": len(evalset.queries),
                 "documents": len(evalset.docs)})
    if evalset.kind == "pairs":
        gold = evalset.scores
        return ({k: spearman(pair_cosines(e, evalset.pairs), gold) for k, e in pooled_by_artifact.items()},
                {"metric": "spearman", "how": "Spearman correlation of cosine(embedding1, embedding2) "
                                              "with the gold scores", "pairs": len(evalset.pairs)})
    if task in ("text-classification", "image-classification"):
        label2id = class_index(hf_config, ref.shape[1])
        unknown = sorted({str(v) for v in evalset.labels} - set(label2id))
        if unknown:
            raise EdgeqError(f"evaluation labels {', '.join(unknown[:5])} are not classes of the model "
                             f"(it has {', '.join(sorted(label2id, key=lambda k: label2id[k])[:10])})")
        return ({k: label_accuracy(e, evalset.labels, label2id) for k, e in pooled_by_artifact.items()},
                {"metric": "accuracy", "how": "argmax of the model's logits against the labels"})
    return (probe_accuracy(ref, pooled_by_artifact, evalset.labels),
            {"metric": "accuracy", "how": "logistic-regression head trained on fp32 embeddings (5 folds, "
                                          "sample i in fold i mod 5), applied to each artifact's embeddings"})


# --- retrieval ---------------------------------------------------------------------------------

def _top(q: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    """[queries, k] corpus positions by descending score q @ d.T (ties: the earlier document first)."""
    scores = q @ d.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _ndcg(ranked: np.ndarray, relevant: list[set], k: int) -> float:
    """Mean nDCG@k with binary relevance."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    out = []
    for row, rel in zip(ranked, relevant):
        if not rel:
            continue
        dcg = sum(disc[i] for i, d in enumerate(row[:k]) if d in rel)
        out.append(dcg / disc[:min(len(rel), k)].sum())
    return float(np.mean(out)) if out else 0.0


def embedding_codec(kind: str, calibration: np.ndarray | None = None) -> dict:
    """How a vector store keeps the embeddings: "float", "int8" (per dimension, the unit-normalised
    calibration embeddings' [min, max] mapped onto -128..127, as sentence-transformers'
    quantize_embeddings with calibration embeddings) or "binary" (one bit per dimension, > 0)."""
    if kind == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("int8 embeddings need calibration embeddings for their ranges")
        u = _unit(calibration.astype(np.float32))
        return {"precision": "int8", "min": u.min(0).astype(np.float32), "max": u.max(0).astype(np.float32)}
    return {"precision": kind}


def encode_embeddings(e: np.ndarray, codec: dict) -> np.ndarray:
    """The embeddings as the store holds them, as float arrays to score with a dot product: the int8
    codes themselves, or the bits as +-1 (a dot product of +-1 vectors is dim - 2 * Hamming distance)."""
    u = _unit(e.astype(np.float32))
    if codec["precision"] == "int8":
        lo, hi = codec["min"], codec["max"]
        step = np.maximum(hi - lo, 1e-12) / 255.0
        return (np.clip(np.round((u - lo) / step), 0, 255) - 128).astype(np.float32)
    if codec["precision"] == "binary":
        return np.where(u > 0, 1.0, -1.0).astype(np.float32)
    return u


def retrieval_metrics(evalset, pooled_by_artifact: dict[str, np.ndarray], codec: dict | None = None,
                      k: int = 10) -> dict[str, dict]:
    """Per artifact, the retrieval task of `evalset` (a calib.EvalSet of kind "retrieval", rows of the
    pooled outputs matching its texts) scored by cosine: recall@1 (first document relevant), recall@k
    (share of the relevant documents in the top k) and nDCG@k (binary relevance) against the labels, and the same against fp32's own float ranking ("_vs_fp32": recall@1
    is the share of queries with fp32's first document first; recall@k the share of fp32's top k in
    the artifact's top k; nDCG@k with fp32's top k as the relevant set). With `codec` (int8 or binary
    embeddings) every artifact's queries and documents are encoded so, fp32's reference staying float."""
    q_idx, d_idx = np.array(evalset.queries), np.array(evalset.docs)
    ref = pooled_by_artifact["fp32"]
    ref_top = _top(_unit(ref[q_idx]), _unit(ref[d_idx]), k)
    ref_sets = [set(r) for r in ref_top]
    labels = [set(p) for p in evalset.positives]
    out = {}
    for name, e in pooled_by_artifact.items():
        enc = encode_embeddings(e, codec) if codec else _unit(e)
        top = _top(enc[q_idx], enc[d_idx], k)
        out[name] = {
            "recall@1": float(np.mean([r[0] in rel for r, rel in zip(top, labels)])),
            f"recall@{k}": float(np.mean([len(set(r) & rel) / max(len(rel), 1) for r, rel in zip(top, labels)])),
            f"ndcg@{k}": _ndcg(top, labels, k),
            "recall@1_vs_fp32": float(np.mean(top[:, 0] == ref_top[:, 0])),
            f"recall@{k}_vs_fp32": float(np.mean([len(set(r) & s) / k for r, s in zip(top, ref_sets)])),
            f"ndcg@{k}_vs_fp32": _ndcg(top, ref_sets, k),
        }
    return out


def class_index(hf_config: dict, num_classes: int) -> dict[str, int]:
    """Label (as text) -> class index: the indices themselves and the config's label names."""
    out = {str(i): i for i in range(num_classes)}
    for i, name in (hf_config.get("id2label") or {}).items():
        if str(i).isdigit() and int(i) < num_classes:
            out[str(name)] = int(i)
    return out
