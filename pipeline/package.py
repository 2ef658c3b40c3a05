"""Stage 8, package: the build directory becomes a self-describing artifact folder, with, for
targets whose profile asks for it, what a mobile app needs: ORT-format models (`.ort`, what ONNX
Runtime Mobile loads), the reduced-operator configuration for a minimal ONNX Runtime build, and an
artifact README for app developers (inputs, outputs, preprocessing, Kotlin and Swift snippets).

The conversion is onnxruntime.tools.convert_onnx_models_to_ort; each `.ort` is then loaded back and
compared with its `.onnx` on the benchmark inputs, so a broken conversion fails the build.

Records sha256 and size of every file (models, tokenizer, config, calibration ranges, intermediates)
for the manifest, which the build writes last: a directory with a manifest.json is complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from edgeq.core import BuildContext, Files, StageResult, sha256_file


def file_records(ctx: BuildContext) -> list[dict]:
    records = []
    for p in sorted(ctx.build_dir.rglob("*")):
        rel = p.relative_to(ctx.build_dir).as_posix()
        # hidden names (the build's checkpoints, temp files) are bookkeeping, not part of the build
        if p.is_file() and rel != Files.MANIFEST and not any(part.startswith(".") for part in rel.split("/")):
            records.append({"path": rel, "sha256": sha256_file(p), "size_bytes": p.stat().st_size})
    return records


def run(ctx: BuildContext) -> StageResult:
    pkg = ctx.target.package
    metrics: dict = {}
    if pkg.get("ort_format"):
        metrics["ort"] = convert_to_ort(ctx)
    if pkg.get("mobile_readme"):
        metrics["readme"] = write_readme(ctx, metrics.get("ort", {}).get("ort_vs_onnx", {}))
    records = file_records(ctx)
    by_path = {r["path"]: r for r in records}
    for a in ctx.artifacts:
        a.metrics.setdefault("size_bytes", by_path[a.path]["size_bytes"])
    ctx.files = records
    total = sum(r["size_bytes"] for r in records)
    shipped = [a.path for a in ctx.artifacts] + [f for a in ctx.artifacts for f in a.formats.values()]
    shipped += [r["path"] for r in records if r["path"].startswith(Files.TOKENIZER_DIR + "/")
                or r["path"] in (REDUCED_OPS, ARTIFACT_README)]
    return StageResult(settings={"layout": "artifacts/<model>/<target>/", "ort_format": bool(pkg.get("ort_format")),
                                 "mobile_readme": bool(pkg.get("mobile_readme"))},
                       outputs=shipped, metrics={**metrics, "files": len(records), "total_bytes": total})


# --- mobile packaging ---------------------------------------------------------------------------

REDUCED_OPS = "required_operators.config"
ARTIFACT_README = "README.md"

# ONNX Runtime Mobile session-option calls per execution provider, for the snippets.
_KOTLIN_EP = {"NnapiExecutionProvider": "addNnapi()", "XnnpackExecutionProvider": "addXnnpack(emptyMap())",
              "CoreMLExecutionProvider": "addCoreML()"}
_SWIFT_EP = {"CoreMLExecutionProvider": "try options.appendCoreMLExecutionProvider(with: ORTCoreMLExecutionProviderOptions())",
             "XnnpackExecutionProvider": "try options.appendXnnpackExecutionProvider(with: ORTXnnpackExecutionProviderOptions())"}


def convert_to_ort(ctx: BuildContext) -> dict:
    """Write model.<name>.ort for every artifact and required_operators.config; verify outputs."""
    pkg = ctx.target.package
    style = pkg.get("ort_optimization_style", "Fixed")
    platform = pkg.get("ort_target_platform", "arm")
    with tempfile.TemporaryDirectory(dir=ctx.build_dir) as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for a in ctx.artifacts:
            (src / Path(a.path).name).symlink_to(ctx.path(a.path))
        out = Path(tmp) / "out"
        _convert_reproducibly(Path(tmp), style, platform)
        # the Runtime style names its outputs *.with_runtime_opt.ort / .config
        tag = ".with_runtime_opt" if style == "Runtime" else ""
        for a in ctx.artifacts:
            ort_name = Path(a.path).with_suffix(".ort").name
            (out / f"{Path(a.path).stem}{tag}.ort").replace(ctx.path(ort_name))
            a.formats["ort"] = ort_name
        # The generated config names the models by absolute temp paths: keep only the operator lines
        config = out / REDUCED_OPS.replace(".config", f"{tag}.config")
        ops = [ln for ln in config.read_text().splitlines() if ln and not ln.startswith("#")]
    build_flag = "--minimal_build extended" if style == "Runtime" else "--minimal_build"
    header = ["# Operators needed by " + ", ".join(a.formats["ort"] for a in ctx.artifacts),
              f"# (ONNX Runtime minimal build: ./build.sh {build_flag} --include_ops_by_config {REDUCED_OPS})"]
    ctx.path(REDUCED_OPS).write_text("\n".join(header + ops) + "\n")
    checks = verify_ort(ctx)
    return {"optimization_style": style, "target_platform": platform, "reduced_ops": REDUCED_OPS,
            "operators": sum(len(ln.split(";")[2].split(",")) for ln in ops), "ort_vs_onnx": checks}


# onnxruntime.tools' conversion, run in a child process (folder `in` -> `out` in its cwd)
_CONVERT = ("import logging, sys\n"
            "from pathlib import Path\n"
            "from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort\n"
            "for name in ('ort_format_model.utils', 'convert_onnx_models_to_ort', 'ort_format_model'):\n"
            "    logging.getLogger(name).setLevel(logging.WARNING)\n"
            "convert_onnx_models_to_ort(Path('in'), Path('out'), optimization_styles="
            "[getattr(OptimizationStyle, sys.argv[1])], target_platform=sys.argv[2])\n")
_ADDR_NO_RANDOMIZE = 0x0040000  # personality(2)


def _convert_reproducibly(workdir: Path, style: str, platform: str) -> None:
    """The .ort files, the same bytes from build to build. ONNX Runtime writes some of the
    flatbuffer's tables (the kernel type resolver's) in the iteration order of a hash map whose seed
    is an address in its library, so each process lays them out differently (same content, a few
    hundred bytes placed otherwise). The conversion therefore runs in a child process with address
    randomization off and a fixed environment and command line: the same library then lands at the
    same addresses and the layout repeats on the same machine and install. Where personality(2)
    is not available (not Linux) it runs as it is, and only the content is the same."""
    import ctypes
    import subprocess
    import sys

    def no_aslr() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).personality(_ADDR_NO_RANDOMIZE)
        except (OSError, AttributeError):
            pass

    env = {"PATH": os.defpath, "LC_ALL": "C", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}  # where onnxruntime may be
    proc = subprocess.run([sys.executable, "-c", _CONVERT, style, platform], cwd=workdir, env=env,
                          capture_output=True, text=True,
                          preexec_fn=no_aslr if sys.platform.startswith("linux") else None)
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"ORT format conversion failed: {last}")


def verify_ort(ctx: BuildContext) -> dict:
    """Each .ort must load and reproduce its .onnx on the benchmark inputs.

    fp32: within rounding. Quantized/fp16: a Fixed-style .ort made for ARM carries ARM's kernel
    choices (ONNX Runtime rewrites QDQ graphs per platform), which on an x86 host can move the
    output as much as quantization itself does; so the allowed difference is tied to the artifact's
    own error: at most 3x the largest difference between the .onnx and fp32 on the same inputs (the
    rule `edgeq parity` uses between CPU architectures)."""
    import onnxruntime as ort

    feeds_all = dict(np.load(ctx.path(Files.BENCH_INPUTS)))
    checks, fp32_out = {}, None
    wanted = [ctx.model.primary_output] if ctx.model.primary_output else None
    for a in ctx.artifacts:
        outs = []
        for f in (a.path, a.formats["ort"]):
            sess = ort.InferenceSession(str(ctx.path(f)), providers=["CPUExecutionProvider"])
            feeds = {i.name: feeds_all[i.name] for i in sess.get_inputs()}
            outs.append(sess.run(wanted, feeds)[0].astype(np.float32))
        diff = float(np.abs(outs[0] - outs[1]).max())
        scale = float(np.abs(outs[0]).max()) or 1.0
        if a.name == "fp32":
            fp32_out = outs[0]
            tol, rule = 1e-4 * scale, "1e-4 x max |output|"
        else:
            own = float(np.abs(outs[0] - fp32_out).max()) if fp32_out is not None else scale
            tol, rule = max(3 * own, 1e-4 * scale), "3 x the .onnx's own max difference from fp32"
        checks[a.name] = {"max_abs_diff": diff, "tolerance": tol, "rule": rule, "passed": diff <= tol}
        if diff > tol:
            raise RuntimeError(f"{a.formats['ort']} differs from {a.path} by {diff:.3g} (> {tol:.3g}, {rule})")
    return checks


def _io_table(model_path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)

    def rows(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims, "shape_text": "[" + ", ".join(dims) + "]"})
        return out

    inits = {i.name for i in m.graph.initializer}
    return rows([i for i in m.graph.input if i.name not in inits]), rows(m.graph.output)


def write_readme(ctx: BuildContext, ort_checks: dict) -> str:
    """The artifact README for app developers; returns its file name. `ort_checks`: each .ort's
    comparison with its .onnx (convert_to_ort)."""
    t = ctx.target
    inputs, outputs = _io_table(ctx.path(Files.FP32))
    task = ctx.model.task
    files = []
    for a in ctx.artifacts:
        m = a.metrics
        fid = f"cosine {m['cosine']:.4f}" if "cosine" in m else ""
        if "top1_agreement" in m:
            fid += f", top-1 agreement {m['top1_agreement']:.3f}"
        files.append(f"| `{a.path}` | {a.precision} | {ctx.path(a.path).stat().st_size / 1e6:.1f} MB | {fid} |")
        if "ort" in a.formats:
            check = ort_checks.get(a.name, {})
            same = f"as `{a.path}` (max abs diff {check['max_abs_diff']:.2g})" if check else f"as `{a.path}`"
            files.append(f"| `{a.formats['ort']}` | {a.precision} | {ctx.path(a.formats['ort']).stat().st_size / 1e6:.1f} MB | {same} |")
    in_rows = "\n".join(f"| `{i['name']}` | {i['dtype']} | {i['shape_text']} |" for i in inputs)
    out_rows = "\n".join(f"| `{o['name']}` | {o['dtype']} | {o['shape_text']} |" for o in outputs)
    main_model = next((a for a in ctx.artifacts if a.name != "fp32"), ctx.artifacts[0])
    ort_file = main_model.formats.get("ort", Path(main_model.path).name)
    eps = [e for e in t.execution_providers if e != "CPUExecutionProvider"]
    kotlin_ep = "\n".join(f"    {_KOTLIN_EP[e]}" for e in eps if e in _KOTLIN_EP) or "    // CPU execution provider"
    swift_ep = "\n".join(f"{_SWIFT_EP[e]}" for e in eps if e in _SWIFT_EP) or "// CPU execution provider"
    names = [i["name"] for i in inputs]
    out_name = outputs[0]["name"]
    post = ("mean of the output over tokens whose attention_mask is 1 (sentence embedding)"
            if task == "feature-extraction" else "argmax of the logits (class id; see config.json id2label)")
    kotlin_inputs = "\n".join(
        f'        "{n}" to OnnxTensor.createTensor(env, LongBuffer.wrap({_kotlin_var(n)}), shape),' for n in names)
    swift_inputs = "\n".join(
        f'    "{n}": try ORTValue(tensorData: NSMutableData(data: toData({_swift_var(n)})), elementType: .int64, shape: shape),'
        for n in names)
    text = f"""# {ctx.model_name} for `{t.name}`

