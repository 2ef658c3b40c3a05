"""The GitHub Actions workflow uses only the project's own commands, and they are valid."""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "edgeq.yml"


def _run_steps():
    doc = yaml.safe_load(WORKFLOW.read_text())
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    return steps, [s["run"] for s in steps if "run" in s]


def test_workflow_runs_only_the_projects_commands():
    steps, runs = _run_steps()
    assert runs, "no run steps"
    for cmd in runs:
        argv = shlex.split(cmd.split(">")[0])
        assert argv[0] in ("./setup.sh", ".venv/bin/edgeq"), cmd
    # everything else is GitHub's own checkout/python/upload actions
    assert {s["uses"].split("@")[0] for s in steps if "uses" in s} == {
        "actions/checkout", "actions/setup-python", "actions/upload-artifact"}
    order = [shlex.split(c)[1] if c.startswith(".venv") else "setup" for c in runs]
    assert order == ["setup", "build", "report", "publish", "verify"]
    assert (ROOT / "setup.sh").is_file()


def test_workflow_edgeq_commands_parse_and_the_config_resolves(tmp_path, monkeypatch):
    from edgeq.config import resolve_config
    from edgeq.cli import cli
    from edgeq.config import read_config_file

    _, runs = _run_steps()
    for cmd in runs:
        if not cmd.startswith(".venv/bin/edgeq"):
            continue
        argv = shlex.split(cmd.split(">")[0])[1:]
        sub = cli.get_command(click.Context(cli), argv[0])
        assert sub is not None, cmd
        ctx = sub.make_context(argv[0], argv[1:])  # raises on an unknown option or a missing argument
        assert ctx.params
    # the committed edgeq.toml: gates for the default model, resolvable here
    cfg_cmd = cli.get_command(click.Context(cli), "build")
    options = read_config_file(str(ROOT / "edgeq.toml"), cfg_cmd)
    assert options["min_speedup"] > 1 and options["max_accuracy_drop"] and options["max_size_mb"]
    options["out"] = str(tmp_path)
    options["eval_path"] = options.pop("eval_path", None)
    config = resolve_config(**options)
    assert config.name == "all-MiniLM-L6-v2" and config.gates.min_speedup == options["min_speedup"]
