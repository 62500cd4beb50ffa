"""Classroom mode and the kernel-free figures in a real browser (headless Debian Chromium driven by Playwright).

``test_chapter1_in_voila``: starts Voila the way ``make app APP_POOL=0 APP_LESSON_POOL=6`` does for a lesson on
chapter 1 (the app/ folder, the offline template, 127.0.0.1, a preheated kernel pool of ``POOL_SIZE`` per other
notebook and ``LESSON_POOL`` for chapter 1, used kernels replaced after ``FILL_DELAY_S``; here a free port, a token
and an empty run cache of its own), waits until the pool kernels have run their notebooks and gone quiet (their
default runs are then in the run cache: a server that has been up for a minute), then opens app/chapter1.ipynb in
``N_VISITORS`` pages *at once* and measures each visitor's time from opening the page to its first trained dashboard
(status "… 400/400 … — done", cached or not; issue target ``FIRST_DONE_TARGET_S``; the page records the moment itself,
``PAGE_PROBE_JS``, so that measuring adds no work to the burst). Each page must get its own kernel and reach "done"
without a stall: a status line unchanged for ``STALL_S`` seconds before "done", or Voila logging that it buffers a
kernel's messages (its websocket dropped) while every visitor is connected, fails the test (no reload). Then the
second visitor leaves, and while Voila waits to cull that page's kernel the test moves the experts slider of the first
page with the keyboard (E 8 → 7, a run nobody has cached: it trains live) and checks that the status line acknowledges
at once, that the run trains to the end and redraws the geometry, and counts the bytes the kernel's websocket carried
to the page per redraw (counted in the page; per status-line update, which moves with every redraw); the other
visitors' dashboards are untouched. Voila keeps the closed page's kernel until its culler finds it idle and
unconnected (here after 20 s; `make app`: 10 min): the test waits for that, while the connected first visitor keeps
theirs. Stops Voila.

``N_VISITORS`` (``MOEWIDGETS_VOILA_VISITORS``, default 6: the issue's classroom burst, six visitors opening
chapter 1 at once) is served from a chapter-1 pool of the same size, as a lesson would configure it. On the 2-core
machine the six reached "done" in 7.6–12.4 s, 6.3–9.9 s and 7.3–11.3 s in the runs of 2026-12-08 (10–23 s on
2026-12-07, before the page recorded its own time and the kernels serialised their documents ahead). Most of that
time is the six Chromium pages themselves, which here share the server's two cores: sampled during a burst,
Chromium's processes used ≈ 75 % of the CPU, the six kernels ≈ 17 % and Voila ≈ 8 % (in a classroom every visitor's
browser runs on their own machine). It failed once on a machine overloaded by two claim runs beside the six kernels
(3 pages never drew their widgets in 240 s; not reproduced since): the test reports that as a failure, it is not
hidden. A runner with less than 6 GB free can set ``MOEWIDGETS_VOILA_VISITORS=3``. Why a pool: with a
pool of 1 the five other visitors each wait for a kernel to start and import torch, all at once (measured on the
loaded 2-core machine: 57 s each, against 14–20 s from the pool). It costs ≈ 0.45 GB per kernel (6 kernels: the
used ones are replaced ``FILL_DELAY_S`` after use, when the test is over) and 80–100 s, 27–51 s of it the pool's
warm-up. The timings are only as good as the machine is idle: the
JSON gives the core count and the load average before the visitors came.


Writes build/browser/voila.png, voila.json and voila.log. Fails (never skips) without
/usr/bin/chromium.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from servers import (CHROMIUM, LAUNCH_ARGS, OUT, ROOT, free_port, repo_env, stop_server, wait_until_answers,
                     watch)

pytestmark = pytest.mark.browser

APP = ROOT / "app"
STATUS = ".moewidgets-status"
RUN_TIMEOUT_MS = 240_000     # kernel start + imports + a whole run, all visitors at once on a loaded 2-core machine
STALL_S = 90                 # a status line unchanged this long before "done" is a page that stopped receiving
N_VISITORS = int(os.environ.get("MOEWIDGETS_VOILA_VISITORS", "6"))   # visitors opening chapter 1 at once (docstring)
POOL_SIZE = 0                # preheated kernels per other notebook: `make app APP_POOL=0` (a lesson on chapter 1;
                             # idle pool kernels of other chapters change nothing in the burst, only the warm-up)
LESSON_POOL = N_VISITORS     # preheated chapter-1 kernels: `make app APP_LESSON=chapter1 APP_LESSON_POOL=6`
FILL_DELAY_S = 60            # a used pool kernel is replaced this long after (as `make app`: after the burst)
FIRST_DONE_TARGET_S = 15.0   # issue target: each visitor's first trained dashboard within this many seconds
WARM_TIMEOUT_S = 300         # the pool kernels' notebooks (and their first runs) at Voila's start
CULL_IDLE_S = 20             # `make app` culls after 600 s; short here so that the test sees a left page's kernel go


def start_voila(port: int, token: str, log_path: Path, run_cache: Path) -> subprocess.Popen:
    """Voila on 127.0.0.1 serving app/ with the offline template, a preheated kernel pool and kernel culling (as
    `make app`), started directly (its PID is the process we stop); the kernels share the run cache ``run_cache``."""
    cmd = [str(Path(sys.prefix) / "bin" / "voila"), str(APP), "--no-browser", "--Voila.ip=127.0.0.1",
           f"--port={port}", "--Voila.port_retries=0", f"--Voila.token={token}", "--template=offline",
           '--VoilaConfiguration.extension_denylist=["jupyterlab-myst", "jupyterlab-jupytext"]',
           "--VoilaConfiguration.preheat_kernel=True", f"--VoilaConfiguration.default_pool_size={POOL_SIZE}",
           "--VoilaKernelManager.kernel_pools_config=" + json.dumps(
               {"default": {"pool_size": POOL_SIZE}, "chapter1.ipynb": {"pool_size": LESSON_POOL}}),
           f"--VoilaKernelManager.fill_delay={FILL_DELAY_S}",
           f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE_S}", "--MappingKernelManager.cull_interval=5"]
    env = repo_env(JUPYTER_PATH=os.pathsep.join(filter(None, [str(APP / ".jupyter-path"),
                                                              os.environ.get("JUPYTER_PATH")])),
                   MOEWIDGETS_RUN_CACHE=str(run_cache))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_for_voila(proc: subprocess.Popen, port: int, token: str, timeout_s: float = 120) -> None:
    wait_until_answers(proc, f"http://127.0.0.1:{port}/?token={token}", "Voila", timeout_s)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def assert_token_required(url: str) -> None:
    """Without the token a page is never rendered (no kernel starts): Voila answers with a redirect to its login."""
    try:
        urllib.request.build_opener(_NoRedirect).open(url, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code in (302, 401, 403), exc.code
        assert exc.code != 302 or "login" in exc.headers.get("Location", ""), exc.headers.get("Location")
        return
    raise AssertionError(f"{url} answered without the token")


# Installed in every page before its scripts run (``add_init_script``), so that the test measures without adding
# work to the burst it measures: the page itself counts what its kernel websockets (``…/channels``) receive (text
# frames in characters, binary frames in bytes) and records the wall-clock time (epoch ms) at which its status line
# first says that the run named by NEEDLE is done. (Playwright's own websocket events would copy every frame, 1.9 MB
# per page, from each page through the driver to Python, and polling six pages' status lines four times a second
# costs a round trip each; both ran on the two cores the visitors share.)
PAGE_PROBE_JS = """(() => {
  const NEEDLE = %s;
  const probe = window.__moe = {wsBytes: 0, wsFrames: 0, doneAt: null};
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      if (String(url).includes('/channels')) this.addEventListener('message', (e) => {
        const d = e.data;
        probe.wsBytes += typeof d === 'string' ? d.length : (d.byteLength ?? d.size ?? 0);
        probe.wsFrames += 1;
      });
    }
  };
  new MutationObserver(() => {
    if (probe.doneAt !== null) return;
    const el = document.querySelector('.moewidgets-status');
    const t = el ? el.textContent : '';
    if (t.includes(NEEDLE) && t.includes('400/400') && t.includes('— done')) probe.doneAt = Date.now();
  }).observe(document, {subtree: true, childList: true, characterData: true});
})();"""


def install_page_probe(page, needle: str) -> None:
    """Count the page's kernel-websocket bytes and time its first "… {needle} … 400/400 … — done" (PAGE_PROBE_JS)."""
    page.add_init_script(PAGE_PROBE_JS % json.dumps(needle))


