"""Open the built book in headless Chromium, screenshot every page, and check what a reader sees.

    python tools/browser_check.py _build/html _build/screenshots

For the index and every chapter of _toc.yml, served from a local HTTP server, it fails if
- math did not render (a `.math` element without MathJax output, a MathJax error, or raw `$` /
  `\\command` TeX left in the page's text),
- an image did not load (`naturalWidth == 0`) or any request of the page failed,
- an internal link points to a missing page or to a missing anchor,
- the page scrolls sideways, or a formula is wider than the box that holds it while that box does
  not scroll (mathematics clipped at the edge of a proof, a theorem or the column),
- at the desktop width: a formula, a line of code (collapsed cells opened) or a results table
  (`robustreg.notebook.html_table`) that the reader must scroll sideways to read,
- a figure has no caption, or is shown smaller than its text can be read: every label of an SVG
  figure (its largest glyphs: sub- and superscripts are smaller by design) must measure at least
  :data:`MIN_TEXT_PX` CSS pixels (9 pt) as displayed; a raster figure, whose text cannot be
  measured, must carry at least :data:`MIN_RASTER_DENSITY` image pixels per displayed pixel,
- a test marker (`NBVAL`) or an unparsed directive or role (`{prf:`, a code fence) is visible,
- the theme shows more than one search field (a header bar of its own beside the sidebar's),
at a desktop width and at a phone's (:data:`WIDTHS`), with a screenshot of each. Uses Debian's
`chromium` through Playwright (no browser download), with a fresh profile; :data:`WORKERS`
browsers share the pages.
"""

from __future__ import annotations

import functools
import http.server
import re
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse
from xml.etree import ElementTree

from chapters import toc_files
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
#: The viewports every page is checked at: a desktop and a phone.
WIDTHS = [(1400, 900), (420, 900)]
DESKTOP = WIDTHS[0][0]
#: The smallest text a figure may show, in CSS pixels: 9 pt (a CSS pixel is 1/96 in, a point 1/72).
MIN_TEXT_PX = 9 * 96 / 72
#: A raster figure needs this many image pixels per displayed CSS pixel (a 2× rendering).
MIN_RASTER_DENSITY = 2.0
#: Browsers side by side (one per core of the 2-core machine CI runs on), each with its own server.
WORKERS = 2


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def handle(self):  # a browser may drop a request it no longer needs (e.g. the favicon)
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


