"""Running a decoder-only ONNX model with its key/value cache: prefill, one-token decode steps,
greedy generation, and token log-likelihoods.

Standalone on purpose (numpy and onnxruntime only, no edgeq import) like bench_runner.py, which
imports it: both files are copied to a device for `edgeq bench --host`.

The model is an optimum "text-generation-with-past" export: inputs input_ids, attention_mask,
(position_ids,) past_key_values.<i>.key/.value [batch, kv_heads, past_len, head_dim]; outputs
logits and present.<i>.key/.value. The first call passes an empty cache (past_len 0).
"""
import numpy as np


class KVModel:
    def __init__(self, session):
        self.sess = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        if "input_ids" not in self.inputs or not self.past_names:
            raise ValueError("not a decoder with a key/value cache (needs input_ids and past_key_values.* inputs)")
        outs = [o.name for o in session.get_outputs()]
        self.present = {p: p.replace("past_key_values.", "present.") for p in self.past_names}
        missing = [v for v in self.present.values() if v not in outs]
        if "logits" not in outs or missing:
            raise ValueError(f"decoder outputs missing: {', '.join((['logits'] if 'logits' not in outs else []) + missing)}")
        self.output_names = ["logits"] + [self.present[p] for p in self.past_names]
        self.float_type = np.float16 if "float16" in self.inputs[self.past_names[0]].type else np.float32

    def empty_past(self, batch: int) -> dict:
        past = {}
        for n in self.past_names:
            shape = self.inputs[n].shape  # [batch, kv_heads, past_len, head_dim]: heads and dim are fixed
            if not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise ValueError(f"{n}: expected fixed kv-head and head-dim sizes, got {shape}")
            past[n] = np.zeros((batch, shape[1], 0, shape[3]), dtype=self.float_type)
        return past

    def feeds(self, ids: np.ndarray, past: dict, past_len: int) -> dict:
        """The session's inputs for `ids` [batch, len] after `past_len` cached tokens."""
        b, t = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), **past}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((b, past_len + t), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
        return feeds

    def forward(self, ids: np.ndarray, past: dict, past_len: int):
        """Logits [batch, len, vocab] for `ids` [batch, len] after `past_len` cached tokens, and the
        new cache."""
        outs = self.sess.run(self.output_names, self.feeds(ids, past, past_len))
        return outs[0], dict(zip(self.past_names, outs[1:]))

    def generate(self, ids: np.ndarray, new_tokens: int, eos=(), on_token=None):
        """Greedy decoding: the prompt in one prefill call, then one token per call with the cache,
        stopping early (batch 1) at a token in `eos`. Returns (generated ids [batch, n], seconds of
        prefill, seconds per decode step)."""
        import time

        stop = {int(e) for e in eos}
        t0 = time.perf_counter()
        logits, past = self.forward(ids, self.empty_past(ids.shape[0]), 0)
        prefill_s = time.perf_counter() - t0
        out = []
        step_s = []
        length = ids.shape[1]
        token = logits[:, -1].argmax(-1)
        for i in range(new_tokens):
            out.append(token)
            if on_token is not None:
                on_token(int(token[0]))
            if ids.shape[0] == 1 and int(token[0]) in stop:
                break
            if i == new_tokens - 1:
                break
            t0 = time.perf_counter()
            logits, past = self.forward(token[:, None], past, length)
            step_s.append(time.perf_counter() - t0)
            length += 1
            token = logits[:, -1].argmax(-1)
        return np.stack(out, axis=1), prefill_s, step_s



def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of tokens 1..n-1 of each row of `ids` under `logits` [batch, n, vocab]
    of a full-sequence call (position t predicts token t + 1)."""
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
