"""The browsable site in ``build/html/``: every executed notebook, the glossary, an index.

``make run`` (:mod:`qatlab.runner`) renders each executed notebook with
:func:`render_notebook_html`, the glossary with :func:`render_glossary`, and
then calls :func:`write_index`, which lists every notebook with its one-line
summary (the italic line right after the ``# NN · Title`` heading of its first
markdown cell), links the glossary, and shows the merged results table of
``build/results.json``.

The site opens from disk with no network:

- formulas are typeset by MathJax 2 served from ``build/html/mathjax/``, copied
  from the installed ``jupyter-server-mathjax`` package (:func:`copy_mathjax`),
  with the SVG renderer, whose glyphs load as scripts (browsers refuse web fonts
  from ``file://`` pages);
- nbconvert's require.js and widget-renderer scripts (loaded from CDNs) are left
  out: widgets need a live kernel, so their outputs become a note instead;
- links to ``glossary.md#term`` and to ``NN_*.ipynb`` are rewritten to the
  rendered ``.html`` pages.
"""

import html
import math
import numbers
import re
import shutil
from pathlib import Path

from .files import atomic_path

_HEADING = re.compile(r"^#\s+(?P<title>\S.*?)\s*$")
_ITALIC = re.compile(r"^\*(?P<text>[^*].*?[^*]|[^*])\*$")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 60rem;
       margin: 2rem auto; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
ul.notebooks { list-style: none; padding: 0; }
ul.notebooks li { margin: .6rem 0; }
ul.notebooks .summary { display: block; color: #57606a; font-style: italic; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .9em;
       background: #f6f8fa; padding: .05em .3em; border-radius: 3px; }
.missing { color: #8c959f; }
table { border-collapse: collapse; font-size: .95rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
"""


def read_summary(notebook):
    """``(title, summary)`` of a notebook file: its ``# NN · Title`` heading and the
    italic ``*...*`` line right after it; ``""`` for what is missing.

    >>> import nbformat, tempfile, pathlib
    >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
    ...     "# 01 · Fake quant\\n*Round, clamp, rescale.*\\n\\nMore text.")])
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "01_fake_quant_math.ipynb"
    >>> nbformat.write(nb, path)
    >>> read_summary(path)
    ('01 · Fake quant', 'Round, clamp, rescale.')
    """
    import nbformat

    nb = nbformat.read(Path(notebook), as_version=4)
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is None:
        return "", ""
    lines = [line.strip() for line in first.source.split("\n")]
    for i, line in enumerate(lines):
        heading = _HEADING.match(line)
        if heading:
            following = next((x for x in lines[i + 1:] if x), "")
            italic = _ITALIC.match(following)
            return heading["title"], italic["text"].strip() if italic else ""
    return "", ""


def _format_value(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return html.escape(str(value))
    if isinstance(value, numbers.Integral):
        return str(value)
    return f"{value:.6g}" if math.isfinite(value) else html.escape(str(value))


def _results_rows(results):
    rows = []
    for stem in sorted(results):
        metrics = results[stem]
        names = sorted(k for k in metrics if k not in TIMES)
        span = f' rowspan="{len(names)}"' if names else ""
        times = "".join(f"<td class=num{span}>{_format_time(metrics.get(k))}</td>" for k in TIMES)
        if not names:
            rows.append(f"<tr><td>{html.escape(stem)}</td><td class=missing>(no metrics recorded)</td>"
                        f"<td></td>{times}</tr>")
            continue
        for j, name in enumerate(names):
            first = (f'<td rowspan="{len(names)}">{html.escape(stem)}</td>' if j == 0 else "")
            rows.append(f"<tr>{first}<td>{html.escape(name)}</td>"
                        f"<td class=num>{_format_value(metrics[name])}</td>{times if j == 0 else ''}</tr>")
    return rows


# per-notebook times that make run adds to each entry: shown as columns, not as metrics
TIMES = ("seconds", "cpu_seconds")


def _format_time(value):
    return f"{value:.1f}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "–"


def write_index(html_dir, results, notebooks_dir):
    """Write ``html_dir/index.html`` and return its path.

    ``results`` is the merged ``build/results.json``:
    ``{"<stem>": {"<metric>": value, ..., "seconds": wall time, "cpu_seconds": kernel CPU time}}``. Every notebook
    in ``notebooks_dir`` (and every stem in ``results``) is listed; it links to
    ``<stem>.html`` when that page exists in ``html_dir``, otherwise it is marked
    "not run".
    """
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict of {{notebook: {{metric: value}}}}, got {type(results).__name__}")
    for stem, metrics in results.items():
        if not isinstance(metrics, dict):
            raise TypeError(f"results[{stem!r}] must be a dict of metrics, got {metrics!r}")
    html_dir, notebooks_dir = Path(html_dir), Path(notebooks_dir)
    notebooks = {p.stem: p for p in notebooks_dir.glob("*.ipynb")}
    items = []
    for stem in sorted(set(notebooks) | set(results)):
        title, summary = read_summary(notebooks[stem]) if stem in notebooks else ("", "")
        label = html.escape(title or stem)
        page = html_dir / f"{stem}.html"
        link = (f'<a href="{html.escape(page.name, quote=True)}">{label}</a>' if page.exists()
                else f"{label} <span class=missing>(not run)</span>")
        text = f"<span class=summary>{inline_markdown(summary)}</span>" if summary else ""
        items.append(f"<li>{link}{text}</li>")
    glossary = ('<p>Terms (PTQ, QAT, observer, qparams, ...) are defined in the '
                '<a href="glossary.html">glossary</a>.</p>' if (html_dir / "glossary.html").exists()
                else "")
    rows = _results_rows(results)
    table = ("<table>\n<thead><tr><th>notebook</th><th>metric</th><th>value</th><th>seconds</th><th>CPU seconds</th></tr></thead>\n"
             "<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>") if rows else \
        "<p class=missing>No results yet: run <code>make run</code>.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qatlab: executed notebooks</title>
<style>{_CSS}</style>
</head>
<body>
<h1>qatlab</h1>
<p>Quantization-aware training in PyTorch, from fake-quant arithmetic to an int8 model in an edge runtime.
Every page below was executed by <code>make run</code>; every number in the table was measured in that run.</p>
<h2>Notebooks</h2>
<ul class="notebooks">
{chr(10).join(items)}
</ul>
{glossary}
<h2>Results</h2>
{table}
</body>
</html>
"""
    path = html_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# inline Markdown for the one-line summaries
