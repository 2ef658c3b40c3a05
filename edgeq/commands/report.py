"""`edgeq report`: one self-contained HTML page (report.html) and a Markdown summary (report.md, its
plots as .svg files in report-plots/) for one or more finished builds.

Three plots: accuracy against latency for every artifact of every target, with the Pareto front
across all of them; the hybrid search's sensitivity ranking and accuracy/speed curve (when a hybrid
stage ran); and latency distributions per artifact and execution provider (box plots from the
quantiles the benchmark records; min/p50/p90/p99 for manifests written before it did).

The plots are hand-written SVG on purpose: matplotlib is not a dependency of edgeq, and a report must
open anywhere without anything installed -- no JavaScript library, no external URL. The page carries a
few lines of inline JavaScript only to record what the browser drew (`data-rendered` on <body>), which
the tests read from a headless browser.

Every string from a manifest goes through `_esc` (html.escape): a node or artifact name is data, never
markup. Every number goes through `_num`: missing, non-numeric or non-finite values are left out.
"""
from __future__ import annotations

import html
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.core import EdgeqError, Files, atomic_write_text, load_manifest

PLOTS_DIR = "report-plots"
HTML_NAME = "report.html"
MD_NAME = "report.md"
TOP_SENSITIVE = 20
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#999999"]
SVG_NS = "http://www.w3.org/2000/svg"  # only in the standalone .svg files; inline SVG in HTML needs none
LOWER_IS_BETTER = {"perplexity"}  # task metrics; all others (accuracy, spearman) are higher-is-better


# --- small helpers -------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite number, or None (absent, null, text, bool, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "build"


def _ascii(text: str) -> str:
    """Non-ASCII characters as numeric character references (valid in HTML, SVG and Markdown), so
    the files are the same bytes whatever the locale's encoding."""
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _metrics(artifact: dict) -> dict[str, Any]:
    m = artifact.get("metrics")
    return m if isinstance(m, dict) else {}


def _md(value: Any) -> str:
    """Markdown text (table cells too): no markup (escaped as HTML), no column break, no emphasis or
    link syntax. (An underscore inside a word is no emphasis in CommonMark: x86_64 stays as it is.)"""
    text = _esc(str(value).replace("\n", " "))
    return re.sub(r"([\\|*`\[\]]|(?<!\w)_|_(?!\w))", r"\\\1", text)


# --- the builds ----------------------------------------------------------------------------------

@dataclass
class Build:
    """One build directory: its manifest, the label its series carries, a file-name-safe slug."""

    path: Path
    manifest: dict[str, Any]
    label: str = ""
    slug: str = ""
    color: str = PALETTE[0]

    @property
    def target(self) -> str:
        return str((self.manifest.get("target") or {}).get("name") or "?")

    @property
    def model(self) -> str:
        return str((self.manifest.get("model") or {}).get("name") or "?")

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return [a for a in self.manifest.get("artifacts") or [] if isinstance(a, dict)]

    def stage(self, name: str) -> dict[str, Any]:
        return next((s for s in self.manifest.get("stages") or [] if isinstance(s, dict) and s.get("stage") == name),
                    {})

    @property
    def hybrid(self) -> dict[str, Any]:
        return ((self.stage("precision").get("metrics") or {}).get("hybrid")) or {}


def find_builds(paths: list[Path]) -> list[Build]:
    """Each path is a build directory (has manifest.json) or a model directory whose visible
    subfolders are builds (one per target)."""
    dirs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise EdgeqError(f"not found: {p}")
        if (p / Files.MANIFEST).is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(d for d in p.iterdir()
                           if d.is_dir() and not d.name.startswith(".") and (d / Files.MANIFEST).is_file())
        else:
            found = []
        if not found:
            raise EdgeqError(f"no edgeq build in {p} (no {Files.MANIFEST} in it or in its subfolders)")
        dirs += [d for d in found if d.resolve() not in {x.resolve() for x in dirs}]
    builds = [Build(d, load_manifest(d)) for d in dirs]
    # series labels: the target, or model/target when the builds are of several models; unique
    several_models = len({b.model for b in builds}) > 1
    seen: dict[str, int] = {}
    for i, b in enumerate(builds):
        label = f"{b.model}/{b.target}" if several_models else b.target
        seen[label] = seen.get(label, 0) + 1
        b.label = label if seen[label] == 1 else f"{label} ({seen[label]})"
        b.slug = _slug(b.label)
        if any(o.slug == b.slug for o in builds[:i]):  # "a/b" and "a-b": one file name
            b.slug += f"-{i + 1}"
        b.color = PALETTE[i % len(PALETTE)]
    return builds


# --- accuracy vs latency: which metrics, and the Pareto front -------------------------------------

@dataclass
class Metric:
    key: str
    label: str
    higher_is_better: bool
    get: Callable[[dict], float | None]


def _task_value(m: dict) -> float | None:
    task = m.get("task")
    return _num(task.get("value")) if isinstance(task, dict) else None


