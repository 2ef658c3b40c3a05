"""Real labelled text that ships offline inside the gensim wheel (its test data), as edgeq data files.

No gensim import is needed (or wanted: it pulls scipy); the files are read from the installed
package directory, found with importlib's metadata. `python -m edgeq.calib.gensim_data OUT_DIR`
writes:
  polarity.jsonl        200 movie-review sentences {"text", "label": "pos"|"neg"} (Pang & Lee), for
                        classification accuracy;
  lee-sts.jsonl         1,225 pairs of the 50 Lee news documents {"text1", "text2", "score"} with the
                        mean human similarity rating (Lee, Pincombe & Welsh 2005), for Spearman;
  lee-background.txt    300 other news documents, one per line: calibration data and held-out text
                        for language-model perplexity;
  lee-retrieval.jsonl   a retrieval task from all 350 Lee documents (the inverse cloze task of Lee,
                        Chang & Toutanova 2019): each story's first sentence is a query
                        {"query", "positive"} whose relevant document is the passage of the next
                        two sentences; every other two-sentence passage of every story is in the
                        corpus {"document"}: 321 queries, 1,226 documents.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from edgeq.calib import package_data_dir
from edgeq.core import EdgeqError


def data_dir() -> Path:
    return package_data_dir("gensim", "gensim/test/test_data", "test data files")


def polarity() -> list[dict]:
    rows = []
    # cp1252, as the file was written; "__label__pos text" per line (fastText format)
    for line in (data_dir() / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.strip().partition(" ")
        if label.startswith("__label__") and text.strip():
            rows.append({"text": text.strip(), "label": label[len("__label__"):]})
    return rows


def lee_documents() -> list[str]:
    return [d.strip() for d in (data_dir() / "lee.cor").read_text(encoding="latin-1").splitlines() if d.strip()]


def lee_sts() -> list[dict]:
    """Pairs (i < j) of the 50 documents with their similarity: the file is a 50 x 50 matrix whose
    upper triangle holds the ratings."""
    docs = lee_documents()
    matrix = [[float(x) for x in line.split()] for line in
              (data_dir() / "similarities0-1.txt").read_text().splitlines() if line.strip()]
    if len(matrix) != len(docs) or any(len(r) != len(docs) for r in matrix):
        raise EdgeqError(f"gensim's lee data: {len(docs)} documents but a {len(matrix)}-row similarity matrix")
    return [{"text1": docs[i], "text2": docs[j], "score": matrix[i][j]}
            for i in range(len(docs)) for j in range(i + 1, len(docs))]


def lee_background() -> list[str]:
    text = (data_dir() / "lee_background.cor").read_text(encoding="latin-1")
    return [d.strip() for d in text.splitlines() if d.strip()]


_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"])')
PASSAGE_SENTENCES = 2


def lee_retrieval() -> list[dict]:
    """The inverse-cloze retrieval set (see the module's docstring): query lines first, then the
    corpus's other passages, each passage once."""
    queries, docs, asked = [], [], set()
    for story in lee_background() + lee_documents():
        sents = [x.strip() for x in _SENTENCE_END.split(story) if x.strip()]
        if len(sents) < 1 + PASSAGE_SENTENCES or sents[0] in asked:  # a query and a whole passage; a story once
            continue
        asked.add(sents[0])
        passages = [" ".join(sents[i:i + PASSAGE_SENTENCES]) for i in range(1, len(sents), PASSAGE_SENTENCES)]
        queries.append({"query": sents[0], "positive": passages[0]})
        docs += [{"document": p} for p in passages[1:]]
    seen = {q["positive"] for q in queries}
    unique = []
    for d in docs:
        if d["document"] not in seen:
            seen.add(d["document"])
            unique.append(d)
    return queries + unique


def write_all(out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in (("polarity.jsonl", polarity()), ("lee-sts.jsonl", lee_sts()),
                       ("lee-retrieval.jsonl", lee_retrieval())):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts[name] = len(rows)
    docs = lee_background()
    (out / "lee-background.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    counts["lee-background.txt"] = len(docs)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgeq.calib.gensim_data OUT_DIR")
    try:
        for name, n in write_all(Path(sys.argv[1])).items():
            print(f"{Path(sys.argv[1]) / name}: {n} samples")
    except EdgeqError as e:
        sys.exit(f"error: {e}")
