"""`edgeq report`: the HTML page, the Markdown summary and their SVG plots, checked against the
manifests they are drawn from; and the page rendered by headless Chromium when one is installed."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgeq.core import EdgeqError, atomic_write_json, load_manifest
from edgeq.commands.report import write_report

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "embed", "source", "track", "wbr"}


class Page(HTMLParser):
    """A strict reading of the page: every non-void element closed in order; the plots (svg.edgeq-plot)
    with the data marks (class "mark") inside each; the text outside plots and scripts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.plots: list[dict] = []
        self.text: list[str] = []
        self._plot_depth: int | None = None
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed elements: {self.stack}"

    def handle_starttag(self, tag, attrs, closed=False):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "svg" and "edgeq-plot" in a.get("class", "").split():
            assert self._plot_depth is None, "plot inside a plot"
            self.plots.append({"kind": a.get("data-plot"), "attrs": a, "marks": []})
            self._plot_depth = len(self.stack)
        elif self._plot_depth is not None and "mark" in a.get("class", "").split():
            self.plots[-1]["marks"].append(a)
        if not closed and tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs, closed=True)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "svg" and self._plot_depth == len(self.stack):
            self._plot_depth = None

    def handle_data(self, data):
        if self._plot_depth is None and (not self.stack or self.stack[-1] not in ("script", "style")):
            self.text.append(data)

    def kind(self, kind: str) -> list[dict]:
        return [p for p in self.plots if p["kind"] == kind]


def pareto(points: dict[tuple[str, str], tuple[float, float]]) -> set[tuple[str, str]]:
    """Directly from the definition: (latency, cosine) points that no other is at least as fast and as
    accurate as, and strictly better on one."""
    return {k for k, (lat, cos) in points.items()
            if not any(l2 <= lat and c2 >= cos and (l2 < lat or c2 > cos) for l2, c2 in points.values())}


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tiny_build, tmp_path_factory) -> Path:
    """A model folder with two targets: arm64 built with the hybrid search (so a sensitivity ranking
    and a curve), and the session's x86_64 build (no hybrid stage) -- its manifest is all the report
    reads, so a copy of it stands in for the build."""
    from conftest import run_build

    m = run_build(tiny_bert, tmp_path_factory.mktemp("report"), target="arm64", modes=("static", "dynamic"),
                  max_accuracy_drop=1e-9)
    model = Path(m["build_dir"]).parent
    (model / "x86_64").mkdir()
    shutil.copy(Path(tiny_build["build_dir"]) / "manifest.json", model / "x86_64" / "manifest.json")
    (model / ".cache").mkdir(exist_ok=True)  # hidden (the build cache): skipped
    return model


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory) -> dict:
    r = write_report([model_dir], tmp_path_factory.mktemp("report-out"))
    r["page"] = Page(Path(r["html"]).read_text())
    return r


def test_benchmark_records_latency_quantiles(model_dir):
    for target in ("arm64", "x86_64"):
        for a in load_manifest(model_dir / target)["artifacts"]:
            rec = a["metrics"]["benchmark"]["CPUExecutionProvider"]
            q = rec["latency_quantiles_ms"]
            assert len(q) == 21 and q == sorted(q) and all(round(v, 4) == v for v in q)
            assert q[0] == rec["latency_min_ms"] and q[10] == rec["latency_p50_ms"]
            assert rec["latency_p90_ms"] <= q[20]