def choose_metrics(builds: list[Build]) -> tuple[Metric, Metric]:
    """(x, y) of the accuracy plot. x: decode tokens/s when every measured artifact is a causal LM,
    else latency p50. y: the task metric when every artifact has the same one, else cosine vs fp32."""
    metrics = [_metrics(a) for b in builds for a in b.artifacts]
    timed = [m for m in metrics if _num(m.get("latency_p50_ms")) is not None
             or _num(m.get("decode_tokens_per_s")) is not None]
    if timed and all(_num(m.get("decode_tokens_per_s")) is not None for m in timed):
        x = Metric("decode_tokens_per_s", "decode speed (tokens/s, higher is better)", True,
                   lambda m: _num(m.get("decode_tokens_per_s")))
    else:
        x = Metric("latency_p50_ms", "latency p50 (ms, lower is better)", False,
                   lambda m: _num(m.get("latency_p50_ms")))
    names = {(m.get("task") or {}).get("metric") if isinstance(m.get("task"), dict) else None for m in metrics}
    if metrics and len(names) == 1 and None not in names and all(_task_value(m) is not None for m in metrics):
        name = str(names.pop())
        higher = name not in LOWER_IS_BETTER
        y = Metric(f"task.{name}", f"{name} ({'higher' if higher else 'lower'} is better)", higher, _task_value)
    else:
        y = Metric("cosine", "cosine vs fp32 (higher is better)", True, lambda m: _num(m.get("cosine")))
    return x, y


@dataclass
class Point:
    build: Build
    artifact: str
    x: float
    y: float
    pareto: bool = False


def pareto_front(points: list[Point], x_higher: bool, y_higher: bool) -> list[Point]:
    """The points no other point dominates (at least as good on both axes, better on one). Equal
    points do not dominate each other: both stay on the front."""
    def at_least(a: float, b: float, higher: bool) -> bool:
        return a >= b if higher else a <= b

    front = []
    for p in points:
        if not any(at_least(q.x, p.x, x_higher) and at_least(q.y, p.y, y_higher)
                   and (q.x != p.x or q.y != p.y) for q in points):
            front.append(p)
    return front


# --- SVG -----------------------------------------------------------------------------------------

def _attrs(attrs: dict[str, Any]) -> str:
    """Python keyword names to SVG attributes: class_ -> class, data_plot -> data-plot."""
    out = []
    for k, v in attrs.items():
        if v is None:
            continue
        name = k.rstrip("_").replace("_", "-") if k not in ("viewBox",) else k
        out.append(f'{name}="{_esc(f"{v:.2f}".rstrip("0").rstrip(".") if isinstance(v, float) else v)}"')
    return " ".join(out)


class Svg:
    """One plot, assembled as text. Data marks carry class "mark" (counted by tests and by the page's
    render check); everything else (axes, labels, legend) does not."""

    def __init__(self, kind: str, width: int, height: int, title: str, target: str | None = None):
        self.kind, self.width, self.height, self.title, self.target = kind, width, height, title, target
        self.parts: list[str] = []
        self.marks = 0

    def add(self, tag: str, text: str | None = None, **attrs: Any) -> None:
        a = _attrs(attrs)
        self.parts.append(f"<{tag} {a}>{_esc(text)}</{tag}>" if text is not None else f"<{tag} {a}/>")

    def mark(self, tag: str, tooltip: str, **attrs: Any) -> None:
        attrs["class_"] = ("mark " + attrs.get("class_", "")).strip()
        self.parts.append(f"<{tag} {_attrs(attrs)}><title>{_esc(tooltip)}</title></{tag}>")
        self.marks += 1

    def render(self, standalone: bool = False) -> str:
        ns = f' xmlns="{SVG_NS}"' if standalone else ""
        head = (f'<svg{ns} class="edgeq-plot" data-plot="{_esc(self.kind)}" data-marks="{self.marks}" '
                f'width="{self.width}" height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
                f'role="img" aria-label="{_esc(self.title)}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
                f'font-size="12">')
        bg = f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#ffffff"/>'
        return head + f"<title>{_esc(self.title)}</title>" + bg + "".join(self.parts) + "</svg>"


def _nice_step(raw: float) -> float:
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


class Scale:
    """A data -> pixel map over the values' range (padded), with round tick values. Linear, or
    logarithmic when `log_above` is given and the positive values span more than that ratio (latencies
    of a GPU and a phone on one axis; equal distances are then equal speedups)."""

    def __init__(self, values: list[float], px0: float, px1: float, pad: float = 0.06,
                 include: tuple[float, ...] = (), ticks: int = 5, integer: bool = False,
                 log_above: float | None = None):
        vals = list(values) + list(include)
        lo, hi = min(vals), max(vals)
        self.log = bool(log_above and lo > 0 and hi / lo > log_above)
        if self.log:
            self.px0, self.px1 = px0, px1
            margin = (math.log10(hi) - math.log10(lo)) * pad
            self.lo, self.hi = math.log10(lo) - margin, math.log10(hi) + margin
            for mantissas in ((1, 2, 5), (1, 2, 3, 5, 7)):  # the second when the first gives too few ticks
                cands = [m * 10.0 ** k for k in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in mantissas]
                self.ticks = [t for t in cands if self.lo <= math.log10(t) <= self.hi]
                if len(self.ticks) >= 4:
                    break
            self.decimals = 0
            return
        if hi - lo < 1e-12:  # one value (or all equal): a small window around it
            half = abs(hi) * 0.01 or 0.5
            lo, hi = lo - half, hi + half
        else:
            margin = (hi - lo) * pad
            lo = lo if lo in include else lo - margin
            hi = hi + margin
        self.lo, self.hi, self.px0, self.px1 = lo, hi, px0, px1
        self.step = max(1.0, _nice_step((hi - lo) / ticks)) if integer else _nice_step((hi - lo) / ticks)
        first = math.ceil(lo / self.step - 1e-9)
        self.ticks = [k * self.step for k in range(first, math.floor(hi / self.step + 1e-9) + 1)]
        # as many decimals as the step needs (0.25 -> 2, 5 -> 0)
        self.decimals = next(d for d in range(8) if abs(self.step * 10 ** d - round(self.step * 10 ** d)) < 1e-6)

    def __call__(self, v: float) -> float:
        v = math.log10(v) if self.log else v
        return self.px0 + (v - self.lo) / (self.hi - self.lo) * (self.px1 - self.px0)

    def label(self, v: float) -> str:
        return f"{v:g}" if self.log else f"{v:.{self.decimals}f}"


