"""Command line: thin wrappers over edgeq.build. User errors are one line on stderr and exit 2."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys

import click

from edgeq.config import build_options
from edgeq.core import EdgeqError, Interrupted, json_text

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(package_name="edgeq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Turn trained models into small, fast, measured ONNX artifacts for edge devices."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


EXIT_GATE_FAILED = 3  # the build worked, its artifacts miss a gate (also `edgeq parity`'s failed check)

def _resolved_config(ctx: click.Context, options: dict):
    """The options (edgeq.toml's values under those given on the command line) resolved and checked."""
    from click.core import ParameterSource

    from edgeq import config

    config_file = options.pop("config_file")
    chosen = dict(options)
    if config_file:
        for name, value in config.read_config_file(config_file, ctx.command).items():
            if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
                chosen[name] = value
    chosen["input_shape"] = _shape(chosen["input_shape"])
    chosen["eval_path"] = chosen.pop("eval_path")
    return config.resolve_config(**chosen)


@cli.command()
@build_options
@click.option("--fresh", is_flag=True, help="Start over: ignore an interrupted build's finished stages.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (logs go to stderr).")
@click.pass_context
def build(ctx, fresh, as_json, **options) -> None:
    """Export, optimize, calibrate, quantize, evaluate, benchmark and package MODEL.

    MODEL is a Hugging Face model directory, an .onnx file, a causal LM's .gguf file, or
    package.module:factory (a function returning a PyTorch image model, e.g.
    edgeq.zoo:efficientnet_lite0); without it, the embedded default model (all-MiniLM-L6-v2) is built.

    Exit status: 0 built; 2 a user error (nothing complete written); 3 built, but no artifact meets
    the gates (--max-accuracy-drop, --min-speedup, --max-size-mb; the manifest says which and by how
    much); 130 interrupted (the finished stages are kept and the same build resumes from them).
    """
    from edgeq.build import build as run_build
    from edgeq.gates import gate_failure_text
    from edgeq.summary import json_summary, summary_table

    config = _resolved_config(ctx, options)
    if as_json:
        with stdout_to_stderr() as real_stdout:
            manifest = run_build(config, fresh=fresh)
            click.echo(summary_table(manifest), err=True)
        real_stdout.write(json_text(json_summary(manifest), indent=2) + "\n")
        real_stdout.flush()
    else:
        manifest = run_build(config, fresh=fresh)
        click.echo(summary_table(manifest))
        click.echo(f"manifest: {manifest['build_dir']}/manifest.json")
    gates = manifest.get("gates")
    if gates and not gates["passed"]:
        click.echo(f"edgeq: {gate_failure_text(gates)}", err=True)
        sys.exit(EXIT_GATE_FAILED)


@cli.command("config")
@build_options
@click.option("--from-build", "from_build", help="Start from the options a finished build used (its manifest).")
@click.option("--write", "-w", "write_to", help="Write the TOML to this file (default: print it).")
@click.pass_context
def config_cmd(ctx, from_build, write_to, **options) -> None:
    """Resolve the build options (checking the model, data and target as `edgeq build` does, building
    nothing) and print them as an edgeq.toml that `edgeq build --config` replays.

    Every option is written with its effective value (the target's defaults filled in); paths are
    relative to the file's folder when inside it.
    """
    from pathlib import Path

    from edgeq.config import options_from_build, to_toml
    from edgeq.core import atomic_write_text

    if from_build:
        if options["config_file"]:
            raise EdgeqError("give --config or --from-build, not both")
        options["config_file"] = options_from_build(Path(from_build))
    config = _resolved_config(ctx, options)
    base = Path(write_to).expanduser().resolve().parent if write_to else Path.cwd()
    text = to_toml(config.options, base)
    if write_to:
        atomic_write_text(Path(write_to), text)
        click.echo(f"wrote {write_to}", err=True)
    else:
        click.echo(text, nl=False)


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
    from edgeq.commands.remote import SshTarget, bench as run_bench, table

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
        click.echo(json_text({"build_dir": str(build_dir.resolve()),
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
    from edgeq.commands.parity import EXIT_PARITY_FAILED, run_parity, table

    log = (lambda m: click.echo(m, err=True)) if sys.stderr.isatty() else (lambda m: None)
    record = run_parity(artifact_dir, target, cache_dir=cache_dir, install_deps=install_deps, log=log)
    click.echo(table(record), err=as_json)
    if as_json:
        click.echo(json_text(record, indent=2))
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

    from edgeq.commands.inspect import inspect_build, render

    report = inspect_build(Path(artifact_dir), artifact)
    if as_json:
        click.echo(json_text(report, indent=2))
        return
    if all_nodes:
        for a in report["artifacts"].values():
            a["weighted_nodes"] = a["nodes"]
    click.echo(render(report))


@cli.command()
@click.argument("build_dir")
@click.option("--to", "to", required=True,
              help="A folder (the bundle becomes DIR/<model>-<target>-<version>/) or a .tar.gz/.tgz/.tar file.")
@click.option("--version", "version", help="Bundle version (default: 12 hex digits of the stable manifest's sha256).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def publish(build_dir, to, version, as_json) -> None:
    """Publish BUILD_DIR (a finished build) as a versioned, reproducible bundle: the artifacts,
    tokenizer and packaging files, the stable manifest, a README and SHA256SUMS."""
    from pathlib import Path

    from edgeq.commands.publish import publish as run_publish

    result = run_publish(Path(build_dir), Path(to), version)
    if as_json:
        click.echo(json_text(result, indent=2))
    else:
        click.echo(f"{result['bundle']}: {result['files']} files, sha256 {result['sha256']} ({result['sha256_of']})")


@cli.command()
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify(bundle, as_json) -> None:
    """Check a published bundle (folder or tarball) against its SHA256SUMS, reading nothing outside
    it. Exit 0: intact; 3: a file is missing, changed or unaccounted for; 2: not a readable bundle."""
    from pathlib import Path

    from edgeq.commands.publish import EXIT_VERIFY_FAILED, verify as run_verify

    result = run_verify(Path(bundle))
    if as_json:
        click.echo(json_text(result, indent=2))
    elif result["ok"]:
        click.echo(f"{bundle}: {result['files']} files, all match {'SHA256SUMS'}")
    if not result["ok"]:
        click.echo(f"edgeq: verify failed: {result['problems'][0]}"
                   + (f" (and {len(result['problems']) - 1} more)" if len(result["problems"]) > 1 else ""), err=True)
        sys.exit(EXIT_VERIFY_FAILED)


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", "-o", "out_dir", help="Where to write report.html, report.md and the plots "
                                             "(default: the first PATH).")
def report(paths, out_dir) -> None:
    """Write report.html (self-contained) and report.md with plots for one or more builds: PATHS are
    build directories, or a model's folder holding a build per target."""
    from pathlib import Path

    from edgeq.commands.report import write_report

    result = write_report([Path(p) for p in paths], Path(out_dir) if out_dir else None)
    click.echo(f"wrote {result['html']} and {result['markdown']}")


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
@click.option("--artifact", "-a", help="Which model of the build (default: int4 (the first int4-<algo> of several), else nf4, else int8-dynamic, else fp32).")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (instruct models).")
@click.option("--threads", type=int, default=0, help="Intra-op threads (0: all cores).")
def generate(artifact_dir, prompt, artifact, max_new_tokens, chat, threads) -> None:
    """Generate text from PROMPT with a causal LM build (greedy, with the key/value cache).

    The text streams to stdout; prefill time and decode speed go to stderr.
    """
    from pathlib import Path

    from edgeq.commands.generate import generate_text

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
    except OSError as e:
        # the file system refusing a path the user gave (too long, no permission, disk full...)
        if e.filename is not None and e.errno in _USER_OS_ERRORS:
            click.echo(f"edgeq: error: {_one_line(f'{e.filename}: {e.strerror}')}", err=True)
            sys.exit(EXIT_USER_ERROR)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk, whichever write hit it (no file name)
            click.echo(f"edgeq: error: {_one_line(e.strerror or 'no space left on device')} "
                       "(free some space, or build with --out on another disk)", err=True)
            sys.exit(EXIT_USER_ERROR)
        _internal(e)
    except Exception as e:  # a bug, not the user's doing: one line, traceback on request
        _internal(e)


_USER_OS_ERRORS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR, errno.EISDIR,
                   errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def _internal(e: Exception) -> None:
    if os.environ.get("EDGEQ_DEBUG"):
        raise e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    click.echo(f"edgeq: internal error: {type(e).__name__}: {_one_line(msg, 300)} "
               "(set EDGEQ_DEBUG=1 for a traceback)", err=True)
    sys.exit(EXIT_INTERNAL_ERROR)