def test_benchmark_records_an_operator_profile(model_dir):
    for target in ("arm64", "x86_64"):
        arts = {a["name"]: a["metrics"]["op_profile"] for a in load_manifest(model_dir / target)["artifacts"]}
        for name, p in arts.items():
            assert p["runs"] == 20 and p["run_ms"] > 0
            kernels = sum(o["ms"] for o in p["ops"])
            assert kernels == pytest.approx(p["kernel_ms"], rel=1e-3, abs=1e-3) and kernels <= p["run_ms"] * 1.02
            assert [o["ms"] for o in p["ops"]] == sorted((o["ms"] for o in p["ops"]), reverse=True)
            assert all(o["provider"] == "CPUExecutionProvider" for o in p["ops"])
        ops = {name: {o["op"] for o in p["ops"]} for name, p in arts.items()}
        # the kernels ORT ran, after its fusions: float attention in fp32, quantized in int8-dynamic
        assert "Attention" in ops["fp32"] and "QAttention" in ops["int8-dynamic"]
        assert "MatMul" in ops["fp32"] and "MatMul" not in ops["int8-dynamic"]


def test_report_plots_match_the_manifests(model_dir, report):
    page = report["page"]
    manifests = {t: load_manifest(model_dir / t) for t in ("arm64", "x86_64")}
    assert sorted(Path(b).name for b in report["builds"]) == ["arm64", "x86_64"]
    assert [p["kind"] for p in page.plots] == ["accuracy-latency", "sensitivity", "hybrid-curve", "latency", "profile",
                                               "latency", "profile"]
    for p in page.plots:
        assert int(p["attrs"]["data-marks"]) == len(p["marks"]) > 0

    # 1. accuracy vs latency: a point per artifact and target, the front computed from the manifests
    points = {(t, a["name"]): (a["metrics"]["latency_p50_ms"], a["metrics"]["cosine"])
              for t, m in manifests.items() for a in m["artifacts"]}
    (acc,) = page.kind("accuracy-latency")
    assert {(m["data-target"], m["data-artifact"]) for m in acc["marks"]} == set(points) and len(acc["marks"]) == 7
    front = pareto(points)
    assert front and {(m["data-target"], m["data-artifact"]) for m in acc["marks"] if m["data-pareto"] == "1"} == front
    assert {(p["target"], p["artifact"]) for p in report["pareto"]} == front
    assert all(("pareto" in m["class"].split()) == (m["data-pareto"] == "1") for m in acc["marks"])
    assert min(points, key=lambda k: points[k][0]) in front  # the fastest is always on it
    assert ("path", "pareto-front") in {(t, a.get("class")) for t, a in page.tags}
    for m in acc["marks"]:  # the plotted values are the manifest's
        lat, cos = points[(m["data-target"], m["data-artifact"])]
        assert float(m["data-x"]) == pytest.approx(lat, rel=1e-5) and float(m["data-y"]) == pytest.approx(cos, rel=1e-5)

    # 2. the hybrid search: arm64 only; x86_64 says there is none
    hyb = next(s for s in manifests["arm64"]["stages"] if s["stage"] == "precision")["metrics"]["hybrid"]
    (sens,) = page.kind("sensitivity")
    assert [m["data-node"] for m in sens["marks"]] == [s["node"] for s in hyb["sensitivity"]][:20]
    (curve,) = page.kind("hybrid-curve")
    assert len(hyb["curve"]) >= 2
    n = len(hyb["curve"])
    assert sorted(m["data-series"] for m in curve["marks"]) == ["cosine"] * n + ["speedup"] * n
    assert report["no_hybrid"] == ["x86_64"]
    assert "No hybrid precision search in this build" in " ".join(page.text)

    # 3. latency: a box per artifact and execution provider, from the recorded quantiles
    for (lat_plot, target) in zip(page.kind("latency"), ("arm64", "x86_64")):
        expected = {(a["name"], ep) for a in manifests[target]["artifacts"] for ep in a["metrics"]["benchmark"]}
        assert {(m["data-artifact"], m["data-provider"]) for m in lat_plot["marks"]} == expected
        assert not any("approx" in m["class"] for m in lat_plot["marks"])

    # 4. operator profile: a bar segment per artifact and op type, the manifest's milliseconds
    for (prof, target) in zip(page.kind("profile"), ("arm64", "x86_64")):
        arts = {a["name"]: a["metrics"]["op_profile"] for a in manifests[target]["artifacts"]}
        assert {m["data-artifact"] for m in prof["marks"]} == set(arts)
        for name, p in arts.items():
            segs = {m["data-op"]: float(m["data-ms"]) for m in prof["marks"] if m["data-artifact"] == name}
            # the segments add up to the profiled run: kernels per op type plus the time between them
            assert sum(segs.values()) == pytest.approx(max(p["run_ms"], p["kernel_ms"]), rel=1e-3)
            top = p["ops"][0]
            if top["op"] in segs:
                assert segs[top["op"]] == pytest.approx(top["ms"], rel=1e-4)

    # tables: the builds, then per target a row per artifact and the operator profile
    tables = Path(report["html"]).read_text().count("<table>")
    assert tables == 5