def _x_axis(svg: Svg, xs: Scale, top: float, bottom: float, label: str, grid: bool = True) -> None:
    svg.add("line", x1=xs.px0, y1=bottom, x2=xs.px1, y2=bottom, stroke="#333333")
    for t in xs.ticks:
        x = xs(t)
        if grid:
            svg.add("line", x1=x, y1=top, x2=x, y2=bottom, stroke="#e6e6e6")
        svg.add("line", x1=x, y1=bottom, x2=x, y2=bottom + 4, stroke="#333333")
        svg.add("text", xs.label(t), x=x, y=bottom + 16, text_anchor="middle", fill="#333333")
    svg.add("text", label, x=(xs.px0 + xs.px1) / 2, y=bottom + 34, text_anchor="middle", fill="#111111")


def _y_axis(svg: Svg, ys: Scale, left: float, right: float, label: str, side: str = "left",
            grid: bool = True, color: str = "#111111") -> None:
    at = left if side == "left" else right
    sign = -1 if side == "left" else 1
    svg.add("line", x1=at, y1=ys.px0, x2=at, y2=ys.px1, stroke="#333333")
    for t in ys.ticks:
        y = ys(t)
        if grid:
            svg.add("line", x1=left, y1=y, x2=right, y2=y, stroke="#e6e6e6")
        svg.add("line", x1=at, y1=y, x2=at + 4 * sign, y2=y, stroke="#333333")
        svg.add("text", ys.label(t), x=at + 7 * sign, y=y + 4, text_anchor="end" if side == "left" else "start",
                fill="#333333")
    lx = at + sign * (max((len(ys.label(t)) for t in ys.ticks), default=4) * 6.8 + 18)  # clear of the tick labels
    cy = (ys.px0 + ys.px1) / 2
    svg.add("text", label, x=lx, y=cy, text_anchor="middle", fill=color, transform=f"rotate(-90 {lx:.1f} {cy:.1f})")


# --- the plots -----------------------------------------------------------------------------------

def accuracy_plot(points: list[Point], builds: list[Build], x: Metric, y: Metric) -> Svg:
    """Every artifact of every target as a point; the Pareto front as a step line and ringed markers."""
    W, H, left, right, top, bottom = 820, 460, 90, 630, 34, 400
    svg = Svg("accuracy-latency", W, H, f"{y.label.split(' (')[0]} against {x.label.split(' (')[0]}")
    xs = Scale([p.x for p in points], left, right, log_above=4)
    ys = Scale([p.y for p in points], bottom, top)
    _x_axis(svg, xs, top, bottom, x.label + (", log scale" if xs.log else ""))
    _y_axis(svg, ys, left, right, y.label)
    svg.add("text", svg.title, x=left, y=20, fill="#111111", font_weight="bold")

    # the front as a staircase: from the best x to the worst, across then up (or down) to the next
    # point, so the line bounds the region the front's points dominate
    front = sorted((p for p in points if p.pareto), key=lambda p: -p.x if x.higher_is_better else p.x)
    if front:
        path = [f"M{xs(front[0].x):.1f},{ys(front[0].y):.1f}"]
        for p in front[1:]:
            path.append(f"H{xs(p.x):.1f}V{ys(p.y):.1f}")
        svg.add("path", d="".join(path), fill="none", stroke="#444444", stroke_width=1.5,
                stroke_dasharray="5 3", class_="pareto-front")

    # label boxes placed so far, starting with the markers themselves so no label covers a point
    placed = [(xs(p.x) - 6, ys(p.y) - 6, xs(p.x) + 6, ys(p.y) + 6) for p in points]
    for p in sorted(points, key=lambda p: (not p.pareto, p.x)):  # front labels get the best spots
        px, py = xs(p.x), ys(p.y)
        tip = (f"{p.build.label} / {p.artifact}: {x.label.split(' (')[0]} {p.x:.4g}, "
               f"{y.label.split(' (')[0]} {p.y:.4f}" + (" (Pareto front)" if p.pareto else ""))
        svg.mark("circle", tip, cx=px, cy=py, r=6.5 if p.pareto else 4.5, fill=p.build.color,
                 stroke="#111111" if p.pareto else "#ffffff", stroke_width=2.2 if p.pareto else 1,
                 class_="pareto" if p.pareto else "", data_target=p.build.label, data_artifact=p.artifact,
                 data_pareto="1" if p.pareto else "0", data_x=f"{p.x:.6g}", data_y=f"{p.y:.6g}")
        # the label: the first spot around the point that overlaps no other label and stays inside
        w, h = 6.6 * len(p.artifact), 12
        for dx, dy in ((8, -8), (8, 16), (-8 - w, -8), (-8 - w, 16), (8, -22), (8, 30), (-8 - w, -22)):
            box = (px + dx, py + dy - h + 2, px + dx + w, py + dy + 2)
            inside = box[0] >= left and box[2] <= right and box[1] >= top and box[3] <= bottom
            if inside and not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in placed):
                break
        else:
            dx, dy = 8, -8
            box = (px + dx, py + dy - h + 2, px + dx + w, py + dy + 2)
        placed.append(box)
        svg.add("text", p.artifact, x=px + dx, y=py + dy, fill="#222222", font_size=11)

    # legend, right of the plot area: one entry per target, then the front
    ly = top + 8
    for b in builds:
        if any(p.build is b for p in points):
            svg.add("circle", cx=right + 24, cy=ly, r=5, fill=b.color)
            svg.add("text", b.label, x=right + 36, y=ly + 4, fill="#111111")
            ly += 20
    svg.add("line", x1=right + 14, y1=ly, x2=right + 34, y2=ly, stroke="#444444", stroke_width=1.5,
            stroke_dasharray="5 3")
    svg.add("circle", cx=right + 24, cy=ly, r=6, fill="#ffffff", stroke="#111111", stroke_width=2.2)
    svg.add("text", "Pareto front", x=right + 40, y=ly + 4, fill="#111111")
    return svg