_PAGE_STATE = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const math = [...document.querySelectorAll('.math')];
  return {
    mathjax: !!(window.MathJax && MathJax.version),
    math: math.length,
    unrendered: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 60)),
    errors: [...document.querySelectorAll('mjx-merror, .MathJax_Error')].map(e => e.textContent.slice(0, 80)),
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    pageOverflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    searchFields: [...document.querySelectorAll('.search-button-field')]
      .filter(e => e.getBoundingClientRect().width > 0).length,
    figures: (() => {
      const article = document.querySelector('article.bd-article') || document.querySelector('main');
      return [...article.querySelectorAll('img')]
        .filter(i => i.getBoundingClientRect().width > 0)
        .map(i => {
          const f = i.closest('figure');
          return {src: i.currentSrc || i.src, natural: i.naturalWidth, shown: i.getBoundingClientRect().width,
                  caption: !!(f && f.querySelector('figcaption') && f.querySelector('figcaption').textContent.trim())};
        });
    })(),
    scrolled: (() => {  // formulas and code lines that need sideways scrolling (collapsed cells opened)
      const closed = [...document.querySelectorAll('details')].filter(d => !d.open);
      closed.forEach(d => { d.open = true; });
      // 2 px of slack: accents and italic overhang may poke out of a formula's box
      const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
      const wide = e => scrolls(e) && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 2;
      const math = [...document.querySelectorAll('mjx-container')].filter(wide)
        .map(m => 'formula: ' + m.textContent.slice(0, 50));
      const code = [...document.querySelectorAll('div.cell_input pre, div.highlight pre')]
        .filter(p => !p.closest('div.cell_output, div.output')).filter(wide)
        .map(p => {
          const lines = p.textContent.split('\n');
          const longest = lines.reduce((a, b) => b.length > a.length ? b : a, '');
          return `code line of ${longest.length} characters: ${longest.trim().slice(0, 60)}`;
        });
      const tables = [...document.querySelectorAll('table.robustreg-table')].filter(wide)
        .map(t => `results table ${(t.closest('figure') || t).id || '(no id)'}: ` +
                  `${t.scrollWidth} px wide in a ${t.clientWidth} px box`);
      closed.forEach(d => { d.open = false; });
      return [...math, ...code, ...tables];
    })(),
    markers: (() => {
      const main = (document.querySelector('article.bd-article') || document.body).cloneNode(true);
      main.querySelectorAll('script, style').forEach(e => e.remove());
      const text = main.textContent;
      return ['NBVAL', '{prf:', '```{', '{glue:', '{numref}'].filter(m => text.includes(m));
    })(),
    clipped: (() => {  // math wider than the box that holds it, where that box does not scroll
      const out = [];
      for (const m of document.querySelectorAll('mjx-container')) {
        const r = m.getBoundingClientRect();
        if (r.width === 0 || m.parentElement.closest('mjx-container')) continue;
        if (['auto', 'scroll'].includes(getComputedStyle(m).overflowX) && m.clientWidth > 0) continue;
        let a = m.parentElement, limit = document.documentElement.clientWidth;
        while (a && a !== document.body) {
          const st = getComputedStyle(a);
          if (['auto', 'scroll'].includes(st.overflowX)) { limit = Infinity; break; }
          if (['hidden', 'clip'].includes(st.overflowX)) { limit = a.getBoundingClientRect().right; break; }
          a = a.parentElement;
        }
        if (r.right > limit + 1) out.push(m.textContent.slice(0, 50));
      }
      return out;
    })(),
    rawTex: (() => {
      const main = document.querySelector('main, article, body').cloneNode(true);
      main.querySelectorAll('.math, mjx-container, pre, code, script, style, .highlight, .output, .cell_output')
        .forEach(e => e.remove());
      const text = main.textContent;
      const hits = [];
      const re = /\$|\\[a-zA-Z]+/g;
      let m;
      while ((m = re.exec(text)) && hits.length < 5) {
        hits.push(text.slice(Math.max(0, m.index - 30), m.index + 30).replace(/\s+/g, ' '));
      }
      return hits;
    })(),
  };
}
"""


def svg_label_sizes(path: Path) -> list[float]:
    """The size of every label of an SVG figure in the file's own units: per ``<text>`` element its
    largest font size (the label's body; sub- and superscripts are smaller)."""

    def size(element) -> float:
        style = element.get("style", "") + ";" + "font-size:" + element.get("font-size", "")
        sizes = [float(v) for v in re.findall(r"font(?:-size)?:\s*([0-9.]+)px", style)]
        return max(sizes, default=0.0)

    root = ElementTree.parse(path).getroot()
    out = []
    for text in root.iter("{http://www.w3.org/2000/svg}text"):
        sizes = [size(text)] + [size(t) for t in text.iter("{http://www.w3.org/2000/svg}tspan")]
        if "".join(text.itertext()).strip() and max(sizes) > 0:
            out.append(max(sizes))
    return out


def svg_width(path: Path) -> float:
    """The width of an SVG in its user units (the viewBox), which its font sizes are given in."""
    root = ElementTree.parse(path).getroot()
    box = root.get("viewBox")
    if box:
        return float(box.split()[2])
    return float(re.sub(r"[a-z]+$", "", root.get("width", "0")))


def figure_problems(figure: dict, base: str, html_root: Path) -> list[str]:
    """A figure without a caption, or shown too small to read (see the module's rules)."""
    name = figure["src"].rsplit("/", 1)[-1]
    problems = [] if figure["caption"] else [f"figure without a caption: {name}"]
    if not figure["src"].startswith(base):
        return problems
    path = html_root / unquote(urlparse(figure["src"]).path).lstrip("/")
    if path.suffix == ".svg":
        sizes = svg_label_sizes(path)
        if sizes:
            smallest = min(sizes) * figure["shown"] / svg_width(path)
            if smallest < MIN_TEXT_PX - 0.05:
                problems.append(
                    f"figure text shown at {smallest:.1f} px (< {MIN_TEXT_PX:.0f} px = 9 pt): {name}"
                )
    elif figure["shown"] > 0 and figure["natural"] / figure["shown"] < MIN_RASTER_DENSITY:
        problems.append(
            f"raster figure at {figure['natural'] / figure['shown']:.2f} image pixels per shown pixel "
            f"(< {MIN_RASTER_DENSITY:g}; its text cannot be checked): {name}"
        )
    return problems


def check_page(page, base: str, html_root: Path, rel: str, width: int) -> tuple[list[str], dict]:
    """Load one page and return (problems, state)."""
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(urljoin(base, rel), wait_until="networkidle")
    state = page.evaluate(_PAGE_STATE)
    problems = [f"request failed: {url}" for url in failed]
    if state["math"] and not state["mathjax"]:
        problems.append("MathJax did not load")
    problems += [f"math not rendered: {t!r}" for t in state["unrendered"]]
    problems += [f"MathJax error: {t!r}" for t in state["errors"]]
    problems += [f"raw TeX in the text (math not parsed): {t!r}" for t in state["rawTex"]]
    problems += [f"image did not load: {i['src']}" for i in state["images"] if not i["ok"]]
    if state["searchFields"] > 1:
        problems.append(f"{state['searchFields']} search fields shown (one is enough)")
    if state["pageOverflow"] > 0:
        problems.append(f"the page scrolls sideways by {state['pageOverflow']} px")
    problems += [
        f"math clipped (wider than its box, no scrolling): {t!r}" for t in state["clipped"]
    ]
    if width >= DESKTOP:
        problems += [f"needs sideways scrolling at {width} px: {t!r}" for t in state["scrolled"]]
    problems += [f"visible marker or unparsed markup: {m!r}" for m in state["markers"]]
    for figure in state["figures"]:
        problems += figure_problems(figure, base, html_root)
    for href in state["links"]:
        url, fragment = urldefrag(href)
        if not url.startswith(base):
            continue
        target = html_root / urlparse(url).path.lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"broken link: {href}")
        elif fragment and target.suffix == ".html" and fragment not in _anchors(target):
            problems.append(f"missing anchor: {href}")
    return problems, state


