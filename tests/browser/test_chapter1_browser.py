"""Chapter 1's dashboard in a real browser: JupyterLab + headless Debian Chromium driven by Playwright.

Opens the chapter, runs all cells, waits for the dashboard's first run to finish, then moves two sliders one step
each with the keyboard: k 2 → 3 (what the kernel-side benchmark ``bench/dashboards.py`` times: the dense baseline is
cached, only the MoE retrains) and then E 8 → 7 (a new dense baseline, hidden 7·m, trains beside it). For each move
it checks that the status line acknowledges at once, that the new run trains to its last step with a falling loss,
and that the geometry views redrew for the new config. Measures, in the page (a keydown listener and a
MutationObserver, both installed before the keypress): keypress → status-line acknowledgement (target ≤ 150 ms) and
keypress → the new run's "done" (target ≤ 2 s for the k move on the 2-core machine), plus the kernel-side timings
(run started → first redraw, redraws per second) from the status line's data attributes.

Writes build/browser/chapter1.png (the dashboard) and build/browser/latency.json (``python -m bench.run`` copies it
to bench/results/browser-chapter1.json for the Performance page). Fails (never skips) without /usr/bin/chromium.
``MOEWIDGETS_BROWSER_NOTEBOOK`` (a path relative to the repository root) overrides the notebook.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import CHROMIUM, LAUNCH_ARGS, OUT, ROOT, free_port, repo_env, stop_server, wait_until_answers

pytestmark = pytest.mark.browser

NOTEBOOK = os.environ.get("MOEWIDGETS_BROWSER_NOTEBOOK", "book/chapter1.ipynb")
STATUS = ".jp-OutputArea-output .moewidgets-status"
RUN_TIMEOUT_MS = 180_000     # a whole run on a loaded 2-core machine (≈ 1–3 s when idle)
ACK_TARGET_MS, DONE_TARGET_MS = 150, 2000    # the design's targets for the k move (reported, not asserted: timing)


def hide_news_toast() -> None:
    """JupyterLab's 'fetch news?' toast covers the notebook: switch it off in the environment's settings."""
    settings = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    if not settings.exists():
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"@jupyterlab/apputils-extension:notification":
                                        {"fetchNews": "false", "checkForUpdates": False}}))


def no_autosave_settings() -> str:
    """A fresh JupyterLab user-settings folder with autosave off: the test opens the committed chapter in place, and
    JupyterLab's autosave (every 120 s) would otherwise write the executed notebook, and through jupytext its
    MyST source, back into book/. The user's own settings are not touched."""
    folder = Path(tempfile.mkdtemp(prefix="moewidgets-lab-settings-"))
    plugin = folder / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings"
    plugin.parent.mkdir(parents=True)
    plugin.write_text(json.dumps({"autosave": False}))
    return str(folder)


