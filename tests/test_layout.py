"""The floor plan, enforced: no import cycle among edgeq's modules, no stage imports another stage,
graph operations and post-build commands import no stage, and the device-side runners import
nothing from edgeq. Read from the source (every import statement, function-level ones included),
so a lazy import inside a function counts as much as one at the top."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the repository's folders and the import package's names for them (pyproject's package-dir)
FOLDERS = {"edgeq": "edgeq", "pipeline": "edgeq.pipeline", "calib": "edgeq.calib", "targets": "edgeq.targets"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("").parts
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((package, *parts))] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The edgeq modules a file imports (a name imported from a package is the submodule when one
    exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m == "edgeq" or m.startswith("edgeq.")}


GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _stages() -> set[str]:
    from edgeq.pipeline import STAGES

    return {f"edgeq.pipeline.{s.name}" for s in STAGES}


def test_the_stage_registry_names_real_modules_with_a_run():
    import importlib

    stages = _stages()
    assert len(stages) == 8
    for name in stages:
        assert name in MODULES
        assert callable(importlib.import_module(name).run)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_stage_imports_another_stage():
    stages = _stages()
    bad = {m: sorted(GRAPH[m] & stages) for m in stages if GRAPH[m] & stages}
    assert not bad, bad


def test_operations_commands_and_shared_modules_import_no_stage():
    stages = _stages()
    others = [m for m in MODULES if m not in stages and m not in ("edgeq.build", "edgeq.pipeline")]
    bad = {m: sorted(GRAPH[m] & stages) for m in others if GRAPH[m] & stages}
    assert not bad, bad
    ops = [m for m in MODULES if m.startswith("edgeq.pipeline.ops.")]
    assert ops and not any("edgeq.core" in GRAPH[m] and "BuildContext" in MODULES[m].read_text() for m in ops), \
        "graph operations take models and statistics, not a build context"


def test_runners_import_nothing_from_edgeq():
    runners = [p for m, p in MODULES.items() if m.startswith("edgeq.pipeline.runners.")]
    assert {p.name for p in runners} == {"bench_runner.py", "parity_runner.py", "lm_runtime.py", "torch_runtime.py"}
    for p in runners:
        assert not _imports(p), f"{p.name} imports {_imports(p)}: it runs on devices without edgeq"
    # and they load copied into a folder of their own with edgeq unimportable (as on a device)
    import shutil
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for p in runners:
            shutil.copy(p, d)
        code = (f"import sys; sys.modules['edgeq'] = None; sys.path.insert(0, {d!r}); "
                "import bench_runner, parity_runner, lm_runtime, torch_runtime; print(lm_runtime.__file__)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().startswith(d)


def test_each_mode_is_made_by_exactly_one_stage_that_says_so():
    """A mode lives in one stage's MODES table, and the registry's `makes` for that stage names it."""
    import importlib

    from edgeq.pipeline import STAGES
    from edgeq.targets import MODES

    made = {}
    for s in STAGES:
        table = getattr(importlib.import_module(f"edgeq.pipeline.{s.name}"), "MODES", {})
        assert tuple(table) == s.makes, s.name
        for m in table:
            assert m not in made, f"{m} is made by {made[m]} and {s.name}"
            made[m] = s.name
    assert set(made) == set(MODES)
