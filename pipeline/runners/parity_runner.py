"""Runs ONNX models on fixed inputs and saves every output, for `edgeq parity`.

Standalone on purpose (stdlib, numpy and onnxruntime only, no edgeq import), like bench_runner.py:
the very same file runs natively and under QEMU with the aarch64 build of onnxruntime, so the only
difference between the two runs is the CPU architecture and the kernels it selects.

Inputs: an .npz whose arrays are named "<sample>/<input name>" (samples "0", "1"...; each sample
may have its own sequence length). Outputs: an .npz with arrays named "<model>/<sample>/<output>".
Prints one JSON object: onnxruntime and numpy versions, platform.machine(), and per model the
seconds taken (load + all samples) or the error that stopped it (one model failing does not stop
the others: an artifact that cannot run on one architecture is a parity finding, not a crash).

usage: python parity_runner.py '{"models": {"fp32": "model.fp32.onnx", ...}, "inputs": "in.npz",
                                 "output": "out.npz", "threads": 1, "provider": "CPUExecutionProvider"}'
"""
import json
import platform
import sys
import time


def _samples(path: str) -> list:
    """[{input name: array}] in sample order, from the "<sample>/<input>" arrays of an .npz."""
    import numpy as np

    samples: dict = {}
    with np.load(path) as z:
        for key in z.files:
            sample, name = key.split("/", 1)
            samples.setdefault(int(sample), {})[name] = z[key]
    return [samples[i] for i in sorted(samples)]


def main(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    samples = _samples(spec["inputs"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(spec.get("threads", 1))
    so.inter_op_num_threads = 1
    provider = spec.get("provider", "CPUExecutionProvider")
    outputs, models = {}, {}
    for name, path in spec["models"].items():
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(path, so, providers=[provider])
            wanted = {i.name for i in sess.get_inputs()}
            out_names = [o.name for o in sess.get_outputs()]
            for i, feeds in enumerate(samples):
                values = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
                for out_name, value in zip(out_names, values):
                    outputs[f"{name}/{i}/{out_name}"] = np.asarray(value)
            models[name] = {"seconds": round(time.perf_counter() - t0, 3), "provider": sess.get_providers()[0],
                            "outputs": out_names}
        except Exception as e:  # recorded per model; the others still run
            models[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    np.savez(spec["output"], **outputs)
    return {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "samples": len(samples), "models": models}


if __name__ == "__main__":
    try:
        print(json.dumps(main(json.loads(sys.argv[1]))))
    except Exception as e:  # the parent reports this as a failed run, not a crash
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
        sys.exit(1)
