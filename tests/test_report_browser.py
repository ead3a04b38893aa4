"""The report in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

Every <img> loads (naturalWidth > 0), every table's CSV link resolves, and the page logs no console
error, uncaught exception or failed resource. The answer is the first thing on the page; the verdict table
sorts (each column, both ways) and filters (decision, mode, words); the step slider moves every group's x0
prediction (a 1-step student's one frame stays); every image has a caption naming its groups and none runs past
the page; no heading, caption or table cell is cut; every student has an x0 filmstrip beside the teacher's and a
panel under the slider; image grids are labelled with prompt text and seed; every figure of a statistic draws
its 95% CI. One screenshot per
section (scrolled to its heading) is kept in ``$TRAJLAB_ARTIFACTS/report_browser`` (default: a pytest tmp
directory; the path is printed).

The browser is driven through ``--remote-debugging-pipe`` (JSON messages, NUL-terminated, on fds 3/4):
no websocket client and no extra Python dependency. Skipped when /usr/bin/chromium is absent.

The report: ``render_report`` of ``$TRAJLAB_REPORT_RESULTS`` (an existing results directory) when set,
else the quick tiny demo the report tests share (``conftest.tiny_demo``: random tiny pipelines, every stage).
"""
from __future__ import annotations

import base64
import fcntl
import functools
import json
import os
import select
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe")

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does)")


class Browser:
    """Headless Chromium over the DevTools pipe: ``send`` a command (optionally to a page session) and
    get its result; events are collected in ``events``."""

    def __init__(self, user_data_dir: Path):
        r_in, w_in = os.pipe()    # we write, Chromium reads on fd 3
        r_out, w_out = os.pipe()  # Chromium writes on fd 4, we read

        def fds():  # in the child: move the pipe ends to 3 and 4 (via high numbers: they may collide)
            a, b = fcntl.fcntl(r_in, fcntl.F_DUPFD, 100), fcntl.fcntl(w_out, fcntl.F_DUPFD, 100)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = Path(f"{user_data_dir}.log")  # Chromium's stderr: a file, so a full pipe never blocks it
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                        preexec_fn=fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT)
        os.close(r_in)
        os.close(w_out)
        self.w, self.r = w_in, r_out
        self.buf, self.n, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("no DevTools message from Chromium in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe: {self.log.read_bytes()[-2000:]!r}")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.w, data):]
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.w, self.r):
            os.close(fd)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def report(tmp_path_factory, request):
    """(report directory, its http base URL, its results directory)."""
    results = os.environ.get("TRAJLAB_REPORT_RESULTS")
    if results:
        from trajlab.report import render_report

        out = tmp_path_factory.mktemp("browser_report")
        render_report(results, out / "report")
        results = Path(results)
        root = out / "report"
    else:
        out = request.getfixturevalue("tiny_demo")[0]
        root, results = out / "report", out / "report" / "results"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/", results
    httpd.shutdown()
    httpd.server_close()
    th.join(5)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    base = os.environ.get("TRAJLAB_ARTIFACTS")
    d = Path(base) / "report_browser" if base else tmp_path_factory.mktemp("report_browser")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


_IMAGES = """new Promise(done => {
  const t0 = Date.now();
  const poll = () => {
    const imgs = Array.from(document.images);
    if (imgs.every(i => i.complete) || Date.now() - t0 > 20000)
      done(JSON.stringify(imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])));
    else setTimeout(poll, 100);
  };
  poll();
})"""


def _problems(events) -> list[str]:
    """Console errors / assertions, uncaught exceptions and browser log errors (failed loads) in events."""
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                              for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            out.append(f"network: {p.get('errorText')} ({p.get('type')})")
    return out


def _eval(b, s, expression: str, timeout: float = 30):
    """The value of a JavaScript expression in the page (promises awaited)."""
    r = b.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
               session=s, timeout=timeout)
    if "exceptionDetails" in r:
        raise AssertionError(f"{expression[:80]}...: {r['exceptionDetails']}")
    return r["result"].get("value")