def sensitivity_plot(build: Build) -> Svg | None:
    """The hybrid search's ranking: cosine lost when each node alone is quantized, top 20; the nodes
    the chosen step kept in higher precision highlighted."""
    rows = [(str(s.get("node")), str(s.get("op_type") or ""), _num(s.get("cosine_drop")))
            for s in build.hybrid.get("sensitivity") or [] if isinstance(s, dict)]
    rows = sorted((r for r in rows if r[2] is not None), key=lambda r: -r[2])[:TOP_SENSITIVE]
    if not rows:
        return None
    kept = {str(k.get("node")) for k in build.hybrid.get("kept") or [] if isinstance(k, dict)}
    W, left, right, top, row = 820, 330, 760, 52, 20
    bottom = top + row * len(rows)
    svg = Svg("sensitivity", W, bottom + 52, f"{build.label}: sensitivity ranking (top {len(rows)})", build.label)
    svg.add("text", svg.title, x=10, y=20, fill="#111111", font_weight="bold")
    svg.add("rect", x=left, y=28, width=10, height=10, fill="#D55E00")
    svg.add("text", "kept in higher precision by the chosen step", x=left + 16, y=37, fill="#111111")
    xs = Scale([r[2] for r in rows], left, right, include=(0.0,))
    _x_axis(svg, xs, top, bottom, "cosine drop when the node alone is quantized")
    for i, (node, op, drop) in enumerate(rows):
        y = top + i * row
        x0, x1 = sorted((xs(0.0), xs(drop)))
        svg.mark("rect", f"{node} ({op}): cosine drop {drop:.6f}" + (" - kept" if node in kept else ""),
                 x=x0, y=y + 3, width=max(x1 - x0, 1.0), height=row - 6,  # >= 1 px: a zero drop still shows
                 fill="#D55E00" if node in kept else "#0072B2", data_node=node, data_drop=f"{drop:.6g}")
        short = node if len(node) <= 46 else "…" + node[-45:]  # the end of a path names the node
        svg.add("text", short, x=left - 6, y=y + row - 6, text_anchor="end", fill="#222222", font_size=11)
        svg.add("text", f"{drop:.3g}", x=x1 + 4, y=y + row - 6, fill="#555555", font_size=10)
    return svg