def while_navigating(page, js: str, arg=None, default=None):
    """``page.evaluate(js, arg)``, or ``default`` while the page is between documents (Playwright's "Execution context
    was destroyed" during a navigation); any other error is raised."""
    try:
        return page.evaluate(js, arg)
    except Exception as exc:
        if "context" in str(exc) or "navigat" in str(exc):
            return default
        raise


def page_probe(page) -> dict:
    """The page's counters (``wsBytes``, ``wsFrames``, ``doneAt``: epoch ms or None) and its status line (``text``);
    zeros and "" while it navigates."""
    empty = {"wsBytes": 0, "wsFrames": 0, "doneAt": None, "text": ""}
    return while_navigating(page, f"""empty => ({{...empty, ...(window.__moe || {{}}),
                                                 text: document.querySelector('{STATUS}')?.textContent || ''}})""",
                            empty, empty)


def children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def kernel_rss_mb(pid: int) -> list[float]:
    """Resident memory of each child process of ``pid`` (Voila's kernels), from /proc (Linux; [] elsewhere)."""
    try:
        return [round(int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{c}/status").read_text()).group(1)) / 1024, 1)
                for c in children(pid)]
    except (OSError, AttributeError):
        return []


def kernels_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by the child processes of ``pid``."""
    total = 0.0
    for c in children(pid):
        try:
            fields = Path(f"/proc/{c}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_warm(voila_pid: int, log_path: Path) -> float:
    """Wait until every notebook's kernel pool is filled and the pool kernels are quiet (under 10 % of a core for
    3 s: their notebooks ran and their first runs ended); returns the seconds waited."""
    t0 = time.monotonic()
    n_notebooks = len(list(APP.glob("*.ipynb"))) if POOL_SIZE > 0 else 1     # pools to fill: chapter 1's only
    while time.monotonic() - t0 < WARM_TIMEOUT_S:
        filled = len(set(re.findall(r"Kernel pool of (\S+) is filled", log_path.read_text(errors="replace"))))
        cpu0 = kernels_cpu_s(voila_pid)
        time.sleep(3)
        if filled >= n_notebooks and kernels_cpu_s(voila_pid) - cpu0 < 0.3:
            return round(time.monotonic() - t0, 1)
    raise AssertionError(f"the kernel pools never went quiet within {WARM_TIMEOUT_S} s")


def kernel_id(page) -> str:
    return page.evaluate("JSON.parse(document.getElementById('jupyter-config-data').textContent).kernelId")


def status_text(page) -> str:
    """The page's status line ("" while there is none, or while the page is still navigating)."""
    return while_navigating(page, f"() => document.querySelector('{STATUS}')?.textContent || ''", default="")