{t.description}. Built by edgeq; every number below is in `manifest.json` with the settings that produced it.

## Files

| file | precision | size | fidelity vs fp32 (held-out text) |
|---|---|---|---|
{chr(10).join(files)}
| `{REDUCED_OPS}` | | | operators for an ONNX Runtime minimal build |
| `tokenizer/` | | | tokenizer files (preprocessing) |

`.ort` files are for ONNX Runtime Mobile (`onnxruntime-android`, `onnxruntime-c` / `onnxruntime-objc` pods);
each was loaded back and checked against its `.onnx` on the same inputs. Execution providers, in order:
{', '.join(t.execution_providers)}.

## Inputs and outputs

| input | dtype | shape |
|---|---|---|
{in_rows}

| output | dtype | shape |
|---|---|---|
{out_rows}

## Preprocessing and postprocessing

Tokenize with the files in `tokenizer/` (a Hugging Face `tokenizer.json`: e.g. the `tokenizers` library, or
swift-transformers on iOS), lower case as configured there, truncate to {ctx.config.max_length} tokens,
and feed `int64` tensors of shape [1, sequence]. Postprocessing: {post}.

## Android (Kotlin)

```kotlin
import ai.onnxruntime.*
import java.nio.LongBuffer

val env = OrtEnvironment.getEnvironment()
val options = OrtSession.SessionOptions().apply {{
{kotlin_ep}
}}
val session = env.createSession(assets.open("{ort_file}").readBytes(), options)
// {', '.join(_kotlin_var(n) for n in names)}: LongArray of token data from the tokenizer
val shape = longArrayOf(1, inputIds.size.toLong())
val inputs = mapOf(
{kotlin_inputs}
)
session.run(inputs).use {{ result ->
    val output = result.get("{out_name}").get().value  // {outputs[0]['dtype']} {outputs[0]['shape_text']}
}}
```

## iOS (Swift)

```swift
import onnxruntime_objc

let env = try ORTEnv(loggingLevel: .warning)
let options = try ORTSessionOptions()
{swift_ep}
let path = Bundle.main.path(forResource: "{Path(ort_file).stem}", ofType: "ort")!
let session = try ORTSession(env: env, modelPath: path, sessionOptions: options)
// {', '.join(_swift_var(n) for n in names)}: [Int64] token data from the tokenizer
let shape: [NSNumber] = [1, NSNumber(value: inputIds.count)]
func toData(_ a: [Int64]) -> Data {{ a.withUnsafeBufferPointer {{ Data(buffer: $0) }} }}
let outputs = try session.run(withInputs: [
{swift_inputs}
], outputNames: ["{out_name}"], runOptions: nil)
let output = try outputs["{out_name}"]!.tensorData()  // {outputs[0]['dtype']} {outputs[0]['shape_text']}
```
"""
    ctx.path(ARTIFACT_README).write_text(text)
    return ARTIFACT_README


def _kotlin_var(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


_swift_var = _kotlin_var
