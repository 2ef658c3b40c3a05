"""The stages of `edgeq build`, in order. This registry is what the build loops over: a stage is a
module of this package with one entry point, `run(ctx) -> StageResult`, and a rule saying when a
build needs it. A new stage is a module and an entry here. A new mode is a name in
targets.MODES, a function making its artifact in the MODES table of the stage that makes it, and
the mode in that stage's `makes` below.

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
    makes: tuple[str, ...] = ()  # the modes whose artifacts this stage makes (its module's MODES table)
    needed_also: Callable | None = None  # (ctx) -> bool: what else makes a build need it

    def needed(self, ctx) -> bool:
        """Whether this build runs the stage: every build runs a stage that makes no artifact of
        its own; one that does runs when a mode it makes is asked for (or `needed_also` says so)."""
        if not self.makes and self.needed_also is None:
            return True
        return bool(set(self.makes) & set(ctx.config.modes)) or bool(self.needed_also and self.needed_also(ctx))

    def run(self, ctx):
        return importlib.import_module(f"{__name__}.{self.name}").run(ctx)


STAGES = (
    Stage("export"),
    Stage("optimize"),  # makes the fp32 artifact, which every build has
    # activation ranges for static int8 and the hybrid search; SmoothQuant's statistics for any
    # smoothed mode (dynamic int8 included)
    Stage("calibrate", needed_also=lambda ctx: bool({"static", "hybrid", "qat"} & set(ctx.config.modes))
          or ctx.smoothing.measured),
    Stage("quantize", makes=("static", "dynamic", "qat", "qdq", "int4", "nf4")),
    Stage("precision", makes=("fp16", "hybrid")),
    Stage("evaluate"),
    Stage("benchmark"),
    Stage("package"),
)