def start_lab(port: int, token: str, log_path: Path, settings_dir: str) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1, started directly (its PID is the process we stop), rooted at the repository, with
    ``settings_dir`` as its user-settings folder."""
    cmd = [str(Path(sys.prefix) / "bin" / "jupyter"), "lab", "--no-browser", "--ip", "127.0.0.1",
           "--port", str(port), f"--ServerApp.token={token}", f"--ServerApp.root_dir={ROOT}",
           "--ServerApp.port_retries=0", f"--LabApp.user_settings_dir={settings_dir}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    return subprocess.Popen(cmd, cwd=ROOT, env=repo_env(), stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_for_lab(proc: subprocess.Popen, port: int, token: str, timeout_s: float = 90) -> None:
    wait_until_answers(proc, f"http://127.0.0.1:{port}/api/status?token={token}", "JupyterLab", timeout_s)


# Installed in the page before the keypress: the time of the keydown, of the first status-line text that
# acknowledges the new config (it contains ``needle``), of the first that says the new run is done, plus every later
# status text with its time (to measure the redraw rate the user sees).
OBSERVE_JS = """([selector, needle]) => {
  const target = document.querySelector(selector).parentElement;   // the HTML widget's content element
  const lat = window.__moeLatency = {keydown: null, ack: null, ackText: null, done: null, texts: []};
  document.addEventListener('keydown', () => { if (lat.keydown === null) lat.keydown = performance.now(); }, true);
  new MutationObserver(() => {
    const el = target.querySelector('.moewidgets-status');
    const text = el ? el.textContent : '';
    const now = performance.now();
    if (lat.texts.length === 0 || lat.texts[lat.texts.length - 1][1] !== text) lat.texts.push([now, text]);
    if (lat.ack === null && lat.keydown !== null && text.includes(needle)) { lat.ack = now; lat.ackText = text; }
    if (lat.done === null && lat.ack !== null && text.includes(needle) && text.includes('400/400')
        && text.includes('— done')) { lat.done = now; }
  }).observe(target, {subtree: true, childList: true, characterData: true});
}"""


def move(page, label: str, needle: str, caption: str) -> dict:
    """Press ArrowRight/ArrowLeft on the slider labelled ``label`` (see MOVES), wait for the new run to finish and
    for the geometry caption ``caption``; return the page's and the kernel's timings of that move."""
    key = MOVES[label]
    status = page.locator(STATUS).first
    name = page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$"))
    slider = page.locator(".widget-slider", has=name).first
    slider.locator(".noUi-handle").first.focus()
    page.evaluate(OBSERVE_JS, [STATUS, needle])
    page.keyboard.press(key)
    page.wait_for_function("() => window.__moeLatency.ack !== null", timeout=30_000)
    lat = page.evaluate("window.__moeLatency")
    assert f"retraining with {needle}" in lat["ackText"], lat["ackText"]
    page.wait_for_function("() => window.__moeLatency.done !== null", timeout=RUN_TIMEOUT_MS)
    lat = page.evaluate("window.__moeLatency")
    final = status.text_content()
    assert needle in final and "— done" in final, final
    loss0, loss1 = map(float, re.search(r"loss (\S+) → (\S+)", final).groups())
    assert loss1 < loss0, final
    # The geometry views redrew: a bokeh Div inside the BokehModel (Playwright pierces its shadow DOM).
    page.get_by_text(re.compile(re.escape(caption))).first.wait_for(timeout=30_000)
    chunks = [t for t, text in lat["texts"] if re.search(r"step \d+/400", text) and needle in text]
    page_rate = (len(chunks) - 1) / ((chunks[-1] - chunks[0]) / 1e3) if len(chunks) > 1 else None
    return {
        "move": f"{label}: {key}",
        "keypress_to_status_ms": round(lat["ack"] - lat["keydown"], 1),
        "keypress_to_done_ms": round(lat["done"] - lat["keydown"], 1),
        "debounce_to_first_redraw_ms_kernel": float(status.get_attribute("data-first-redraw-ms")),
        "redraws_per_s_kernel": float(status.get_attribute("data-redraws-per-s")),
        "status_updates_per_s_in_page": None if page_rate is None else round(page_rate, 1),
        "status_updates_seen": len(chunks),
        "final_status": final,
    }


MOVES = {"k": "ArrowRight", "experts E": "ArrowLeft"}     # k 2 → 3, then E 8 → 7


def drive(page, base_url: str) -> dict:
    """Open the notebook, run all cells, move k 2 → 3 and then E 8 → 7 with the keyboard, check each new run;
    return the measurements (the k move's at the top level, both under "moves")."""
    page.goto(f"{base_url}/lab/tree/{NOTEBOOK}?reset")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    # Run All before the session has its kernel opens a "Select Kernel" dialog: wait for "Idle" first.
    page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=60_000)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu .lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    page.wait_for_timeout(1000)
    if page.locator(".jp-Dialog .jp-mod-accept").count():   # "Select Kernel" (seen once on a loaded machine)
        page.locator(".jp-Dialog .jp-mod-accept").first.click()

    status = page.locator(STATUS).first
    status.wait_for(timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(f"() => document.querySelector('{STATUS}')?.textContent.includes('— done')",
                           timeout=RUN_TIMEOUT_MS)
    # A widget message is handled only when the kernel is idle: wait until every cell has run ([ ] and [*] gone).
    try:
        page.wait_for_function("""() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
            // a cell whose input is collapsed (the exercises' solutions) shows an empty prompt: count the others
            const shown = prompts.map(p => p.textContent.trim()).filter(t => t !== '');
            return shown.length > 0 && shown.every(t => /^\\[\\d+\\]:?$/.test(t));
        }""", timeout=RUN_TIMEOUT_MS)
    except Exception as exc:
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "ps => ps.map(p => p.textContent)")
        raise AssertionError(f"not every code cell ran: input prompts {prompts}") from exc
    first_status = status.text_content()
    assert "of 8" in first_status and "400/400" in first_status, first_status

    k_move = move(page, "k", "top-3 of 8", "Geometry of top-3 of 8 (E=8) at step 400/400")
    e_move = move(page, "experts E", "top-3 of 7", "Geometry of top-3 of 7 (E=7) at step 400/400")
    output = page.locator(".jp-OutputArea-output", has=page.locator(".moewidgets-status")).first
    output.scroll_into_view_if_needed()
    page.wait_for_timeout(500)          # let bokeh paint the last redraw
    output.screenshot(path=str(OUT / "chapter1.png"))
    return {
        # the headline: the k move (same interaction as bench/dashboards.py's kernel-side row)
        **{key: k_move[key] for key in ("keypress_to_status_ms", "keypress_to_done_ms",
                                        "debounce_to_first_redraw_ms_kernel", "redraws_per_s_kernel")},
        "targets": {"keypress_to_status_ms": ACK_TARGET_MS, "keypress_to_done_ms": DONE_TARGET_MS,
                    "debounce_to_first_redraw_ms_kernel": 150, "redraws_per_s_kernel": 5},
        "moves": [k_move, e_move],
    }