def open_at_once(pages: list, url: str) -> None:
    """Start every page's navigation to ``url`` without waiting for any (``page.goto`` would wait for each
    response to start, and a preheated page's response starts only once its kernel has run the notebook)."""
    for page in pages:
        while_navigating(page, "url => { window.location.href = url; }", url)   # it may already have begun


def is_done(text: str, needle: str) -> bool:
    return needle in text and "400/400" in text and "— done" in text


def wait_done(page, needle: str) -> None:
    page.wait_for_function(
        f"""() => {{ const t = document.querySelector('{STATUS}')?.textContent || '';
                    return t.includes('{needle}') && t.includes('400/400') && t.includes('— done'); }}""",
        timeout=RUN_TIMEOUT_MS)


def all_to_done(pages: list, t0_epoch: float) -> list[float]:
    """Wait until every page's probe (PAGE_PROBE_JS) saw its run done; returns each page's seconds from ``t0_epoch``
    (``time.time()`` when the pages were opened) to "done", as the page's own clock recorded it. Polls once a second.

    Fails on a stall: a status line unchanged for ``STALL_S`` s before "done" (the page stopped receiving: on this
    2-core machine, under six simultaneous first runs, a visitor's status line once froze at step 332/400 while its
    kernel went on, and Voila logged that it was buffering messages for a reconnect the page never made)."""
    done: list[float | None] = [None] * len(pages)
    last = [("", time.monotonic())] * len(pages)
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while None in done:
        assert time.monotonic() < deadline, f"not done within {RUN_TIMEOUT_MS / 1000:.0f} s: " \
                                            f"{[status_text(p) for p in pages]}"
        for i, page in enumerate(pages):
            if done[i] is not None:
                continue
            probe = page_probe(page)
            if probe["doneAt"] is not None:
                done[i] = round(probe["doneAt"] / 1000 - t0_epoch, 1)
                continue
            text = probe["text"]
            if text != last[i][0]:
                last[i] = (text, time.monotonic())
            elif text and time.monotonic() - last[i][1] > STALL_S:
                raise AssertionError(f"visitor {i}'s status line stalled for {STALL_S} s: {text!r}")
        time.sleep(1.0)
    return done