def curve_plot(build: Build) -> Svg | None:
    """The hybrid search's steps: nodes kept in higher precision -> cosine (left axis) and speedup vs
    fp32 (right axis); filled markers meet the accuracy budget, the chosen step is marked."""
    steps = [s for s in build.hybrid.get("curve") or [] if isinstance(s, dict)]
    pts = [(_num(s.get("kept_nodes", s.get("step"))), _num(s.get("cosine")), _num(s.get("speedup_vs_fp32")),
            bool(s.get("meets_budget")), s.get("step")) for s in steps]
    pts = [p for p in pts if p[0] is not None and (p[1] is not None or p[2] is not None)]
    if not pts:
        return None
    W, H, left, right, top, bottom = 820, 370, 90, 720, 60, 310
    svg = Svg("hybrid-curve", W, H, f"{build.label}: hybrid search, accuracy and speed per step", build.label)
    svg.add("text", svg.title, x=10, y=20, fill="#111111", font_weight="bold")
    xs = Scale([p[0] for p in pts], left, right, integer=True)
    _x_axis(svg, xs, top, bottom, "nodes kept in higher precision (search step)")
    series = [("cosine", 1, "#0072B2", "cosine vs fp32", "left"), ("speedup", 2, "#D55E00", "speedup vs fp32", "right")]
    lx = left
    for name, idx, color, label, side in series:
        vals = [(p[0], p[idx], p[3], p[4]) for p in pts if p[idx] is not None]
        if not vals:
            continue
        ys = Scale([v[1] for v in vals], bottom, top)
        _y_axis(svg, ys, left, right, label, side=side, grid=side == "left", color=color)
        svg.add("polyline", points=" ".join(f"{xs(v[0]):.1f},{ys(v[1]):.1f}" for v in vals), fill="none",
                stroke=color, stroke_width=1.8)
        for k, v, ok, step in vals:
            svg.mark("circle", f"step {step}: {k:.0f} kept, {label} {v:.4f}" + (" (within budget)" if ok else ""),
                     cx=xs(k), cy=ys(v), r=4.5, fill=color if ok else "#ffffff", stroke=color, stroke_width=2,
                     data_series=name, data_step=str(step))
        svg.add("line", x1=lx, y1=34, x2=lx + 18, y2=34, stroke=color, stroke_width=2)
        svg.add("text", label, x=lx + 24, y=38, fill="#111111")
        lx += 160
    svg.add("text", "filled: within the accuracy budget", x=lx, y=38, fill="#555555")
    chosen = _num(build.hybrid.get("chosen_step"))
    chosen_k = next((p[0] for p in pts if _num(p[4]) == chosen), None) if chosen is not None else None
    if chosen_k is not None:
        x = xs(chosen_k)
        svg.add("line", x1=x, y1=top, x2=x, y2=bottom, stroke="#333333", stroke_dasharray="3 3")
        svg.add("text", "chosen", x=x, y=top - 4, text_anchor="middle", fill="#333333", font_size=11)
    return svg


def _distribution(rec: dict) -> dict[str, Any] | None:
    """Box-plot values of one benchmark record: from the 21 quantiles when recorded, else (older
    manifests) min/p50/p90/p99: whisker min..p99, a dashed box p50..p90."""
    q = rec.get("latency_quantiles_ms")
    if isinstance(q, list) and len(q) == 21:
        v = [_num(x) for x in q]
        if all(x is not None for x in v) and all(a <= b for a, b in itertools.pairwise(v)):
            return {"exact": True, "lo": v[1], "q1": v[5], "med": v[10], "q3": v[15], "hi": v[19],
                    "min": v[0], "max": v[20]}
    p50, p90, p99 = (_num(rec.get(k)) for k in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms"))
    if p50 is None:
        return None
    mn = _num(rec.get("latency_min_ms"))
    lo = mn if mn is not None else p50
    hi = p99 if p99 is not None else (p90 if p90 is not None else p50)
    return {"exact": False, "lo": lo, "q1": p50, "med": p50, "q3": p90 if p90 is not None else p50, "hi": hi,
            "min": lo, "max": hi}


def latency_plot(build: Build) -> tuple[Svg | None, list[str]]:
    """Horizontal box plots, one row per artifact and execution provider; and the records left out."""
    rows, skipped = [], []
    for a in build.artifacts:
        bench = _metrics(a).get("benchmark")
        for ep, rec in (bench.items() if isinstance(bench, dict) else ()):
            if not isinstance(rec, dict):
                continue
            d = _distribution(rec)
            if d is None:
                skipped.append(f"{a.get('name')} on {ep}: {rec.get('error') or 'no latency recorded'}")
            else:
                rows.append((str(a.get("name")), str(ep), d))
    if not rows:
        return None, skipped
    eps = list(dict.fromkeys(r[1] for r in rows))
    colors = {ep: PALETTE[i % len(PALETTE)] for i, ep in enumerate(eps)}
    W, left, right, top, row = 820, 250, 700, 40, 28
    bottom = top + row * len(rows)
    svg = Svg("latency", W, bottom + 76, f"{build.label}: latency per run, by artifact and execution provider",
              build.label)
    svg.add("text", svg.title, x=10, y=20, fill="#111111", font_weight="bold")
    xs = Scale([r[2][k] for r in rows for k in ("min", "max")], left, right)
    _x_axis(svg, xs, top, bottom, "latency per run (ms; prefill for a causal LM)")
    for i, (name, ep, d) in enumerate(rows):
        cy, c = top + i * row + row / 2, colors[ep]
        short_ep = ep.removesuffix("ExecutionProvider") or ep
        svg.add("text", f"{name} · {short_ep}", x=left - 8, y=cy + 4, text_anchor="end", fill="#222222", font_size=11)
        svg.add("line", x1=xs(d["lo"]), y1=cy, x2=xs(d["hi"]), y2=cy, stroke=c, stroke_width=1.5)
        for end in ("lo", "hi"):
            svg.add("line", x1=xs(d[end]), y1=cy - 5, x2=xs(d[end]), y2=cy + 5, stroke=c, stroke_width=1.5)
        if d["exact"]:
            for end in ("min", "max"):  # the extremes as dots beyond the p5/p95 whiskers
                svg.add("circle", cx=xs(d[end]), cy=cy, r=2, fill="#777777")
        x0, x1 = xs(d["q1"]), xs(d["q3"])
        what = ("p5 {lo:.3f} | p25 {q1:.3f} | p50 {med:.3f} | p75 {q3:.3f} | p95 {hi:.3f} ms (min {min:.3f}, "
                "max {max:.3f})" if d["exact"] else "min {lo:.3f} | p50 {med:.3f} | p90 {q3:.3f} | p99 {hi:.3f} ms")
        svg.mark("rect", f"{name} on {ep}: " + what.format(**d), x=x0, y=cy - 8, width=max(x1 - x0, 1.0), height=16,
                 fill=c, fill_opacity=0.25, stroke=c, stroke_width=1.5,
                 stroke_dasharray=None if d["exact"] else "4 2", class_="" if d["exact"] else "approx",
                 data_artifact=name, data_provider=ep, data_p50=f"{d['med']:.6g}")
        svg.add("line", x1=xs(d["med"]), y1=cy - 8, x2=xs(d["med"]), y2=cy + 8, stroke="#111111", stroke_width=2)
        svg.add("text", f"{d['med']:.2f}", x=right + 8, y=cy + 4, fill="#555555", font_size=11)
    ly = bottom + 54
    note = ("box p25-p75, line p50, whiskers p5-p95, dots min/max" if any(r[2]["exact"] for r in rows) else "")
    if not all(r[2]["exact"] for r in rows):
        note += ("; " if note else "") + "dashed: only min/p50/p90/p99 recorded (whisker min-p99, box p50-p90)"
    svg.add("text", note, x=left, y=ly, fill="#555555", font_size=11)
    svg.add("text", "p50 ms", x=right + 8, y=top - 6, fill="#555555", font_size=11)
    return svg, skipped


PROFILE_TOP_OPS = 6


def _op_profile(a: dict) -> dict | None:
    p = _metrics(a).get("op_profile")
    if not isinstance(p, dict) or _num(p.get("run_ms")) is None or not isinstance(p.get("ops"), list):
        return None
    return p


def profile_segments(build: Build) -> tuple[list[str], list[tuple[str, float, list[tuple[str, float]]]]]:
    """The op types shown (the PROFILE_TOP_OPS slowest across the build's artifacts, then "other
    ops" and "between kernels") and, per profiled artifact, its run time and (segment, ms) list."""
    totals: dict[str, float] = {}
    profiles = [(str(a.get("name")), p) for a in build.artifacts if (p := _op_profile(a)) is not None]
    for _, p in profiles:
        for o in p["ops"]:
            ms = _num(o.get("ms")) if isinstance(o, dict) else None
            if ms is not None:
                totals[str(o.get("op"))] = totals.get(str(o.get("op")), 0.0) + ms
    top = [op for op, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:PROFILE_TOP_OPS]]
    segs = top + ["other ops", "between kernels"]
    rows = []
    for name, p in profiles:
        by = {s: 0.0 for s in segs}
        for o in p["ops"]:
            ms = _num(o.get("ms")) if isinstance(o, dict) else None
            if ms is not None:
                by[str(o.get("op")) if str(o.get("op")) in top else "other ops"] += ms
        by["between kernels"] = _num(p.get("other_ms")) or 0.0
        rows.append((name, _num(p["run_ms"]), [(s, by[s]) for s in segs]))
    return segs, rows