@pytest.fixture(scope="module")
def page(report, artifacts, tmp_path_factory):
    """(browser, page session, report root, url, {what the first load saw}) of the report loaded once at
    1280 x 900; one screenshot per section (scrolled to its heading) is taken on the way."""
    root, url, _ = report
    t0 = time.monotonic()
    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    try:
        seen = {"version": b.send("Browser.getVersion")["product"]}
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=s)
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
        nav = b.send("Page.navigate", {"url": url + "index.html"}, session=s)
        assert not nav.get("errorText"), nav
        b.wait_event("Page.loadEventFired", timeout=60)
        seen["imgs"] = json.loads(_eval(b, s, _IMAGES, timeout=60))
        seen["title"] = _eval(b, s, "document.title")
        seen["heads"] = _eval(b, s, "Array.from(document.querySelectorAll('[data-section]')).map(h => h.dataset.section)")
        seen["csvs"] = _eval(b, s, "Array.from(document.querySelectorAll('a[href$=\".csv\"]'))"
                                   ".map(a => a.getAttribute('href'))")
        seen["height"] = _eval(b, s, "document.documentElement.scrollHeight")
        shots = []
        for i, h in enumerate(seen["heads"]):
            _eval(b, s, f"document.querySelectorAll('[data-section]')[{i}].scrollIntoView()")
            png = b.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
            path = artifacts / f"{i:02d}_{h.replace(' ', '-').replace('/', '-')}.png"
            path.write_bytes(base64.b64decode(png))
            shots.append(path)
        _eval(b, s, "window.scrollTo(0, 0)")
        seen["shots"] = shots
        seen["problems"] = _problems(b.events)
        print(f"{seen['version']}: {len(seen['imgs'])} images, {len(seen['csvs'])} CSV links, {len(shots)} section "
              f"screenshots in {artifacts}; page {seen['height']} px tall ({time.monotonic() - t0:.1f} s)")
        yield b, s, root, url, seen
    finally:
        b.close()


def test_report_in_chromium(page):
    from trajlab.report import SECTIONS

    b, s, root, url, seen = page
    imgs, csvs, shots = seen["imgs"], seen["csvs"], seen["shots"]
    assert seen["title"].startswith("trajlab report")
    assert seen["heads"] == list(SECTIONS)
    assert imgs, "no <img> on the page"
    bad = [i for i in imgs if not (i[1] and i[2] > 0)]
    assert not bad, f"images that did not load: {bad}"
    assert {Path(i[0]).name for i in imgs} == {p.name for p in root.glob("*.png")}
    assert not seen["problems"], seen["problems"]
    assert csvs and len(csvs) == len(set(csvs))
    for c in csvs:  # each table's CSV is served beside the page, with a header and one line per row
        with urllib.request.urlopen(url + c, timeout=10) as resp:
            assert resp.status == 200 and len(resp.read().decode().splitlines()) >= 2, c
    assert len(shots) == len(SECTIONS) and all(p.stat().st_size > 1000 for p in shots)


_FIRST = """(() => {
  const a = document.getElementById('Answer'), r = a.getBoundingClientRect();
  const text = document.body.innerText.trim();
  return {first: document.body.firstElementChild.id, top: r.top, bottom: r.bottom,
          starts: text.startsWith(a.innerText.trim().slice(0, 60)), h1: a.querySelector('h1').textContent,
          counts: a.innerText.includes('comparisons:'), findings: a.querySelectorAll('li').length,
          sentences: Array.from(a.querySelectorAll('li')).map(li => li.textContent)};
})()"""


def test_headline_is_the_first_thing_on_the_page(page):
    """The answer opens the page, in the first screen: per student its supported failures (each one sentence
    with effect, 95% CI and n) and the counts of the other decisions."""
    b, s, root, url, seen = page
    a = _eval(b, s, _FIRST)
    assert a["first"] == "Answer" and a["starts"] and a["top"] < 40 and a["h1"].startswith("Answer"), a
    assert a["counts"], a
    headline = json.loads((root / "tables.json").read_text())["headline"]
    assert a["findings"] == sum(len(st["findings"]) for st in headline["students"])
    for sentence in a["sentences"]:  # effect, CI and n in every sentence
        assert "95% CI" in sentence and "matched pairs" in sentence, sentence
    verdicts = _eval(b, s, "document.getElementById('Verdicts').getBoundingClientRect().top")
    assert a["bottom"] < verdicts