# ---------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_EM = re.compile(r"(?<![*\w])\*(?=\S)(.+?)(?<=\S)\*(?![*\w])")


def inline_markdown(text):
    """HTML for one line of Markdown: `code`, **strong** and *emphasis*; the rest escaped.

    >>> inline_markdown("an ExecuTorch `.pte`, **8 <bits>** and *fast*")
    'an ExecuTorch <code>.pte</code>, <strong>8 &lt;bits&gt;</strong> and <em>fast</em>'
    >>> inline_markdown("`a*b` stays code")
    '<code>a*b</code> stays code'
    """
    parts = _CODE_SPAN.split(text)  # odd items are code spans
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            part = html.escape(part)
            part = _STRONG.sub(r"<strong>\1</strong>", part)
            out.append(_EM.sub(r"<em>\1</em>", part))
    return "".join(out)


# ---------------------------------------------------------------------------
# offline notebook pages
# ---------------------------------------------------------------------------

MATHJAX_DIR = "mathjax"
#: what of jupyter-server-mathjax's MathJax 2 the pages may load (glob patterns): its combined
#: TeX + HTML-CSS configuration, the extensions it can pull in, and the STIX-Web fonts
MATHJAX_PARTS = ("MathJax.js", "config/*", "extensions/*.js", "extensions/TeX/**/*",
                 "extensions/HTML-CSS/*", "extensions/MathML/*", "jax/input/**/*", "jax/element/**/*",
                 "jax/output/HTML-CSS/**/*", "fonts/HTML-CSS/STIX-Web/woff/*", "localization/en/*")

