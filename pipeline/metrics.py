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


def fidelity(ref: list[np.ndarray], got: list[np.ndarray], ref_pool: np.ndarray, got_pool: np.ndarray,
             classifier: bool) -> dict:
    num = (ref_pool * got_pool).sum(axis=1)
    den = np.linalg.norm(ref_pool, axis=1) * np.linalg.norm(got_pool, axis=1)
    cos = num / np.maximum(den, 1e-12)
    err = np.concatenate([np.abs(r - g).reshape(-1) for r, g in zip(ref, got)])
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs_err": float(err.max()),
           "mean_abs_err": float(err.mean()), "eval_samples": len(ref)}
    if classifier:
        out["top1_agreement"] = float((ref_pool.argmax(1) == got_pool.argmax(1)).mean())
    return out