_TABLE = """(() => {
  const t = document.getElementById('verdict-table'), heads = Array.from(t.tHead.rows[0].cells);
  const vis = () => Array.from(t.tBodies[0].rows).filter(r => !r.hidden);
  const key = (r, i) => { const c = r.cells[i], v = c.dataset.sort !== undefined ? c.dataset.sort : c.textContent.trim();
                          const f = parseFloat(v); return v === '' || isNaN(f) ? v.toLowerCase() : f; };
  const ordered = (i, dir) => { const k = vis().map(r => key(r, i));
    for (let j = 1; j < k.length; j++) { const x = k[j - 1], y = k[j];
      if (typeof x !== typeof y) { if (typeof x !== 'number') return false; continue; }
      if (dir * (x < y ? -1 : x > y ? 1 : 0) > 0) return false; }
    return true; };
  const out = {n: vis().length, sorted: []};
  for (const name of ['candidate', 'margin units', 'n', 'decision']) {
    const i = heads.findIndex(h => h.textContent.trim() === name);
    heads[i].click(); const asc = ordered(i, 1) && heads[i].dataset.dir === 'asc';
    heads[i].click(); const desc = ordered(i, -1) && heads[i].dataset.dir === 'desc';
    out.sorted.push([name, asc, desc]);
  }
  const fire = e => e.dispatchEvent(new Event('input'));
  const d = document.getElementById('vd'), q = document.getElementById('vq'), m = document.getElementById('vm');
  d.value = d.options[1].value; fire(d);
  out.decision = [d.value, vis().length, vis().every(r => r.dataset.decision === d.value)];
  d.value = ''; fire(d);
  m.value = m.options[1].value; fire(m);
  out.mode = [m.value, vis().length, vis().every(r => r.dataset.mode === m.value)];
  m.value = ''; fire(m);
  const word = t.tBodies[0].rows[0].cells[0].textContent.trim().split(/[ ,]+/)[0];
  q.value = word + ' ' + t.tBodies[0].rows[0].cells[1].textContent.trim(); fire(q);
  out.words = [q.value, vis().length, vis().every(r => r.textContent.toLowerCase().includes(word.toLowerCase()))];
  out.shown = document.getElementById('vn').textContent;
  q.value = 'no-such-word-anywhere'; fire(q); out.none = vis().length;
  q.value = ''; fire(q); out.back = vis().length;
  return out;
})()"""


def test_verdict_table_sorts_and_filters(page):
    b, s, root, url, seen = page
    t = _eval(b, s, _TABLE)
    n = len(json.loads((root / "tables.json").read_text())["verdicts"])
    assert t["n"] == n and n > 0
    assert all(asc and desc for _, asc, desc in t["sorted"]), t["sorted"]
    dec, k, ok = t["decision"]
    assert ok and 0 < k <= n, t["decision"]
    mode, k, ok = t["mode"]
    assert ok and 0 < k <= n, t["mode"]
    assert t["words"][2] and 0 < t["words"][1] <= n and t["shown"].startswith(f"{t['words'][1]} of {n}"), t
    assert t["none"] == 0 and t["back"] == n


_SLIDER = """(() => {
  const f = document.querySelector('figure.slider'); if (!f) return null;
  const s = f.querySelector('input.step-slider'), imgs = Array.from(f.querySelectorAll('img'));
  const state = () => ({pos: f.querySelector('.slider-pos').textContent, left: imgs.map(i => i.style.marginLeft),
                        sig: Array.from(f.querySelectorAll('.sig')).map(x => x.textContent),
                        frames: imgs.map(i => JSON.parse(i.dataset.sigmas).length)});
  const before = state();
  s.value = s.max; s.dispatchEvent(new Event('input'));
  const after = state();
  const vp = imgs.map(i => { const a = i.parentElement.getBoundingClientRect(), r = i.getBoundingClientRect();
                             return [r.left - a.left - i.parentElement.clientLeft, r.width / a.width]; });
  s.value = 0; s.dispatchEvent(new Event('input'));
  return {before, after, back: state(), max: s.max, vp, n: imgs.length};
})()"""


def test_step_slider_moves(page):
    """Moving the slider to the teacher's last frame shifts every group's x0 strip to its frame nearest in
    sigma (a group with one frame, a 1-step student, keeps it) and updates the sigma shown under it; back at 0,
    everything is as it was."""
    b, s, root, url, seen = page
    t = _eval(b, s, _SLIDER)
    assert t is not None, "no step slider on the page"
    assert int(t["max"]) >= 1 and t["n"] >= 1
    assert t["before"]["pos"] != t["after"]["pos"]
    assert t["after"]["left"][0] != t["before"]["left"][0] and t["after"]["left"][0].startswith("-")
    for left, frames in zip(t["after"]["left"], t["before"]["frames"]):  # every group's last frame is past its first
        assert left.startswith("-") if frames > 1 else left in ("0px", ""), (left, frames)
    assert any(f > 1 for f in t["before"]["frames"][1:])
    assert t["after"]["sig"] != t["before"]["sig"] and t["back"] == t["before"]
    for (x, _), frames in zip(t["vp"], t["before"]["frames"]):  # the strip shifted left inside its window
        assert x < 0 if frames > 1 else x == 0, (x, frames)


_CAPTIONS = """(() => Array.from(document.images).map(img => {
  const f = img.closest('figure'), cap = f ? f.querySelector('figcaption') : null;
  const r = img.getBoundingClientRect();
  return {src: img.getAttribute('src'), caption: cap ? cap.textContent : null,
          groups: f && f.dataset.groups ? JSON.parse(f.dataset.groups) : null, slider: !!img.closest('.slider'),
          right: r.right, width: r.width, natural: img.naturalWidth};
}))()"""


