"""One data source per model family: what a build calibrates on, evaluates on and benchmarks with,
turned into the model's own feeds. The stages ask a source; none of them reads data files itself.

  TextData   encoders (BERT-like): text (.txt/.jsonl, tokenized) or tensors (.npz) per file;
  ImageData  image models: folders of photos, several views per photo (calib.images);
  LMData     causal LMs: text as token rows (a prompt each, no padding).

`for_build(ctx)` picks the family's source. A `Sample` is one model call's feeds plus the attention
mask of text (the evaluation pools over it whether or not the model takes it as an input).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.calib import (
    EvalSet, Sample, TextFeeds, npz_calibration_share, read_eval_set, read_npz, read_texts,
)
from edgeq.core import EdgeqError

DEFAULT_TEXT_SAMPLES = 120  # unlabelled evaluation text read when --eval-samples is not given


def eval_count(samples: int | None, path: Path) -> int | None:
    """Samples to evaluate: --eval-samples when given, else all of a labelled (JSONL) set and
    DEFAULT_TEXT_SAMPLES of plain text."""
    if samples is not None:
        return samples
    return None if path.suffix.lower() in {".jsonl", ".ndjson"} else DEFAULT_TEXT_SAMPLES


def for_build(ctx) -> "TextData | ImageData | LMData":
    """The data source of a build (a BuildContext after the export and optimize stages)."""
    cls = {"vision": ImageData, "causal-lm": LMData}.get(ctx.config.family, TextData)
    return cls(ctx.config, ctx.model, ctx.tokenizer)


def _rows(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


class _Source:
    def __init__(self, config, model, tokenizer):
        self.config = config  # edgeq.config.BuildConfig
        self.model = model  # edgeq.core.ModelFacts
        self.tokenizer = tokenizer

    def bench_file(self, path: Path) -> Path:
        """The benchmark inputs as a .npz at `path`, written once per build: the benchmark stage, the
        hybrid search and the mobile .ort check all run the same inputs."""
        if not path.is_file():
            cfg = self.config.benchmark
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **self.bench_inputs(cfg.batch_size, cfg.seq_len))
        return path

    def bench_inputs(self, batch: int, seq_len: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _calibration_texts(self) -> list[str]:
        """The calibration texts, as calibration reads them (--calib-samples of them)."""
        cal = self.config.calibration
        return read_texts(Path(cal.path), limit=cal.samples, text_field=cal.text_field)

    def _held_out_text(self) -> str:
        """Held-out text concatenated, for benchmark inputs of real tokens (no padding)."""
        path = Path(self.config.evaluation.path)
        return " ".join(read_eval_set(path, limit=200, text_field=self.config.calibration.text_field).texts)

    @staticmethod
    def batches(samples: dict[str, np.ndarray], batch_size: int):
        """Feeds of `batch_size` rows at a time."""
        for i in range(0, _rows(samples), batch_size):
            yield {k: v[i:i + batch_size] for k, v in samples.items()}

    @staticmethod
    def singles(samples: dict[str, np.ndarray], n: int | None = None) -> list[Sample]:
        """The first `n` samples, one model call each (as on a device)."""
        count = _rows(samples) if n is None else min(n, _rows(samples))
        return [Sample({k: v[i:i + 1] for k, v in samples.items()}, None) for i in range(count)]


class TextData(_Source):
    """An encoder's data: each file is text (tokenized with the model's tokenizer, at most
    --max-length tokens a sample) or tensors (.npz keyed by input name, first axis = samples)."""

    def _feeds(self, max_length: int) -> TextFeeds:
        return TextFeeds(self.tokenizer, self.model.input_names, max_length)

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise EdgeqError(f"text {what} data needs a tokenizer: pass --tokenizer DIR, or "
                             + ("calibration tensors as .npz" if what == "calibration" else "tensors as .npz"))

    def calibration_samples(self) -> list[str] | dict[str, np.ndarray]:
        """Texts, or arrays by input name. When one .npz serves calibration and evaluation, its last
        quarter is left out here (see calib.npz_calibration_share)."""
        cal = self.config.calibration
        path = Path(cal.path)
        if path.suffix.lower() == ".npz":
            arrays = read_npz(path, self.model.input_names, specs=self.model.input_specs)
            share = npz_calibration_share(_rows(arrays), shared=self.config.evaluation.path == str(path))[0]
            return {k: v[share][:cal.samples] for k, v in arrays.items()}
        self._need_tokenizer("calibration")
        return self._calibration_texts()

    def batches(self, samples, batch_size: int):
        if isinstance(samples, dict):
            yield from super().batches(samples, batch_size)
            return
        for s in self._feeds(self.config.max_length).batches(samples, batch_size):
            yield s.feeds

    def singles(self, samples, n: int | None = None) -> list[Sample]:
        if isinstance(samples, dict):
            return super().singles(samples, n)
        tf = self._feeds(self.config.max_length)
        return [tf([t]) for t in samples[:n]]

    def calibration_texts(self) -> set[str]:
        """The calibration texts (none when the calibration data is tensors)."""
        if Path(self.config.calibration.path).suffix.lower() == ".npz":
            return set()
        return set(self._calibration_texts())

    def evaluation(self) -> tuple[list[Sample], int, EvalSet | None]:
        """(samples, how many were left out as calibration samples, the labelled set or None).
        Never a calibration sample, whatever the modes (a dynamic build's smoothing calibrates on
        them too): text in the calibration file is left out, and a .npz serving both keeps its
        last quarter for evaluation."""
        cfg = self.config.evaluation
        path = Path(cfg.path)
        if path.suffix.lower() == ".npz":
            arrays = read_npz(path, self.model.input_names, what="evaluation", specs=self.model.input_specs)
            n = _rows(arrays)
            shared = self.config.calibration.path == str(path)
            held = npz_calibration_share(n, shared)[1]
            removed = n - len(range(n)[held])  # the samples calibration used
            return self.singles({k: v[held] for k, v in arrays.items()}, cfg.samples), removed, None
        self._need_tokenizer("evaluation")
        exclude = self.calibration_texts()
        n = eval_count(cfg.samples, path)
        full = read_eval_set(path, limit=None if n is None else n + len(exclude),
                             text_field=self.config.calibration.text_field)
        evalset = full.without(exclude)
        if not len(evalset):
            raise EdgeqError(f"evaluation file {path} has no samples that are not also calibration samples")
        if n is not None:
            evalset = evalset.subset(list(range(min(n, len(evalset)))))
        tf = self._feeds(self.config.max_length)
        return [tf([t]) for t in evalset.texts], sum(t in exclude for t in full.texts), evalset

    def task_selection(self) -> tuple[EvalSet, list[Sample]]:
        """The even-indexed half of the labelled evaluation set (minus the calibration texts) and its
        samples: what the hybrid search scores a task-metric budget on."""
        path = Path(self.config.evaluation.path)
        evalset = read_eval_set(path, text_field=self.config.calibration.text_field).without(self.calibration_texts())
        if evalset.kind == "text":
            raise EdgeqError(f"--budget-metric task needs labelled evaluation data (JSONL with labels or scored "
                             f"pairs); {path.name} has none")
        sel = evalset.subset(list(range(0, len(evalset), 2)))
        tf = self._feeds(self.config.max_length)
        return sel, [tf([t]) for t in sel.texts]

    def bench_inputs(self, batch: int, seq_len: int) -> dict[str, np.ndarray]:
        """A batch of `seq_len` real tokens (held-out text, concatenated), so no position is padding."""
        eval_path = Path(self.config.evaluation.path)
        if eval_path.suffix.lower() == ".npz":
            arrays = read_npz(eval_path, self.model.input_names, what="evaluation", specs=self.model.input_specs)
            return {k: np.repeat(v[:1], batch, axis=0) for k, v in arrays.items()}
        feeds = self._feeds(seq_len)([self._held_out_text()], pad_to=seq_len).feeds
        return {k: np.repeat(v, batch, axis=0) for k, v in feeds.items()}


class ImageData(_Source):
    """An image model's data: photos (a folder; sub-folders are classes), preprocessed as the model
    declares. Calibration and evaluation use different views of each photo (calib.images)."""

    def _arrays(self, folder: str, limit: int | None, views, what: str):
        from edgeq.calib.images import image_arrays

        return image_arrays(Path(folder), self.model.preprocess, self.model.input_names[0], limit, views, what)

    def calibration_samples(self) -> dict[str, np.ndarray]:
        from edgeq.calib.images import CALIB_VIEWS

        cal = self.config.calibration
        return self._arrays(cal.path, cal.samples, CALIB_VIEWS, "calibration")[0]

    def evaluation(self) -> tuple[list[Sample], int, EvalSet | None]:
        from edgeq.calib.images import EVAL_VIEWS

        arrays, labels, names = self._arrays(self.config.evaluation.path, self.config.evaluation.samples,
                                             EVAL_VIEWS, "evaluation")
        labelled = all(lb is not None for lb in labels) and len(set(labels)) >= 2
        return self.singles(arrays), 0, EvalSet("classification", names, labels=labels) if labelled else None

    def bench_inputs(self, batch: int, seq_len: int) -> dict[str, np.ndarray]:
        from edgeq.calib.images import EVAL_VIEWS

        arrays = self._arrays(self.config.evaluation.path, 1, EVAL_VIEWS, "evaluation")[0]
        return {k: np.repeat(v, batch, axis=0) for k, v in arrays.items()}


class LMData(_Source):
    """A causal LM's data: each text one row of at most --max-length tokens (no padding; texts of
    fewer than 2 tokens carry no next-token prediction and are skipped)."""

    def rows(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for t in texts:
            ids = self.tokenizer(t, truncation=True, max_length=self.config.max_length,
                                 return_tensors="np")["input_ids"].astype(np.int64)
            if ids.shape[1] >= 2:
                out.append(ids)
        return out

    def calibration_rows(self) -> list[np.ndarray]:
        rows = self.rows(self._calibration_texts())
        if not rows:
            raise EdgeqError(f"no calibration text in {self.config.calibration.path} is 2 tokens or longer")
        return rows

    def evaluation_rows(self) -> list[np.ndarray]:
        """Held-out rows: never a calibration text (the smoothing statistics were measured on them),
        also when --calib and --eval name the same file."""
        path = Path(self.config.evaluation.path)
        exclude = set(self._calibration_texts())
        n = eval_count(self.config.evaluation.samples, path)
        texts = [t for t in read_eval_set(path, limit=None if n is None else n + len(exclude),
                                          text_field=self.config.calibration.text_field).texts if t not in exclude]
        rows = self.rows(texts[:n] if n is not None else texts)
        if not rows:
            raise EdgeqError(f"evaluation file {path}: no sample that is not also a calibration text has the 2 "
                             "tokens a next-token prediction needs")
        return rows

    def bench_inputs(self, batch: int, seq_len: int) -> dict[str, np.ndarray]:
        """The prompt: `seq_len` real tokens of held-out text; the runner generates the rest."""
        ids = self.tokenizer(self._held_out_text(), truncation=True, max_length=seq_len, return_tensors="np")["input_ids"]
        return {"input_ids": np.repeat(ids.astype(np.int64), batch, axis=0)}
