"""The built HTML book, opened from ``file://`` in headless Chromium with the network cut: every page must work offline.

For every ``.html`` page of ``book/_build/html`` (chapters, API, module sources, index pages, and the kernel-free
figure pages under ``figures/``) the test opens ``file://…`` in a browser context that is offline
(``new_context(offline=True)``) and whose route handler records and aborts every request that is not ``file:``,
``data:``, ``blob:`` or ``about:``. It fails on

* any such external request, any failed ``file://`` request (a missing font, script or figure), any WebSocket;
* raw TeX left in the rendered text (``\\(``, ``\\[``, ``$$`` outside code): MathJax must have typeset it, and every
  ``.math`` element must hold an ``mjx-container`` without ``mjx-merror`` (a TeX error);
* a figure that stayed empty: an ``<img>`` that did not decode, an ``<iframe>`` whose page did not load, or a bokeh
  root (``[data-root-id]``, also inside iframes) that drew no canvas;
* an uncaught page error or a console error.

Two page errors are known, harmless and allowed (``KNOWN_PAGE_ERRORS``): Jupyter Book 1 emits sphinx-thebe's config
script twice (thebe is off: it never loads), and pydata-sphinx-theme complains once about an empty stored theme mode
in a fresh profile.

It saves one full-page screenshot per page to ``build/offline-book/<page>.png`` (``chapter1.html`` →
``chapter1.png``, ``figures/chapter1.html`` → ``figures__chapter1.png``; pages taller than ``MAX_SHOT_PX`` are cut
there) and a summary ``build/offline-book/report.json``. The generated reference pages (``FIRST_SCREEN_ONLY``: the
highlighted module sources, 40-odd long pages of code with neither math nor figures, the API page and the indexes)
get the checks but only a first-screen screenshot, which keeps the browsing near a minute and a half on 2 busy
cores.

**Build or reuse.** The test builds the book (as ``make book`` does: the figure pages from the committed data, then
``jupyter-book build book/ --config jupyter_book_config.yml``, here strict: ``-W -n --keep-going``, so a Sphinx
warning such as a broken reference fails the test and every warning is listed) only when
``book/_build/html/index.html`` is missing or older than one of its sources (anything under ``book/`` outside
``_build``, ``jupyter_book_config.yml``, the package's ``.py`` files that the API pages document).
``MOEWIDGETS_BOOK_BUILD=always`` rebuilds: ``make test`` sets it, so this test is the book build of ``make test``,
on one worker of the parallel session while the other runs unit tests (the build is single-threaded).
``MOEWIDGETS_BOOK_BUILD=never`` checks the HTML as it is (fails if there is none). ``MOEWIDGETS_BOOK_DIR`` (a book
source folder, e.g. a copy in ``/tmp``) tests another book; its HTML is read from ``<dir>/_build/html`` and it is
built with the same config file when stale (figure pages are not regenerated for a copy).
Fails (never skips) without ``/usr/bin/chromium``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import CHROMIUM, LAUNCH_ARGS, ROOT

pytestmark = pytest.mark.browser

BOOK = Path(os.environ.get("MOEWIDGETS_BOOK_DIR", ROOT / "book")).resolve()
HTML = BOOK / "_build" / "html"
CONFIG = ROOT / "jupyter_book_config.yml"
SHOTS = ROOT / "build" / "offline-book"
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
VIEWPORT = {"width": 1280, "height": 900}
MAX_SHOT_PX = 16_000          # full-page screenshots are cut at this height (the API page is very long)
# Generated reference pages (module sources, the API page: 226,000 px tall, whose full screenshot alone took 5 s,
# the indexes): checked like every page, but only their first screen is saved.
FIRST_SCREEN_ONLY = ("_modules/", "api.html", "genindex.html", "py-modindex.html", "search.html")
KNOWN_PAGE_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",   # sphinx-thebe config emitted twice
                     "Got invalid theme mode: . Resetting to auto.")           # pydata theme, fresh profile
PAGE_TIMEOUT_MS = 30_000      # MathJax / BokehJS of one page, on a loaded 2-core machine
BUILD_TIMEOUT_S = 900
BUILD_MODE = os.environ.get("MOEWIDGETS_BOOK_BUILD", "auto")
STRICT = ("-W", "-n", "--keep-going")   # jupyter-book build: warnings are errors, nitpicky references, report all


def book_sources() -> list[Path]:
    """The files whose change makes the built HTML stale."""
    files = [CONFIG, *(ROOT / "moewidgets").rglob("*.py")]
    for p in BOOK.rglob("*"):
        rel = p.relative_to(BOOK).parts
        if p.is_file() and rel[0] != "_build" and ".ipynb_checkpoints" not in rel and "__pycache__" not in rel:
            files.append(p)
    return files


def stale_reason() -> str | None:
    """Why the HTML must be (re)built, or None when ``index.html`` is newer than every source."""
    index = HTML / "index.html"
    if not index.exists():
        return f"{index} is missing"
    built = index.stat().st_mtime
    newer = [p for p in book_sources() if p.stat().st_mtime > built]
    if newer:
        return f"{len(newer)} source(s) newer than {index.name}, e.g. {newer[0]}"
    return None


def ensure_book() -> str:
    """Build the HTML book when it is missing or stale; return what was done (for the report)."""
    if BUILD_MODE not in ("auto", "never", "always"):
        raise ValueError(f"MOEWIDGETS_BOOK_BUILD={BUILD_MODE!r} must be one of 'auto', 'never', 'always'")
    if BUILD_MODE == "never":
        assert (HTML / "index.html").exists(), f"MOEWIDGETS_BOOK_BUILD=never but {HTML}/index.html is missing"
        return "reused (MOEWIDGETS_BOOK_BUILD=never)"
    reason = "MOEWIDGETS_BOOK_BUILD=always" if BUILD_MODE == "always" else stale_reason()
    if reason is None:
        return "reused"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if BOOK == (ROOT / "book").resolve():
        # what `make figures-html` does: the kernel-free figure pages the chapters show in iframes
        for tool in ("tools/make_static_figures.py --render-only", "tools/make_performance_figure.py"):
            subprocess.run([sys.executable, *tool.split()], cwd=ROOT, env=env, check=True, timeout=BUILD_TIMEOUT_S)
    jb = Path(sys.executable).with_name("jupyter-book")
    # strict, as `make test` wants it: a Sphinx warning (a broken reference, a missing figure) fails the test, and
    # --keep-going lists every warning at once instead of stopping at the first
    proc = subprocess.run([str(jb), "build", str(BOOK), "--config", str(CONFIG), *STRICT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0 and (HTML / "index.html").exists(), \
        f"book build failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return f"built ({reason})"


def pages() -> list[Path]:
    """Every HTML page of the built book, theme assets (``_static/``) excluded."""
    return sorted(p for p in HTML.rglob("*.html") if p.relative_to(HTML).parts[0] != "_static")


def shot_name(page: Path) -> str:
    return "__".join(page.relative_to(HTML).with_suffix("").parts) + ".png"


def redirect_target(page: Path) -> Path | None:
    """The page a ``<meta http-equiv="refresh" content="0; url=…">`` page leads to, or None."""
    m = re.search(r'http-equiv="refresh"\s+content="\d+;\s*url=([^"#?]+)', page.read_text(errors="replace"), re.I)
    return (page.parent / m.group(1)).resolve() if m else None


# Runs in the page after MathJax's startup promise resolved. Returns raw TeX found in the rendered text (outside
# code, scripts and typeset math), how many .math elements there are, and which of them were not typeset.
MATH_JS = r"""async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const skip = 'pre, code, script, style, textarea, noscript, mjx-container, .highlight, .linenos';
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const t = n.textContent;
    if (!(t.includes('\\(') || t.includes('\\[') || t.includes('$$'))) continue;
    if (n.parentElement && n.parentElement.closest(skip)) continue;
    raw.push(t.trim().slice(0, 120));
  }
  const maths = Array.from(document.querySelectorAll('.math'));
  const untypeset = maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80));
  const errors = maths.filter(m => m.querySelector('mjx-merror')).map(m => m.textContent.slice(0, 80));
  return {raw, n_math: maths.length, n_mjx: document.querySelectorAll('mjx-container').length,
          has_mathjax: !!window.MathJax, untypeset, errors};
}"""

# Every <img> (lazy ones forced eager) must decode to a non-empty image.
IMG_JS = r"""async () => {
  const bad = [];
  for (const img of Array.from(document.images)) {
    img.loading = 'eager';
    try { await img.decode(); } catch (e) { /* judged below */ }
    if (!(img.complete && img.naturalWidth > 0 && img.naturalHeight > 0)) bad.push(img.currentSrc || img.src);
  }
  return {n: document.images.length, bad};
}"""

# Bokeh roots: each [data-root-id] element must have drawn at least one canvas of positive size (canvases live in
# shadow roots). Returns null while BokehJS has not embedded the documents yet.
BOKEH_JS = r"""() => {
  const roots = Array.from(document.querySelectorAll('[data-root-id]'));
  if (roots.length === 0) return {n_roots: 0, empty: []};
  const canvases = (node) => {
    let out = [];
    const visit = (el) => {
      if (el.tagName === 'CANVAS') out.push(el);
      if (el.shadowRoot) Array.from(el.shadowRoot.children).forEach(visit);
      Array.from(el.children).forEach(visit);
    };
    visit(node);
    return out.filter(c => c.width > 0 && c.height > 0);
  };
  const empty = roots.filter(r => canvases(r).length === 0).map(r => r.getAttribute('data-root-id'));
  return {n_roots: roots.length, empty};
}"""


def check_bokeh(frame, where: str, problems: list[str]) -> int:
    """Wait until every bokeh root in ``frame`` drew a canvas (or PAGE_TIMEOUT_MS passes); return the root count."""
    deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
    while True:
        state = frame.evaluate(BOKEH_JS)
        if not state["empty"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if state["empty"]:
        problems.append(f"{where}: bokeh root(s) {state['empty']} drew no canvas")
    return state["n_roots"]


def check_page(page, path: Path, problems: list[str]) -> dict:
    """Open one page from file://, run every check, save its screenshot; append problems, return its counts."""
    where = str(path.relative_to(HTML))
    target = redirect_target(path)
    if target is not None:          # Jupyter Book's index.html: a meta refresh; check and show where it leads
        if not target.is_file():
            problems.append(f"{where}: redirects to a missing page {target}")
            return {"page": where, "redirect": str(target)}
        path = target
    page.goto(path.as_uri(), wait_until="load", timeout=PAGE_TIMEOUT_MS)
    math = page.evaluate(MATH_JS)
    if math["raw"]:
        problems.append(f"{where}: raw TeX left in the text: {math['raw'][:3]}")
    if math["n_math"] and not math["has_mathjax"]:
        problems.append(f"{where}: {math['n_math']} math elements but MathJax is not loaded")
    if math["untypeset"]:
        problems.append(f"{where}: {len(math['untypeset'])} math element(s) not typeset, e.g. {math['untypeset'][:2]}")
    if math["errors"]:
        problems.append(f"{where}: TeX errors in {math['errors'][:3]}")
    imgs = page.evaluate(IMG_JS)
    if imgs["bad"]:
        problems.append(f"{where}: image(s) that did not load: {imgs['bad'][:3]}")
    n_bokeh = check_bokeh(page.main_frame, where, problems)
    iframes = page.locator("iframe")
    n_iframes = iframes.count()
    for i in range(n_iframes):
        el = iframes.nth(i)
        src = el.get_attribute("src") or ""
        el.scroll_into_view_if_needed(timeout=PAGE_TIMEOUT_MS)      # lazy iframes load once visible
        frame = el.element_handle().content_frame()
        if frame is None:
            problems.append(f"{where}: iframe {src!r} has no frame")
            continue
        frame.wait_for_load_state("load", timeout=PAGE_TIMEOUT_MS)
        if not frame.url.startswith("file:") or frame.evaluate("() => document.body === null "
                                                               "|| document.body.childElementCount === 0"):
            problems.append(f"{where}: iframe {src!r} did not load a page (frame at {frame.url!r})")
            continue
        n_roots = check_bokeh(frame, f"{where} → iframe {src}", problems)
        n_imgs = frame.evaluate(IMG_JS)
        if n_roots == 0 and n_imgs["n"] == 0:
            problems.append(f"{where}: iframe {src!r} shows no figure (no bokeh root, no image)")
        if n_imgs["bad"]:
            problems.append(f"{where} → iframe {src}: image(s) that did not load: {n_imgs['bad'][:3]}")
    height = page.evaluate("() => document.documentElement.scrollHeight")
    page.evaluate("() => window.scrollTo(0, 0)")
    shot = SHOTS / shot_name(HTML / where)
    if where.startswith(FIRST_SCREEN_ONLY):
        page.screenshot(path=str(shot))
    else:
        page.screenshot(path=str(shot), full_page=True,
                        clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": min(height, MAX_SHOT_PX)})
    return {"page": where, "math": math["n_math"], "mjx": math["n_mjx"], "images": imgs["n"],
            "bokeh_roots": n_bokeh, "iframes": n_iframes, "height_px": height}


def test_built_book_works_offline():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (the test needs it)"
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    build = ensure_book()
    t_build = time.monotonic() - t0
    all_pages = pages()
    assert len(all_pages) >= 5, f"only {len(all_pages)} pages under {HTML}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()

    external: list[str] = []
    problems: list[str] = []
    rows: list[dict] = []
    current = {"page": ""}

    def route(r):
        if r.request.url.startswith(LOCAL_SCHEMES):
            r.continue_()
        else:
            external.append(f"{current['page']}: {r.request.url}")
            r.abort()

    def on_request(req):          # a backstop for anything the route handler did not see
        if not req.url.startswith(LOCAL_SCHEMES):
            external.append(f"{current['page']}: {req.url}")

    def on_failed(req):
        if req.url.startswith("file:") and req.failure != "net::ERR_ABORTED":   # aborted: a cancelled load
            problems.append(f"{current['page']}: failed to load {req.url} ({req.failure})")

    def on_error(text: str):
        if not any(known in text for known in KNOWN_PAGE_ERRORS):
            problems.append(f"{current['page']}: {text[:200]}")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            ctx = browser.new_context(offline=True, viewport=VIEWPORT)
            ctx.route("**/*", route)
            page = ctx.new_page()
            page.on("request", on_request)
            page.on("requestfailed", on_failed)
            page.on("websocket", lambda ws: external.append(f"{current['page']}: websocket {ws.url}"))
            page.on("pageerror", lambda e: on_error(f"page error {e}"))
            page.on("console", lambda m: on_error(f"console error {m.text}") if m.type == "error" else None)
            for path in all_pages:
                current["page"] = str(path.relative_to(HTML))
                t_page = time.monotonic()
                try:
                    rows.append(check_page(page, path, problems) | {"s": round(time.monotonic() - t_page, 2)})
                except Exception as e:       # a timeout on one page is that page's problem; go on with the rest
                    problems.append(f"{current['page']}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        finally:
            browser.close()

    external = sorted(set(external))
    report = {"html": str(HTML), "build": build, "build_s": round(t_build, 1),
              "browse_s": round(time.monotonic() - t0 - t_build, 1), "pages": rows,
              "external_requests": external, "problems": problems}
    (SHOTS / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"{len(rows)}/{len(all_pages)} pages checked, {sum(r['mjx'] for r in rows)} typeset formulas, "
          f"{sum(r['bokeh_roots'] for r in rows)} bokeh roots, {sum(r['images'] for r in rows)} images; "
          f"book {build} ({t_build:.0f} s), browsing {report['browse_s']} s; screenshots in {SHOTS}")
    assert not external, f"{len(external)} request(s) left the page:\n" + "\n".join(external[:20])
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:30])
    assert len(list(SHOTS.glob("*.png"))) == len(all_pages)
