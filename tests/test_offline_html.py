"""The HTML site works from disk with the network cut: formulas are typeset, links resolve.

Renders notebook 01 (its formulas are in markdown cells, so it need not be executed) and the
glossary with the same code ``make run`` uses (:mod:`qatlab.site`), opens the page from
``file://`` in headless Chromium (Debian's ``/usr/bin/chromium`` via Playwright) with the
browser context offline and every non-``file:`` request aborted and recorded, and asserts
that MathJax typeset every formula: no raw ``$`` left in the rendered markdown, one MathJax
output element per formula, no MathJax error. The page must not even try to reach the network.

Skipped when /usr/bin/chromium is missing, unless ``QATLAB_REQUIRE_BROWSER=1`` (CI).
"""

import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qatlab.site import render_glossary, render_notebook_html, write_index

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGE = "01_fake_quant_math"


def browser_available():
    if CHROMIUM.exists():
        return True
    if os.environ.get("QATLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{CHROMIUM} is missing and QATLAB_REQUIRE_BROWSER=1 (install Debian's chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set QATLAB_REQUIRE_BROWSER=1 to fail instead")


class Refs(HTMLParser):
    """Every src/href and every id in a page."""

    def __init__(self):
        super().__init__()
        self.refs, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if attrs.get(key):
                self.refs.append((tag, attrs[key]))
        if attrs.get("id"):
            self.ids.add(attrs["id"])


def parse(path):
    refs = Refs()
    refs.feed(path.read_text(encoding="utf-8"))
    return refs


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    html_dir = tmp_path_factory.mktemp("html")
    page = render_notebook_html(ROOT / "notebooks" / f"{PAGE}.ipynb", html_dir)
    render_glossary(ROOT / "notebooks" / "glossary.md", html_dir)
    write_index(html_dir, {}, ROOT / "notebooks")
    return html_dir, page


def test_pages_load_nothing_from_the_network(site):
    html_dir, page = site
    for path in (page, html_dir / "glossary.html", html_dir / "index.html"):
        loads = [(tag, ref) for tag, ref in parse(path).refs
                 if tag in ("script", "link", "img", "iframe") and re.match(r"(https?:)?//", ref)]
        assert not loads, f"{path.name} loads from the network: {loads}"
        text = path.read_text(encoding="utf-8")
        assert "cdnjs.cloudflare.com/ajax/libs/mathjax" not in text and "require.min.js" not in text
    assert (html_dir / "mathjax" / "MathJax.js").exists()


def test_glossary_links_resolve_in_the_html(site):
    html_dir, page = site
    glossary_ids = parse(html_dir / "glossary.html").ids
    links = [ref for _, ref in parse(page).refs if "glossary" in ref]
    assert links, f"{page.name} links no glossary term"
    for ref in links:
        assert ref.startswith("glossary.html#"), f"{page.name}: link {ref!r} not rewritten to the HTML glossary"
        assert ref.split("#", 1)[1] in glossary_ids, f"{page.name}: {ref!r} has no anchor in glossary.html"
    assert 'href="glossary.html"' in (html_dir / "index.html").read_text(encoding="utf-8")


@pytest.mark.browser
def test_math_renders_offline_in_chromium(site):
    browser_available()
    from playwright.sync_api import sync_playwright

    html_dir, page_path = site
    attempted = []
    start = time.time()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(offline=True)  # the network is cut for this page

            def route(r):
                if r.request.url.startswith("file:"):
                    r.continue_()
                else:
                    attempted.append(r.request.url)
                    r.abort()

            context.route("**/*", route)
            page = context.new_page()
            failed = []
            page.on("requestfailed", lambda req: failed.append(req.url))
            page.goto(page_path.as_uri(), wait_until="load")
            # MathJax 2 typesets asynchronously; wait for its queue to drain
            page.wait_for_function(
                "() => window.MathJax && MathJax.Hub && MathJax.Hub.queue && "
                "MathJax.Hub.queue.pending === 0 && MathJax.Hub.queue.running === 0 && "
                "document.querySelectorAll('.MathJax').length > 0", timeout=20_000)
            markdown = page.locator(".jp-RenderedMarkdown").all_inner_texts()
            n_math = page.locator(".MathJax").count()  # one typeset element per formula
            n_display = page.locator(".MathJax_Display").count()
            n_source = page.locator("script[type^='math/tex']").count()  # the TeX MathJax found
            errors = page.locator(".MathJax .merror, .MathJax_Display .merror").count()
            shot = ROOT / "build" / "screenshots" / "01_offline_math.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".MathJax_Display").first.scroll_into_view_if_needed()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    print(f"offline page: {n_math} formulas ({n_display} displayed) typeset in {time.time() - start:.1f} s")
    assert not attempted, f"the page tried the network: {attempted[:5]}"
    # jupyter-server-mathjax ships the STIX-Web fonts only; MathJax's combined config also
    # declares the TeX .otf faces (for its NativeMML output), and the browser falls back
    missing = [u for u in failed if u.startswith("file:") and not re.search(r"/fonts/HTML-CSS/TeX/otf/", u)]
    assert not missing, f"local files missing: {missing[:5]}"
    raw = [t for t in markdown if "$" in t]
    assert not raw, f"raw LaTeX left in the page: {raw[0][:200]!r}"
    assert n_source >= 8 and n_math == n_source and n_display >= 3, (n_source, n_math, n_display)
    assert errors == 0