def test_report_is_self_contained_and_markdown_links_resolve(report):
    html = Path(report["html"]).read_text()
    assert "http://" not in html and "https://" not in html
    assert not [a for _, attrs in report["page"].tags for a in attrs if a in ("src", "href")]
    assert [t for t, _ in report["page"].tags].count("script") == 1  # the render check, inline
    out = Path(report["html"]).parent
    md = Path(report["markdown"]).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(report["plots"]) == 7
    assert sorted(out / link for link in links) == sorted(Path(p["path"]) for p in report["plots"]) \
        == sorted((out / "report-plots").glob("*.svg"))
    for link, plot in zip(links, report["plots"]):
        root = ET.parse(out / link).getroot()  # well-formed XML, an SVG image on its own
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("data-plot") == plot["kind"]
        marks = [e for e in root.iter() if "mark" in (e.get("class") or "").split()]
        assert len(marks) == plot["marks"] > 0
    assert "| int8-hybrid | int8+fp16 |" in md


def test_report_into_a_build_dir_by_default(model_dir):
    r = write_report([model_dir / "arm64"])
    assert Path(r["html"]) == model_dir / "arm64" / "report.html" and Path(r["markdown"]).is_file()
    page = Page(Path(r["html"]).read_text())
    assert len(page.kind("accuracy-latency")[0]["marks"]) == 4 and len(page.kind("latency")) == 1
    assert r["no_hybrid"] == []


def test_manifest_text_is_escaped_and_bad_numbers_left_out(model_dir, tmp_path):
    evil, attr = "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'
    m = load_manifest(model_dir / "arm64")
    m["model"]["name"] = "tiny & <b>bold</b>"
    next(s for s in m["stages"] if s["stage"] == "precision")["metrics"]["hybrid"]["sensitivity"][0]["node"] = evil
    arts = m["artifacts"]
    arts[1]["name"] = attr
    arts[2]["metrics"]["latency_p50_ms"] = float("nan")  # written as NaN, which json reads back
    arts[3]["metrics"]["cosine"] = None
    for rec in arts[0]["metrics"]["benchmark"].values():  # as written before quantiles were recorded
        del rec["latency_quantiles_ms"]
    build = tmp_path / "evil"
    atomic_write_json(build / "manifest.json", m)

    r = write_report([build], tmp_path / "out")
    html = Path(r["html"]).read_text()
    page = Page(html)
    texts = [html, Path(r["markdown"]).read_text()] + [Path(p["path"]).read_text() for p in r["plots"]]
    for text in texts:
        assert "<script>alert" not in text and "<img" not in text and "<b>" not in text
        assert not re.search(r"\b(nan|inf|infinity)\b", text, re.IGNORECASE)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert [t for t, _ in page.tags].count("script") == 1 and "img" not in [t for t, _ in page.tags]
    assert page.kind("sensitivity")[0]["marks"][0]["data-node"] == evil  # data, read back verbatim
    acc = page.kind("accuracy-latency")[0]["marks"]
    assert sorted(mk["data-artifact"] for mk in acc) == sorted([arts[0]["name"], attr])  # NaN / None: left out
    (lat,) = page.kind("latency")
    approx = [mk["data-artifact"] for mk in lat["marks"] if "approx" in mk["class"].split()]
    assert approx == [arts[0]["name"]] and len(lat["marks"]) == 4  # min/p50/p90/p99 fallback drawn
    assert "tiny &amp; &lt;b&gt;bold&lt;/b&gt;" in html