def profile_plot(build: Build) -> Svg | None:
    """One stacked bar per artifact: the kernel time of each op type in one run (ONNX Runtime's own
    profiler, on the graph it ran after its fusions), so a user sees where the time goes and what
    quantization changed."""
    segs, rows = profile_segments(build)
    if not rows:
        return None
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(segs)}
    colors["between kernels"] = "#dddddd"
    W, left, right, top, row = 820, 170, 700, 40, 30
    bottom = top + row * len(rows)
    svg = Svg("profile", W, bottom + 60 + 18 * ((len(segs) + 2) // 3),
              f"{build.label}: where one run's time goes, by operator", build.label)
    svg.add("text", svg.title, x=10, y=20, fill="#111111", font_weight="bold")
    xs = Scale([0.0] + [r[1] for r in rows], left, right, pad=0.0)
    _x_axis(svg, xs, top, bottom, "time per run (ms), from ONNX Runtime's profiler")
    for i, (name, run_ms, parts) in enumerate(rows):
        cy = top + i * row + row / 2
        svg.add("text", name, x=left - 8, y=cy + 4, text_anchor="end", fill="#222222", font_size=11)
        x = 0.0
        for seg, ms in parts:
            if ms <= 0:
                continue
            svg.mark("rect", f"{name}: {seg} {ms:.3f} ms ({ms / run_ms:.0%} of {run_ms:.3f} ms)" if run_ms else
                     f"{name}: {seg} {ms:.3f} ms", x=xs(x), y=cy - 10, width=max(xs(x + ms) - xs(x), 0.5), height=20,
                     fill=colors[seg], stroke="#ffffff", stroke_width=0.5, data_artifact=name, data_op=seg,
                     data_ms=f"{ms:.6g}")
            x += ms
        svg.add("text", f"{run_ms:.2f}", x=right + 8, y=cy + 4, fill="#555555", font_size=11)
    for j, seg in enumerate(segs):
        lx, ly = left + (j % 3) * 190, bottom + 48 + 18 * (j // 3)
        svg.add("rect", x=lx, y=ly - 9, width=10, height=10, fill=colors[seg])
        svg.add("text", seg, x=lx + 14, y=ly, fill="#222222", font_size=11)
    svg.add("text", "ms/run", x=right + 8, y=top - 6, fill="#555555", font_size=11)
    return svg


def profile_table(build: Build) -> tuple[list[str], list[list[str]]]:
    segs, rows = profile_segments(build)
    head = ["artifact", "ms/run"] + segs
    return head, [[name, _fmt(run_ms, ".2f")] + [f"{ms:.2f} ({ms / run_ms:.0%})" if run_ms else f"{ms:.2f}"
                                               for _, ms in parts] for name, run_ms, parts in rows]


# --- tables and text -----------------------------------------------------------------------------

def _table(build: Build, front: set[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a target's artifact table (plain text cells, escaped by the writers)."""
    arts = build.artifacts
    tasks = [_metrics(a).get("task") for a in arts]
    task_names = sorted({str(t.get("metric")) for t in tasks if isinstance(t, dict)})
    lm = any(_num(_metrics(a).get("decode_tokens_per_s")) is not None for a in arts)
    ret = any(isinstance(_metrics(a).get("retrieval"), dict) for a in arts)
    head = ["artifact", "precision", "size MB", "cosine"] + [n for n in task_names[:1]] + \
        (["recall@10 vs fp32"] if ret else []) + ["p50 ms"] + (["decode tok/s"] if lm else []) + ["speedup", "Pareto"]
    rows = []
    for a in arts:
        m = _metrics(a)
        size = _num(m.get("size_bytes"))
        row = [str(a.get("name")), str(a.get("precision") or "-"),
               _fmt(size / 1e6 if size is not None else None, ".1f"), _fmt(_num(m.get("cosine")), ".4f")]
        if task_names:
            row.append(_fmt(_task_value(m), ".4f"))
        if ret:
            r = m.get("retrieval") if isinstance(m.get("retrieval"), dict) else {}
            row.append(_fmt(_num(r.get("recall@10_vs_fp32")), ".3f"))
        row.append(_fmt(_num(m.get("latency_p50_ms")), ".2f"))
        if lm:
            row.append(_fmt(_num(m.get("decode_tokens_per_s")), ".1f"))
        row += [_fmt(_num(m.get("speedup_vs_fp32")), ".2f", "x"),
                "yes" if (build.label, str(a.get("name"))) in front else ""]
        rows.append(row)
    return head, rows


def _build_facts(b: Build) -> dict[str, str]:
    v = b.manifest.get("versions") or {}
    bench = b.stage("benchmark")
    return {"target": b.label, "description": str((b.manifest.get("target") or {}).get("description") or ""),
            "created (UTC)": str(b.manifest.get("created_utc") or "-").replace("T", " ")[:16],
            "host CPU": str((b.manifest.get("machine") or {}).get("cpu") or "-"),
            "provider": str((bench.get("settings") or {}).get("primary_provider") or "-"),
            "edgeq": str(v.get("edgeq", "-")), "onnxruntime": str(v.get("onnxruntime", "-")),
            "onnx": str(v.get("onnx", "-")), "python": str(v.get("python", "-"))}


def _notes(b: Build) -> list[str]:
    return [str(n) for n in (b.stage("benchmark").get("metrics") or {}).get("notes") or []]


CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1000px;color:#111;padding:0 12px}
h1{font-size:1.5em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em} th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;text-align:left;white-space:nowrap} td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:.9em} svg.edgeq-plot{display:block;max-width:100%;height:auto;margin:8px 0}
svg.edgeq-plot .mark:hover{opacity:.7}
"""

# Counts what the browser actually drew (plots and marks with a non-empty box), per plot kind, into
# <body data-rendered="{...}">: a headless browser's DOM dump then shows whether the plots rendered.
RENDER_CHECK = """
window.addEventListener("load", function () {
  var out = {plots: 0, marks: 0, kinds: {}};
  document.querySelectorAll("svg.edgeq-plot").forEach(function (svg) {
    var b = svg.getBBox(), kind = svg.getAttribute("data-plot");
    if (b.width > 0 && b.height > 0) out.plots++;
    svg.querySelectorAll(".mark").forEach(function (m) {
      var r = m.getBBox();
      if (r.width > 0 && r.height > 0) { out.marks++; out.kinds[kind] = (out.kinds[kind] || 0) + 1; }
    });
  });
  document.body.setAttribute("data-rendered", JSON.stringify(out));
});
"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(v: str, tag: str = "td") -> str:
        numeric = tag == "td" and re.fullmatch(r"-?[0-9.]+x?|-", v) is not None
        return f"<{tag} class=n>{_esc(v)}</{tag}>" if numeric else f"<{tag}>{_esc(v)}</{tag}>"
    return ("<table><tr>" + "".join(cell(h, "th") for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows) + "</table>")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(_md(v) for v in r) + " |" for r in rows] + [""])