def check_pages(html_root: Path, shots: Path, jobs: list[tuple[str, int, int]]) -> list:
    """Check ``jobs`` (page, width, height) in one headless Chromium; ``[(ok, lines)]`` in order."""
    server, base = _serve(html_root)
    out = []
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
            )
            for rel, width, height in jobs:
                page = context.new_page()
                page.set_viewport_size({"width": width, "height": height})
                problems, state = check_page(page, base, html_root, rel, width)
                stem = rel.replace("/", "_").removesuffix(".html")
                shot = shots / f"{stem}-{width}.png"
                page.screenshot(path=str(shot), full_page=True)
                page.close()
                summary = f"{len(state['images'])} images, {state['math']} math, {len(state['links'])} links"
                if problems:
                    lines = [f"FAIL {rel} at {width} px ({summary})"]
                    lines += [f"     {problem}" for problem in problems[:20]]
                else:
                    lines = [f"ok   {rel} at {width} px ({summary}) -> {shot}"]
                out.append((not problems, lines))
            context.close()
    finally:
        server.shutdown()
    return out


def main(html_dir: str, shots_dir: str, workers: int = WORKERS) -> int:
    html_root = Path(html_dir).resolve()
    shots = Path(shots_dir)
    shots.mkdir(parents=True, exist_ok=True)
    if not (html_root / "index.html").exists():
        print(f"no {html_root / 'index.html'}: build the book first (make html)")
        return 1
    pages = ["index.html"] + [f"{f}.html" for f in toc_files()]
    jobs = [(r, w, h) for r in pages for w, h in WIDTHS]
    # pages are dealt round-robin to the workers, each with its own browser; printed in order
    shares = [jobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(check_pages, [html_root] * workers, [shots] * workers, shares))
    results = [None] * len(jobs)
    for i, part in enumerate(parts):
        results[i::workers] = part
    passed = sum(ok for ok, _ in results)
    for _, lines in results:
        print("\n".join(lines))
    print(f"browser: {passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