def test_every_image_has_a_caption_naming_its_groups(page):
    """Each image sits in a figure whose caption names every group it shows (by label); grids, filmstrips and
    the slider show the teacher and at least one other group; no figure runs past the page."""
    b, s, root, url, seen = page
    caps = _eval(b, s, _CAPTIONS)
    width = _eval(b, s, "document.documentElement.clientWidth")
    assert caps
    for c in caps:
        assert c["caption"] and c["groups"] is not None, c
        missing = [g for g in c["groups"] if g not in c["caption"]]
        assert not missing, (c["src"], missing)
        assert c["groups"] or "no store group" in c["caption"], c
        if any(k in c["src"] for k in ("_grid", "_filmstrip", "_x0_slider")):
            assert len(c["groups"]) >= 2 and "teacher" in c["caption"], c
        if not c["slider"]:  # a figure is scaled to the page, never cut at its edge
            assert c["right"] <= width + 1, c
    assert _eval(b, s, "document.documentElement.scrollWidth") <= width


_CUT = """(() => {
  const cut = [];
  for (const el of document.querySelectorAll('h1, h2, h3, figcaption, th, td, summary, p, .panel')) {
    const st = getComputedStyle(el);
    if (st.display === 'none') continue;
    const clips = ['hidden', 'clip'].includes(st.overflowX) || st.textOverflow === 'ellipsis';
    const past = !el.closest('.tw') && el.getBoundingClientRect().right > innerWidth + 1;  // .tw: tables scroll
    if ((clips && el.scrollWidth > el.clientWidth + 1) || past)
      cut.push([el.tagName, el.textContent.trim().slice(0, 60), el.scrollWidth, el.clientWidth]);
  }
  return cut;
})()"""


def test_no_heading_caption_or_cell_is_cut(page):
    """No heading, caption, paragraph, table cell or slider label is clipped or runs past the page (the figures'
    own text is checked on the matplotlib side: test_report.py::test_no_figure_text_is_cut)."""
    b, s, root, url, seen = page
    assert _eval(b, s, _CUT) == []


IMAGE_FIGURES = ("_grid.png", "_filmstrip.png", "_attention_maps.png")
"""Figures that show images or maps, not a statistic with an interval."""
NO_CI_YET: tuple = ()
"""Statistic figures known to lack their interval, not checked until they get one (none now)."""

_FIGS = """(() => Array.from(document.querySelectorAll('figure')).map(f => ({
  src: (f.querySelector('img') || {}).getAttribute ? f.querySelector('img').getAttribute('src') : '',
  caption: (f.querySelector('figcaption') || {}).textContent || '',
  groups: f.dataset.groups ? JSON.parse(f.dataset.groups) : [], slider: f.classList.contains('slider')})))()"""


def _students(root, results):
    """Labels of the teacher and of every student group of the report's results."""
    from trajlab.report import load_results
    from trajlab.report.labels import group_info

    g = load_results(results)["groups"]
    info = group_info(g)
    return info[str(g.attrs["teacher"])]["label"], [d["label"] for d in info.values() if d["role"] == "student"]


def test_every_student_has_a_filmstrip_and_a_slider_panel_beside_the_teacher(page, report):
    b, s, root, url, seen = page
    teacher, students = _students(root, report[2])
    assert students
    figs = _eval(b, s, _FIGS)
    strips = [f for f in figs if f["src"].endswith("_filmstrip.png")]
    assert all(teacher in f["groups"] and len(f["groups"]) == 2 for f in strips)
    assert set(students) <= {g for f in strips for g in f["groups"]}
    slider = next(f for f in figs if f["slider"])
    assert teacher == slider["groups"][0] and set(students) <= set(slider["groups"])
    section = (root / "index.html").read_text().split(">x0-prediction filmstrips</h2>")[1].split("<h2")[0]
    assert "No filmstrip" not in section


def test_grids_are_labelled_with_prompt_text_and_seed_and_every_statistic_has_its_ci(page):
    """Each teacher-vs-group image grid says its rows are the prompt texts and its columns the seeds; every figure
    that draws a statistic as points or lines (everything but the images: grids, filmstrips, the slider and the
    attention-map mosaics) says it draws a 95% interval and never 'no CI'."""
    b, s, root, url, seen = page
    figs = _eval(b, s, _FIGS)
    grids = [f for f in figs if f["src"].endswith("_grid.png")]
    assert grids and all("labelled with the prompt text" in f["caption"] and "labelled with the seed" in f["caption"]
                         for f in grids)
    stats = [f for f in figs if not f["slider"] and not f["src"].endswith(IMAGE_FIGURES + NO_CI_YET)]
    assert len(stats) >= 5
    bad = [(f["src"], f["caption"][:120]) for f in stats if "95%" not in f["caption"] or "no CI" in f["caption"]]
    assert not bad, bad