def test_causal_lm_plots_decode_speed_against_perplexity(model_dir, tmp_path):
    """Both axes' directions flip: more tokens/s and less perplexity are better."""
    m = load_manifest(model_dir / "arm64")
    speed = {"fp32": 40.0, "int8-static": 55.0, "int8-dynamic": 70.0, "int8-hybrid": 50.0}
    ppl = {"fp32": 20.0, "int8-static": 21.0, "int8-dynamic": 20.5, "int8-hybrid": 20.0}
    for a in m["artifacts"]:
        a["metrics"]["decode_tokens_per_s"] = speed[a["name"]]
        a["metrics"]["task"] = {"metric": "perplexity", "value": ppl[a["name"]]}
    atomic_write_json(tmp_path / "lm" / "manifest.json", m)
    r = write_report([tmp_path / "lm"])
    assert (r["x_metric"], r["y_metric"]) == ("decode_tokens_per_s", "task.perplexity")
    # dynamic: fastest; hybrid: as good as fp32 and faster; static: slower and worse than dynamic
    assert {p["artifact"] for p in r["pareto"]} == {"int8-dynamic", "int8-hybrid"}
    assert "<th>perplexity</th>" in Path(r["html"]).read_text()  # the task metric's table column
    assert "| int8-dynamic | int8 | 0.1 | 1.0000 | 20.5000 |" in Path(r["markdown"]).read_text()


def test_user_errors(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    hidden = tmp_path / "hidden" / ".old"
    hidden.mkdir(parents=True)
    shutil.copy(model_dir / "arm64" / "manifest.json", hidden / "manifest.json")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"schema": "something/else"}')
    (tmp_path / "file.txt").write_text("x")
    cases = {"missing": "not found", "empty": "no edgeq build", "hidden": "no edgeq build",
             "corrupt": "invalid JSON", "other": "not an edgeq manifest", "file.txt": "no edgeq build"}
    for name, message in cases.items():
        with pytest.raises(EdgeqError, match=message) as e:
            write_report([tmp_path / name], tmp_path / "out")
        assert "\n" not in str(e.value)
    with pytest.raises(EdgeqError, match="no build directory"):
        write_report([])


# --- rendered by a browser -------------------------------------------------------------------------

def _chromium() -> str | None:
    return os.environ.get("EDGEQ_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
         if p), None)


def _run_browser(cmd: list[str], out: Path, timeout: float = 90) -> str:
    """Chromium's stdout. In its own process group, killed whole on a timeout and afterwards: its
    helper processes (zygote, crash handler) must not outlive the test or hold it up."""
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return out.read_text()


def test_page_renders_in_headless_chromium(report, tmp_path):
    """What the browser drew, from the page's own check (body data-rendered): every plot and every
    mark has a non-empty box. Then a screenshot that is not blank."""
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    url = Path(report["html"]).resolve().as_uri()
    base = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = _run_browser(base + ["--dump-dom", url], tmp_path / "dom.html")
    body = next(a for t, a in Page(dom).tags if t == "body")
    assert "data-rendered" in body, "the page's load handler did not run"
    rendered = json.loads(body["data-rendered"])
    page = report["page"]
    assert rendered["plots"] == len(page.plots) == 7
    expected = {}
    for p in page.plots:
        expected[p["kind"]] = expected.get(p["kind"], 0) + len(p["marks"])
    assert rendered["kinds"] == expected and rendered["marks"] == sum(expected.values())

    from PIL import Image

    shot = tmp_path / "shot.png"
    _run_browser(base + ["--window-size=1100,2400", f"--screenshot={shot}", url], tmp_path / "shot.log")
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, plots and colours, not an empty page