# Installed before the keypress: when the keydown happened, when the status line first acknowledged E=7, and how
# many different status texts of the new run the page showed (one per redraw).
OBSERVE_JS = """([selector, needle]) => {
  const target = document.querySelector(selector).parentElement;
  const lat = window.__moeLatency = {keydown: null, ack: null, ackText: null, updates: 0, last: ''};
  document.addEventListener('keydown', () => { if (lat.keydown === null) lat.keydown = performance.now(); }, true);
  new MutationObserver(() => {
    const el = target.querySelector('.moewidgets-status');
    const text = el ? el.textContent : '';
    if (lat.ack === null && lat.keydown !== null && text.includes(needle)) {
      lat.ack = performance.now(); lat.ackText = text; }
    if (lat.keydown !== null && text.includes(needle) && /step \\d+\\/400/.test(text) && text !== lat.last) {
      lat.updates += 1; lat.last = text; }
  }).observe(target, {subtree: true, childList: true, characterData: true});
}"""


def drive(ctx, base: str, token: str, log_path: Path, voila_pid: int) -> dict:
    errors: list[str] = []
    outside: list[str] = []
    url = f"{base}/voila/render/chapter1.ipynb?token={token}"
    pages = []
    for _ in range(N_VISITORS):
        page = ctx.new_page()
        watch(page, errors, outside)
        install_page_probe(page, "of 8")
        pages.append(page)
    t0_epoch = time.time()
    open_at_once(pages, url)
    first_done_s = all_to_done(pages, t0_epoch)
    first_statuses = [status_text(p) for p in pages]
    assert all(is_done(t, "of 8") for t in first_statuses), first_statuses
    first_ws_kb = [round(page_probe(p)["wsBytes"] / 1e3, 1) for p in pages]
    kernels = [kernel_id(p) for p in pages]
    assert len(set(kernels)) == N_VISITORS, kernels                   # a kernel per visitor
    rss = kernel_rss_mb(voila_pid)
    log = log_path.read_text(errors="replace")
    assert all(f"Kernel started: {k}" in log for k in kernels), log[-2000:]
    preheated = sum(f"Using pre-heated kernel: {k}" in log for k in kernels)

    buffering = re.findall(r".*Starting buffering.*", log_path.read_text(errors="replace"))
    assert not buffering, buffering       # a websocket dropped while every visitor was connected

    # A visitor leaves (now, so that the culler's idle wait overlaps the live run below): Voila keeps the kernel
    # (for a reconnect) until the culler finds it idle and unconnected.
    a, b = pages[0], pages[1]
    b.close()
    t_closed = time.monotonic()

    slider = a.locator(".widget-slider", has=a.locator(".widget-label", has_text="experts E")).first
    slider.locator(".noUi-handle").first.focus()
    a.evaluate(OBSERVE_JS, [STATUS, "of 7"])
    bytes_before = page_probe(a)["wsBytes"]
    a.keyboard.press("ArrowLeft")
    a.wait_for_function("() => window.__moeLatency.ack !== null", timeout=60_000)
    wait_done(a, "of 7")
    lat = a.evaluate("window.__moeLatency")
    run_bytes = page_probe(a)["wsBytes"] - bytes_before
    assert "retraining with top-2 of 7" in lat["ackText"], lat["ackText"]
    final = status_text(a)
    loss0, loss1 = map(float, re.search(r"loss (\S+) → (\S+)", final).groups())
    assert loss1 < loss0, final
    a.get_by_text(re.compile(r"Geometry of top-2 of 7 \(E=7\) at step 400/400")).first.wait_for(timeout=60_000)
    others = [status_text(p) for p in pages[2:]]
    assert all("of 8" in t and "— done" in t for t in others), others   # the other visitors' kernels untouched
    a.wait_for_timeout(500)
    a.screenshot(path=str(OUT / "voila.png"), full_page=True)
    buffering = [line for line in re.findall(r".*Starting buffering.*", log_path.read_text(errors="replace"))
                 if kernels[1] not in line]
    assert not buffering, buffering       # a websocket dropped (other than the page that left)

    shut = f"Kernel shutdown: {kernels[1]}"
    while shut not in log_path.read_text(errors="replace") and time.monotonic() < t_closed + CULL_IDLE_S + 60:
        time.sleep(0.5)
    culled_after_s = round(time.monotonic() - t_closed, 1)
    assert shut in log_path.read_text(errors="replace"), "the closed page's kernel was never culled"
    assert f"Kernel shutdown: {kernels[0]}" not in log_path.read_text(errors="replace")   # connected: kept
    for page in pages:
        if not page.is_closed():
            page.close()
    assert not errors, errors
    assert not outside, outside
    return {"visitors": N_VISITORS, "pool_size": POOL_SIZE, "chapter1_pool_size": LESSON_POOL,
            "fill_delay_s": FILL_DELAY_S, "visitors_on_preheated_kernels": preheated,
            "first_done_s": first_done_s, "first_done_median_s": statistics.median(first_done_s),
            "first_done_max_s": max(first_done_s), "first_done_target_s": FIRST_DONE_TARGET_S,
            "first_done_target_met": max(first_done_s) <= FIRST_DONE_TARGET_S,
            "first_runs_cached": sum("(cached)" in t for t in first_statuses),
            "ws_kb_to_first_done": first_ws_kb,
            "e_move_ws_kb": round(run_bytes / 1e3, 1), "e_move_status_updates": lat["updates"],
            "e_move_ws_kb_per_redraw": round(run_bytes / 1e3 / max(lat["updates"], 1), 1),
            "kernels": kernels, "kernel_rss_mb": rss, "closed_page_kernel_culled_after_s": culled_after_s,
            "keypress_to_status_ms": round(lat["ack"] - lat["keydown"], 1), "final_status": final,
            "other_visitors": others, "first_statuses": first_statuses,
            "console_errors": errors, "requests_leaving_127.0.0.1": outside}