_MATHJAX_CONFIG = r"""
<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  tex2jax: {inlineMath: [["$", "$"], ["\\(", "\\)"]], displayMath: [["$$", "$$"], ["\\[", "\\]"]],
            processEscapes: true, processEnvironments: true},
  "HTML-CSS": {availableFonts: [], imageFont: null, preferredFont: null, webFont: "STIX-Web",
               linebreaks: {automatic: true}},
  displayAlign: "center", messageStyle: "none"
});
</script>
<script src="mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>
"""

# extends nbconvert's "lab" template: no require.js, local MathJax
_TEMPLATE = (
    "{%- extends 'lab/index.html.j2' -%}\n"
    "{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}\n"
    "{%- block html_head_js_mathjax -%}" + _MATHJAX_CONFIG + "{%- endblock html_head_js_mathjax -%}\n"
)

_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_NOTE = ("[interactive widget: it needs a running kernel. Open this notebook in "
                "JupyterLab (make lab) to use it.]")
_NOTEBOOK_LINK = re.compile(r'href="(\d\d_[\w-]+)\.ipynb(#[^"]*)?"')


def mathjax_source():
    """The folder of the MathJax 2 that ``jupyter-server-mathjax`` installs."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise ImportError("jupyter-server-mathjax is not installed: it ships the MathJax that the "
                          "offline HTML pages load (pip install -e '.[dev]')") from None
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def copy_mathjax(html_dir):
    """Copy the MathJax files the pages need into ``html_dir/mathjax``; return that folder.

    Copies only what is missing or of another size, so a second call is cheap.
    """
    src, dst = mathjax_source(), Path(html_dir) / MATHJAX_DIR
    for pattern in MATHJAX_PARTS:
        for f in sorted(p for p in src.glob(pattern) if p.is_file()):
            target = dst / f.relative_to(src)
            if not target.exists() or target.stat().st_size != f.stat().st_size:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    return dst


def rewrite_links(page):
    """Point links at the rendered site: ``glossary.md#x`` -> ``glossary.html#x``,
    ``NN_name.ipynb`` -> ``NN_name.html``.

    >>> rewrite_links('<a href="glossary.md#ptq">PTQ</a> <a href="02_observers.ipynb">02</a>')
    '<a href="glossary.html#ptq">PTQ</a> <a href="02_observers.html">02</a>'
    """
    page = page.replace('href="glossary.md#', 'href="glossary.html#')
    page = page.replace('href="glossary.md"', 'href="glossary.html"')
    return _NOTEBOOK_LINK.sub(lambda m: f'href="{m[1]}.html{m[2] or ""}"', page)


def offline_notebook(nb):
    """A copy of the nbformat notebook ``nb`` ready for a static page: the saved widget
    state is dropped and each widget output shows a note instead of its text repr."""
    import copy

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            data = out.get("data", {})
            if _WIDGET_VIEW in data:
                out["data"] = {"text/plain": _WIDGET_NOTE}
    return nb


def render_notebook_html(notebook, html_dir):
    """Render ``notebook`` (an .ipynb path) to ``html_dir/<stem>.html`` for offline reading;
    copy MathJax beside it. Returns the page's path."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    notebook, html_dir = Path(notebook), Path(html_dir)
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"qatlab_offline.html.j2": _TEMPLATE})],
                            template_file="qatlab_offline.html.j2")
    body, _ = exporter.from_notebook_node(offline_notebook(nbformat.read(notebook, as_version=4)))
    copy_mathjax(html_dir)
    path = html_dir / f"{notebook.stem}.html"
    with atomic_path(path) as tmp:
        tmp.write_text(rewrite_links(body), encoding="utf-8")
    return path


def render_glossary(markdown_path, html_dir):
    """Render the glossary (Markdown with ``<a id="...">`` anchors) to ``html_dir/glossary.html``."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    markdown_path, html_dir = Path(markdown_path), Path(html_dir)
    body = rewrite_links(markdown2html_mistune(markdown_path.read_text(encoding="utf-8")))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qatlab: glossary</title>
<style>{_CSS}
h2 {{ font-size: 1.1rem; }}</style>
</head>
<body>
<p><a href="index.html">qatlab</a> · glossary</p>
{body}
</body>
</html>
"""
    path = html_dir / "glossary.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
