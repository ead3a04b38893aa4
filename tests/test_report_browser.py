"""The report in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

Every <img> loads (naturalWidth > 0), every table's CSV link resolves, and the page logs no console
error, uncaught exception or failed resource. One screenshot per section (scrolled to its <h2>) is kept
in ``$TRAJLAB_ARTIFACTS/report_browser`` (default: a pytest tmp directory; the path is printed).

The browser is driven through ``--remote-debugging-pipe`` (JSON messages, NUL-terminated, on fds 3/4):
no websocket client and no extra Python dependency. Skipped when /usr/bin/chromium is absent.

The report: ``render_report`` of ``$TRAJLAB_REPORT_RESULTS`` (an existing results directory) when set,
else a reduced tiny demo (random tiny pipelines, no Jacobian / covariance stage).
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
def report(tmp_path_factory):
    """(report directory, its http base URL)."""
    out = tmp_path_factory.mktemp("browser_report")
    results = os.environ.get("TRAJLAB_REPORT_RESULTS")
    if results:
        from trajlab.report import render_report

        render_report(results, out / "report")
    else:
        from trajlab.experiments.demo import run_demo

        run_demo(out, quick=True, tiny=True, teacher_steps=4, n_prompts=2, n_seeds=2, progress=False,
                 mechanistic=False)
    root = out / "report"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
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


def test_report_in_chromium(report, artifacts, tmp_path):
    from trajlab.report import SECTIONS

    root, url = report
    t0 = time.monotonic()
    b = Browser(tmp_path / "chromium-profile")
    try:
        version = b.send("Browser.getVersion")["product"]
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=s)
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
        nav = b.send("Page.navigate", {"url": url + "index.html"}, session=s)
        assert not nav.get("errorText"), nav
        b.wait_event("Page.loadEventFired", timeout=60)
        imgs = json.loads(b.send("Runtime.evaluate", {"expression": _IMAGES, "awaitPromise": True,
                                                      "returnByValue": True}, session=s, timeout=60)["result"]["value"])
        title = b.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                       session=s)["result"]["value"]
        heads = b.send("Runtime.evaluate", {"expression": "Array.from(document.querySelectorAll('h2'))"
                                            ".map(h => h.textContent)", "returnByValue": True},
                       session=s)["result"]["value"]
        csvs = b.send("Runtime.evaluate", {"expression": "Array.from(document.querySelectorAll('a[href$=\".csv\"]'))"
                                           ".map(a => a.getAttribute('href'))", "returnByValue": True},
                      session=s)["result"]["value"]
        shots = []
        for i, h in enumerate(heads):
            b.send("Runtime.evaluate", {"expression": f"document.querySelectorAll('h2')[{i}].scrollIntoView()"},
                   session=s)
            png = b.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
            p = artifacts / f"{i:02d}_{h.replace(' ', '-').replace('/', '-')}.png"
            p.write_bytes(base64.b64decode(png))
            shots.append(p)
        problems = _problems(b.events)
    finally:
        b.close()
    print(f"{version}: {len(imgs)} images, {len(csvs)} CSV links, {len(shots)} section screenshots in {artifacts} "
          f"({time.monotonic() - t0:.1f} s)")
    assert title.startswith("trajlab report")
    assert heads == list(SECTIONS)
    assert imgs, "no <img> on the page"
    bad = [i for i in imgs if not (i[1] and i[2] > 0)]
    assert not bad, f"images that did not load: {bad}"
    assert {Path(i[0]).name for i in imgs} == {p.name for p in root.glob("*.png")}
    assert not problems, problems
    assert csvs and len(csvs) == len(set(csvs))
    for c in csvs:  # each table's CSV is served beside the page, with a header and one line per row
        with urllib.request.urlopen(url + c, timeout=10) as resp:
            assert resp.status == 200 and len(resp.read().decode().splitlines()) >= 2, c
    assert len(shots) == len(SECTIONS) and all(p.stat().st_size > 1000 for p in shots)