# --- entry point ---------------------------------------------------------------------------------

def write_report(paths: list[Path], out_dir: Path | None = None) -> dict[str, Any]:
    """Write report.html, report.md and report-plots/*.svg for the builds found under `paths` (build
    directories, or model directories holding one build per target) into `out_dir`, by default the
    first path. Returns the written paths, the plots (kind, target, file, marks) and the Pareto front."""
    if not paths:
        raise EdgeqError("no build directory given")
    builds = find_builds([Path(p) for p in paths])
    out = Path(out_dir) if out_dir is not None else Path(paths[0])
    if out.exists() and not out.is_dir():
        raise EdgeqError(f"not a directory: {out}")
    x, y = choose_metrics(builds)

    points = []
    for b in builds:
        for a in b.artifacts:
            m = _metrics(a)
            px, py = x.get(m), y.get(m)
            if px is not None and py is not None:
                points.append(Point(b, str(a.get("name")), px, py))
    for p in pareto_front(points, x.higher_is_better, y.higher_is_better):
        p.pareto = True
    front = {(p.build.label, p.artifact) for p in points if p.pareto}

    models = list(dict.fromkeys(b.model for b in builds))
    title = f"edgeq report: {', '.join(models)}"
    h: list[str] = []  # the HTML body
    md: list[str] = [f"# {_md(title)}", ""]
    plots: list[tuple[Svg, str]] = []  # (plot, file name)

    h.append(f"<h1>{_esc(title)}</h1>")
    h.append(f"<p>targets: {_esc(', '.join(b.label for b in builds))}</p>")
    md += [f"targets: {_md(', '.join(b.label for b in builds))}", ""]
    facts = [_build_facts(b) for b in builds]
    fhead = list(facts[0])
    h.append("<h2>Builds</h2>" + _html_table(fhead, [list(f.values()) for f in facts]))
    md += ["## Builds", ""] + _md_table(fhead, [list(f.values()) for f in facts])

    def heading(level: int, text: str) -> None:
        h.append(f"<h{level}>{_esc(text)}</h{level}>")
        md.extend([f"{'#' * level} {_md(text)}", ""])

    def note(text: str, prefix: str = "") -> None:
        h.append(f"<p class=\"note\">{_esc(prefix + text)}</p>")
        md.extend([_md(prefix + text), ""])

    def plot(svg: Svg, name: str, alt: str) -> None:
        plots.append((svg, name))
        h.append(svg.render())
        md.extend([f"![{alt}]({PLOTS_DIR}/{name})", ""])

    heading(2, "Accuracy against latency")
    if points:
        plot(accuracy_plot(points, builds, x, y), "accuracy-latency.svg", "accuracy against latency")
        on_front = ", ".join(f"{p.artifact} ({p.build.label})" for p in points if p.pareto)
        note(f"One point per artifact and target; the Pareto front (no other artifact is both faster and "
             f"more accurate, across all targets shown): {on_front}.")
    else:
        note(f"No artifact has both {x.label.split(' (')[0]} and {y.label.split(' (')[0]} recorded: nothing to plot.")

    for b in builds:
        heading(2, b.label)
        head, rows = _table(b, front)
        h.append(_html_table(head, rows))
        md += _md_table(head, rows)
        for n in _notes(b):
            note(n, prefix="note: ")

        sens, curve = sensitivity_plot(b), curve_plot(b)
        heading(3, "Hybrid precision search")
        if sens is None and curve is None:
            note("No hybrid precision search in this build, so no sensitivity ranking "
                 "(build with --max-accuracy-drop to measure one).")
        for svg, kind in ((sens, "sensitivity"), (curve, "hybrid-curve")):
            if svg is not None:
                plot(svg, f"{kind}-{b.slug}.svg", f"{kind} {_md(b.label)}")

        lat, skipped = latency_plot(b)
        heading(3, "Latency distributions")
        if lat is None:
            note("No latency measurement in this build.")
        else:
            plot(lat, f"latency-{b.slug}.svg", f"latency {_md(b.label)}")
        for s in skipped:
            note(s, prefix="not measured: ")

        prof = profile_plot(b)
        heading(3, "Where the time goes")
        if prof is None:
            note("No operator profile in this build (its manifest predates them, or the benchmark ran on a device).")
        else:
            plot(prof, f"profile-{b.slug}.svg", f"operator profile {_md(b.label)}")
            phead, prows = profile_table(b)
            h.append(_html_table(phead, prows))
            md += _md_table(phead, prows)

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(h) + f"\n<script>{RENDER_CHECK}</script>\n</body></html>\n")

    plot_dir = out / PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("*.svg"):  # plots of an earlier report that this one does not have
        stale.unlink()
    for svg, name in plots:
        atomic_write_text(plot_dir / name, _ascii(svg.render(standalone=True)) + "\n")
    atomic_write_text(out / HTML_NAME, _ascii(page))
    atomic_write_text(out / MD_NAME, _ascii("\n".join(md).rstrip() + "\n"))
    return {
        "html": str(out / HTML_NAME), "markdown": str(out / MD_NAME),
        "builds": [str(b.path) for b in builds],
        "plots": [{"kind": s.kind, "target": s.target, "path": str(plot_dir / n), "marks": s.marks} for s, n in plots],
        "x_metric": x.key, "y_metric": y.key,
        "pareto": [{"target": p.build.label, "artifact": p.artifact} for p in points if p.pareto],
        "no_hybrid": [b.label for b in builds
                      if not any(s.target == b.label and s.kind in ("sensitivity", "hybrid-curve") for s, _ in plots)],
    }
