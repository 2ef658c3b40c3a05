"""Command line: thin wrappers over edgeq.build. User errors are one line on stderr and exit 2."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import click

from edgeq.core import EdgeqError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(package_name="edgeq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Turn trained models into small, fast, measured ONNX artifacts for edge devices."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command()
@click.argument("model", required=False)
@click.option("--target", "-t", help="Target profile (see `edgeq targets`); default: this machine's CPU.")
@click.option("--mode", "-m", "modes", multiple=True,
              help="static, dynamic (int8), fp16, hybrid, int4 (repeatable; default: the target's modes, "
                   "dynamic and int4 for a causal LM).")
@click.option("--calib", type=str, help="Calibration data: .txt (a sample per line), .jsonl or .npz. Default: bundled set.")
@click.option("--eval", "eval_path", type=str,
              help="Held-out evaluation data (same formats). JSONL with text+label or text1+text2+score adds a "
                   "task metric (accuracy, Spearman). Default: bundled set.")
@click.option("--calib-method", help="minmax, entropy, percentile or distribution (default: the target's).")
@click.option("--calib-samples", type=int, default=256, show_default=True, help="Calibration samples to use.")
@click.option("--eval-samples", type=int,
              help="Evaluation samples to use (default: 120 lines of text, every sample of labelled JSONL).")
@click.option("--percentile", type=float, default=99.999, show_default=True, help="For --calib-method percentile.")
@click.option("--text-field", default="text", show_default=True, help="Text field of JSONL data.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification"]), help="Default: from config.json.")
@click.option("--tokenizer", help="Tokenizer directory, for an .onnx model without one beside it.")
@click.option("--name", help="Model name used for the output folder.")
@click.option("--out", "-o", default="artifacts", show_default=True, help="Output root.")
@click.option("--runs", type=int, help="Timed runs per artifact (default 100; 5 generations for a causal LM).")
@click.option("--threads", type=int, default=0, help="Intra-op threads for benchmarks (0: all cores).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Benchmark sequence length.")
@click.option("--max-length", type=int, default=128, show_default=True,
              help="Tokens per calibration/evaluation sample (longer text is truncated).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Benchmark batch size.")
@click.option("--fp16-io", is_flag=True, help="fp16 artifacts take and return fp16 (default: fp32 I/O).")
@click.option("--max-accuracy-drop", type=float,
              help="Also build int8-hybrid: static int8 with the most sensitive nodes in fp16/fp32 until "
                   "1 - cosine vs fp32 <= this (e.g. 0.01).")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="int4: weights per quantization block (16, 32, 64, 128, 256).")
@click.option("--accuracy-level", type=int, default=4, show_default=True,
              help="int4: MatMulNBits compute type (4: int8 activations, the fast CPU path; 0: as the input).")
@click.option("--new-tokens", type=int, default=32, show_default=True,
              help="Causal LM benchmark: tokens generated after the --seq-len prompt.")
@click.option("--input-shape", help="Image model from a factory: input size as N,C,H,W (default: the factory's "
                                    "edgeq_input_shape).")
@click.option("--preprocess", help="Image preprocessing, e.g. resize=256,crop=224,mean=127,std=128 (default: the "
                                   "factory's edgeq_preprocess, else ImageNet's).")
@click.option("--budget-metric", type=click.Choice(["cosine", "task"]), default="cosine", show_default=True,
              help="What --max-accuracy-drop limits: cosine vs fp32, or the task metric of labelled --eval data "
                   "(accuracy, Spearman), as an absolute drop.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (logs go to stderr).")
def build(model, target, modes, calib, eval_path, calib_method, calib_samples, eval_samples, percentile,
          text_field, task, tokenizer, name, out, runs, threads, seq_len, max_length, batch_size, fp16_io, max_accuracy_drop,
          block_size, accuracy_level, new_tokens, input_shape, preprocess, budget_metric, as_json) -> None:
    """Export, optimize, calibrate, quantize, evaluate, benchmark and package MODEL.

    MODEL is a Hugging Face model directory, an .onnx file, a causal LM's .gguf file, or
    package.module:factory (a function returning a PyTorch image model, e.g.
    edgeq.zoo:efficientnet_lite0); without it, the embedded default model (all-MiniLM-L6-v2) is built.
    """
    from edgeq.build import build as run_build, json_summary, resolve_config, summary_table

    config = resolve_config(model=model, target=target, modes=modes, calib=calib, eval_path=eval_path, out=out,
                            calib_method=calib_method, calib_samples=calib_samples, eval_samples=eval_samples,
                            text_field=text_field, task=task, tokenizer=tokenizer, name=name, runs=runs,
                            threads=threads, seq_len=seq_len, max_length=max_length, batch_size=batch_size, percentile=percentile,
                            fp16_io=fp16_io, max_accuracy_drop=max_accuracy_drop, budget_metric=budget_metric,
                            block_size=block_size, accuracy_level=accuracy_level, new_tokens=new_tokens,
                            input_shape=_shape(input_shape), preprocess=preprocess)
    if as_json:
        with stdout_to_stderr() as real_stdout:
            manifest = run_build(config)
            click.echo(summary_table(manifest), err=True)
        real_stdout.write(json.dumps(json_summary(manifest), indent=2) + "\n")
        real_stdout.flush()
        return
    manifest = run_build(config)
    click.echo(summary_table(manifest))
    click.echo(f"manifest: {manifest['build_dir']}/manifest.json")


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise EdgeqError(f"--input-shape must be integers like 1,3,224,224, got {text!r}") from None


@cli.command("targets")
def list_targets() -> None:
    """List the target profiles."""
    from edgeq import targets

    for n in targets.available():
        t = targets.load(n)
        s = t.static
        pkg = [k for k in ("ort_format", "reduced_ops") if t.package.get(k)]
        click.echo(f"{n:12s} {t.description}\n"
                   f"{'':12s} arch {t.arch}; builds {', '.join(t.modes)}; EPs {', '.join(t.execution_providers)}; "
                   f"fp16 compute: {'yes' if t.fp16_compute else 'no'}\n"
                   f"{'':12s} static int8: {s.format} {s.activation_type}/{s.weight_type}"
                   f"{' per-channel' if s.per_channel else ' per-tensor'}{' reduce-range' if s.reduce_range else ''}"
                   f"{' symmetric' if s.activation_symmetric else ''}, {s.calibration}"
                   + (f"; package: {', '.join(pkg)}" if pkg else ""))


@cli.command("bench")
@click.argument("artifact_dir")
@click.option("--host", required=True, help="The device, as [user@]host (reached with the system ssh).")
@click.option("--port", "-p", type=int, help="ssh port (default: ssh's, usually 22).")
@click.option("--identity", "-i", help="Private key file for ssh (-i).")
@click.option("--known-hosts", help="known_hosts file to use instead of ~/.ssh/known_hosts.")
@click.option("--ssh-option", "ssh_options", multiple=True, help="Extra ssh/scp option Key=Value (-o; repeatable).")
@click.option("--connect-timeout", type=int, default=10, show_default=True, help="Seconds to wait for ssh to connect.")
@click.option("--python", "python", default="python3", show_default=True,
              help="Python on the device (needs numpy and onnxruntime).")
@click.option("--runs", type=int, default=100, show_default=True, help="Timed runs per artifact.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per artifact first.")
@click.option("--threads", type=int, default=0, help="Intra-op threads (0: all cores of the device).")
@click.option("--provider", help="Execution provider (default: the target's first one the device has, else CPU).")
@click.option("--remote-dir", help="Where to make the temporary directory on the device (default: its temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (the table goes to stderr).")
def bench(artifact_dir, host, port, identity, known_hosts, ssh_options, connect_timeout, python, runs, warmup,
          threads, provider, remote_dir, as_json) -> None:
    """Benchmark the artifacts of ARTIFACT_DIR (a finished build) on a device over ssh.

    Copies the models, the benchmark inputs and the standalone runner to a temporary directory on
    the device, measures them there with the device's own python and onnxruntime, removes the
    directory and records the numbers in the manifest under remote_benchmarks["user@host[:port]"].
    """
    from pathlib import Path

    from edgeq.core import load_manifest
    from edgeq.pipeline.remote import SshTarget, bench as run_bench, table

    build_dir = Path(artifact_dir)
    manifest = load_manifest(build_dir)  # a user error before anything touches the network
    ssh = SshTarget(host=host, port=port, identity=Path(identity) if identity else None,
                    known_hosts=Path(known_hosts) if known_hosts else None, connect_timeout=connect_timeout,
                    options=tuple(ssh_options))
    log = (lambda m: click.echo(m, err=True)) if sys.stderr.isatty() else (lambda m: None)
    record, removed_dir = run_bench(build_dir, ssh, python=python, runs=runs, warmup=warmup, threads=threads,
                                    provider=provider, remote_parent=remote_dir, log=log)
    text = table(record, model=f"{manifest['model']['name']} ({manifest['target']['name']})")
    if as_json:
        click.echo(text, err=True)
        click.echo(json.dumps({"build_dir": str(build_dir.resolve()),
                               "manifest": str((build_dir / "manifest.json").resolve()),
                               "remote_dir": removed_dir, **record}, indent=2))
    else:
        click.echo(text)
        click.echo(f"recorded in {build_dir / 'manifest.json'} under remote_benchmarks[{record['host']!r}]")


@cli.command()
@click.argument("artifact_dir")
@click.option("--target", "-t", help="An aarch64 target profile to emulate (default: the build's target).")
@click.option("--cache-dir", help="Where the emulator is set up, once "
                                  "(default: $EDGEQ_CACHE/aarch64, else ~/.cache/edgeq/aarch64).")
@click.option("--install-deps", is_flag=True, help="As root: apt-get install QEMU >= 10 and mmdebstrap if missing.")
@click.option("--json", "as_json", is_flag=True, help="Print the parity record as one JSON object on stdout "
                                                      "(the table goes to stderr).")
def parity(artifact_dir, target, cache_dir, install_deps, as_json) -> None:
    """Run ARTIFACT_DIR's artifacts on an emulated aarch64 CPU (QEMU) and compare with this machine.

    Records the result in the manifest under parity[<target>]. Exit 0: parity holds; 3: it does not
    (a failed check); 2: user error, or emulation cannot be set up (the message says why).
    """
    from edgeq.pipeline.parity import EXIT_PARITY_FAILED, run_parity, table

    log = (lambda m: click.echo(m, err=True)) if sys.stderr.isatty() else (lambda m: None)
    record = run_parity(artifact_dir, target, cache_dir=cache_dir, install_deps=install_deps, log=log)
    click.echo(table(record), err=as_json)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    if record["status"] != "passed":
        sys.exit(EXIT_PARITY_FAILED)


@cli.command("inspect")
@click.argument("artifact_dir")
@click.option("--artifact", "-a", help="Only this artifact (e.g. int8-hybrid).")
@click.option("--all-nodes", is_flag=True, help="List every node, not only those with weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect_cmd(artifact_dir, artifact, all_nodes, as_json) -> None:
    """Per-node precision of each artifact, and the measured sensitivity ranking."""
    from pathlib import Path

    from edgeq.pipeline.precision_map import inspect_build, render

    report = inspect_build(Path(artifact_dir), artifact)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if all_nodes:
        for a in report["artifacts"].values():
            a["weighted_nodes"] = a["nodes"]
    click.echo(render(report))


class Interrupted(BaseException):
    """Raised by the SIGINT/SIGTERM handlers. Not KeyboardInterrupt: click would print a blank line
    for that; a BaseException still unwinds every `finally` (the build removes its staging dir)."""


@contextlib.contextmanager
def stdout_to_stderr():
    """For --json: everything written to file descriptor 1 while the block runs (native libraries,
    subprocesses, not only Python's sys.stdout) goes to stderr; yields a stream on the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield os.fdopen(os.dup(saved), "w")
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _terminate(signum, frame) -> None:
    raise Interrupted


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@cli.command()
@click.argument("artifact_dir")
@click.argument("prompt")
@click.option("--artifact", "-a", help="Which model of the build (default: int4, else int8-dynamic, else fp32).")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (instruct models).")
@click.option("--threads", type=int, default=0, help="Intra-op threads (0: all cores).")
def generate(artifact_dir, prompt, artifact, max_new_tokens, chat, threads) -> None:
    """Generate text from PROMPT with a causal LM build (greedy, with the key/value cache).

    The text streams to stdout; prefill time and decode speed go to stderr.
    """
    from pathlib import Path

    from edgeq.pipeline.causal_lm import generate_text

    if max_new_tokens < 1:
        raise EdgeqError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    stats = generate_text(Path(artifact_dir), prompt, artifact, max_new_tokens, chat, threads,
                          write=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    sys.stdout.write("\n")
    click.echo(f"[{stats['artifact']}: {stats['prompt_tokens']} prompt tokens, prefill {stats['prefill_ms']:.1f} ms; "
               f"{stats['new_tokens']} new tokens at {stats['decode_tokens_per_s']:.1f} tokens/s]", err=True)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so the build removes its staging directory.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        cli.main(standalone_mode=False)
    except (Interrupted, KeyboardInterrupt, click.exceptions.Abort):
        click.echo("edgeq: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        click.echo(f"edgeq: error: {_one_line(e.format_message())}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.ClickException as e:
        click.echo(f"edgeq: error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except EdgeqError as e:
        click.echo(f"edgeq: error: {_one_line(e)}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug, not the user's doing: one line, traceback on request
        if os.environ.get("EDGEQ_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"edgeq: internal error: {type(e).__name__}: {_one_line(msg, 300)} "
                   "(set EDGEQ_DEBUG=1 for a traceback)", err=True)
        sys.exit(EXIT_INTERNAL_ERROR)
