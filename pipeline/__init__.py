"""The stages of `edgeq build`, in order. This registry is what the build loops over: a stage is a
module of this package with one entry point, `run(ctx) -> StageResult`, and a rule saying when a
build needs it. A new stage is a module and an entry here; a new mode is a name in
targets.MODES, its artifact in the stage that makes it, and the `needed` rules below that name it.

Stages never import each other: what one hands the next travels on the BuildContext as typed
results (edgeq.core.ModelFacts, CalibrationResult) or as files in the build directory. What only
stages use lives in ops/ (graph operations) and runners/ (scripts run in a fresh process or on a
device). The stage modules are imported when they run, so importing this package is cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    needed: Callable  # (ctx) -> bool: whether this build runs the stage

    def run(self, ctx):
        return importlib.import_module(f"{__name__}.{self.name}").run(ctx)


def _modes(ctx) -> set[str]:
    return set(ctx.config.modes)


def _always(ctx) -> bool:
    return True


STAGES = (
    Stage("export", _always),
    Stage("optimize", _always),
    # activation ranges for static int8 (and the hybrid search), SmoothQuant's statistics otherwise
    Stage("calibrate", lambda ctx: bool({"static", "hybrid"} & _modes(ctx)) or ctx.smoothing.measured),
    Stage("quantize", lambda ctx: bool({"static", "dynamic", "int4"} & _modes(ctx))),
    Stage("precision", lambda ctx: bool({"fp16", "hybrid"} & _modes(ctx))),
    Stage("evaluate", _always),
    Stage("benchmark", _always),
    Stage("package", _always),
)
