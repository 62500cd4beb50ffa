"""The kernel-free figure pages (book/_extra/figures/chapterN.html: sliders over a grid of trained runs, no kernel) in
headless Chromium, opened from ``file://``.

``test_static_figures_offline``: renders each page as ``make figures-html`` does, from the committed grid data, moves
the first slider with the keyboard and checks that the caption and the plotted data switch to that grid point (no
kernel, no network, no console errors). Writes build/browser/static-chapterN.png. Fails (never skips) without
/usr/bin/chromium. Times nothing, so it runs in the parallel pytest session of ``make test``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from servers import CHROMIUM, LAUNCH_ARGS, OUT, ROOT, watch

pytestmark = pytest.mark.browser

FIGURES = ROOT / "book" / "_extra" / "figures"

# chapter → (the caption after one ArrowLeft on the first slider, the table source that must then be plotted)
STATIC_MOVES = {
    "chapter1": ("top-1 of 8, τ=1", "spectra.experts", "spectra.experts[k=1,temperature=1]"),
    "chapter4": ("C'=0.3, α=0.01", "lam.bars", "lam.bars[mpi_scale=0.3,aux_weight=0.01]"),
}

PLOTTED_JS = """([slider, target, tableName]) => {
  const doc = Bokeh.documents[0];
  const cb = doc.get_model_by_name(slider).js_property_callbacks['change:value'][0];
  const plotted = cb.args.targets[target].data, table = doc.get_model_by_name(tableName).data;
  const row = v => (typeof v !== 'string' && v.length !== undefined) ? Array.from(v) : v;   // a multi_line row
  const flat = d => JSON.stringify(Object.keys(d).sort().map(k => Array.from(d[k], row)));
  return {same: flat(plotted) === flat(table), caption: cb.args.caption.text};
}"""


def _render_page(chapter: str, out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_static_figures", ROOT / "tools" / "make_static_figures.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.render(chapter, json.loads((FIGURES / f"{chapter}.json").read_text()), out)


@pytest.mark.parametrize("chapter", sorted(STATIC_MOVES))
def test_static_figures_offline(chapter, tmp_path):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (the test needs it)"
    from playwright.sync_api import sync_playwright

    page_path = _render_page(chapter, tmp_path)      # as `make figures-html` renders it from the committed JSON
    assert page_path.exists(), f"{page_path} is missing: run `python tools/make_static_figures.py`"
    caption, target, table_name = STATIC_MOVES[chapter]
    first_axis = json.loads((FIGURES / f"{chapter}.json").read_text())["axes"][0]["name"]
    errors: list[str] = []
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            watch(page, errors, outside)
            page.goto(page_path.as_uri())
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=60_000)
            page.locator(".noUi-handle").first.wait_for(timeout=60_000)    # inside bokeh's shadow DOM
            page.locator(".noUi-handle").first.focus()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function(
                "([s, c]) => Bokeh.documents[0].get_model_by_name(s).js_property_callbacks['change:value'][0]"
                ".args.caption.text.includes(c)", arg=[f"slider:{first_axis}", caption], timeout=30_000)
            got = page.evaluate(PLOTTED_JS, [f"slider:{first_axis}", target, table_name])
            OUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT / f"static-{chapter}.png"))
        finally:
            browser.close()
    assert got["same"], f"{target} does not hold {table_name} after the slider move"
    assert caption in got["caption"]
    assert not errors, errors
    assert not outside, outside
