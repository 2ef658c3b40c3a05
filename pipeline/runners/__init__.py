"""Scripts that run outside the build: copied to a device for `edgeq bench --host`, or run under QEMU
for `edgeq parity`, with that machine's own Python, numpy and onnxruntime.

So they import nothing from edgeq (tests/test_layout.py enforces it): stdlib, numpy, onnxruntime and
each other by file name (torch_runtime, the host-only PyTorch baseline, also torch and transformers). edgeq runs them by path; these are their paths.
"""
from pathlib import Path

HERE = Path(__file__).parent
BENCH_RUNNER = HERE / "bench_runner.py"  # latency, load time, peak RSS, EP partition, op profile
PARITY_RUNNER = HERE / "parity_runner.py"  # outputs of short inputs, compared across machines
LM_RUNTIME = HERE / "lm_runtime.py"  # the key/value-cache loop, imported by bench_runner for causal LMs
TORCH_RUNTIME = HERE / "torch_runtime.py"  # PyTorch dynamic int8 baseline (host only: torch, transformers)