def _known_myst_xref(msg) -> bool:
    """jupyterlab-myst resolves cross-references inside one notebook only: a link to another page of the book
    (``{ref}`appendix-chapter1` ``) logs "Cross reference target was not found" in JupyterLab. The book build
    resolves and checks every such reference (``-n``), so only this exact message from that extension is excused."""
    return ("jupyterlab-myst" in (msg.location or {}).get("url", "")
            and all(line.startswith("Cross reference target was not found:") for line in msg.text.splitlines()))


def _known_toolbar_overlap(exc) -> bool:
    """JupyterLab's cell toolbar asks, on every layout change, whether a rendered markdown cell overlaps it
    (``_markdownOverlapsToolbar`` in JupyterLab's cell-toolbar package); a markdown cell rendered by jupyterlab-myst
    has no rendered node at that moment, and the check throws. Nothing on the page changes (the toolbar is only
    placed), so exactly this TypeError, thrown from that function, is excused; any other error fails the test."""
    frames = (exc.stack or "").splitlines()[1:2]
    return (str(exc).endswith("Cannot read properties of undefined (reading 'node')")
            and any("_markdownOverlapsToolbar" in f for f in frames))


def test_chapter1_dashboard_in_jupyterlab():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (the test needs it)"
    from playwright.sync_api import sync_playwright

    nb_path = ROOT / NOTEBOOK
    assert nb_path.exists() and "Chapter1Dashboard" in nb_path.read_text(), \
        f"{NOTEBOOK} must display a Chapter1Dashboard (set MOEWIDGETS_BROWSER_NOTEBOOK to try another notebook)"
    OUT.mkdir(parents=True, exist_ok=True)
    hide_news_toast()
    port, token = free_port(), secrets.token_hex(16)
    t_start = time.monotonic()
    settings_dir = no_autosave_settings()
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "book").glob("chapter1.*")}
    lab = start_lab(port, token, OUT / "jupyterlab.log", settings_dir)
    profile = tempfile.mkdtemp(prefix="moewidgets-chromium-")
    errors: list[str] = []
    excused: list[str] = []             # known, harmless extension errors (recorded in latency.json)
    try:
        wait_for_lab(lab, port, token)
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=LAUNCH_ARGS, viewport={"width": 1400, "height": 1800})
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not _known_myst_xref(m)
                    else None)
            page.on("pageerror", lambda e: excused.append(str(e)) if _known_toolbar_overlap(e)
                    else errors.append(f"{e} | {(e.stack or '').splitlines()[1:3]}"))
            # the token goes in a cookie-setting first request, then every URL works without it
            page.goto(f"http://127.0.0.1:{port}/lab?token={token}")
            try:
                result = drive(page, f"http://127.0.0.1:{port}")
            except BaseException:
                page.screenshot(path=str(OUT / "failure.png"))
                raise
            finally:
                ctx.close()
        result.update(console_errors=errors, excused_page_errors=len(excused),
                      test_wall_s=round(time.monotonic() - t_start, 1),
                      date=time.strftime("%Y-%m-%d %H:%M"), cpu_count=os.cpu_count(),
                      loadavg_1min_after=round(os.getloadavg()[0], 2))
        tmp = OUT / "latency.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
        os.replace(tmp, OUT / "latency.json")
        print(json.dumps(result, indent=1, ensure_ascii=False))
        assert not errors, errors
    finally:
        stop_server(lab, profile, settings_dir)
    after = {p: p.stat().st_mtime_ns for p in (ROOT / "book").glob("chapter1.*")}
    assert after == before, f"the test wrote into book/: {sorted(str(p) for p in after if after[p] != before.get(p))}"