def test_chapter1_in_voila():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (the test needs it)"
    assert shutil.which("voila", path=str(Path(sys.prefix) / "bin")), "voila is not installed: pip install voila"
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    t_start = time.monotonic()
    log_path = OUT / "voila.log"
    run_cache = Path(tempfile.mkdtemp(prefix="moewidgets-runs-"))
    voila = start_voila(port, token, log_path, run_cache)
    profile = tempfile.mkdtemp(prefix="moewidgets-chromium-")
    try:
        wait_for_voila(voila, port, token)
        assert_token_required(f"http://127.0.0.1:{port}/voila/render/chapter1.ipynb")
        warm_s = wait_warm(voila.pid, log_path)
        load_before = os.getloadavg()[0]
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=LAUNCH_ARGS, viewport={"width": 1400, "height": 1600})
            try:
                result = drive(ctx, f"http://127.0.0.1:{port}", token, log_path, voila.pid)
            except BaseException:
                for i, page in enumerate(ctx.pages):
                    page.screenshot(path=str(OUT / f"voila-failure-{i}.png"))
                raise
            finally:
                ctx.close()
        result["pool_warm_s"] = warm_s
        result["run_cache_entries"] = len(list(run_cache.glob("*.json")))
        result["cpu_count"] = os.cpu_count()
        result["load_average_1min_before_visitors"] = round(load_before, 2)
        result["test_wall_s"] = round(time.monotonic() - t_start, 1)
        (OUT / "voila.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        print(json.dumps(result, indent=1, ensure_ascii=False))
    finally:
        stop_server(voila, profile, run_cache)
