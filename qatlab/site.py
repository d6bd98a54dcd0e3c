"""The browsable site: ``build/html/index.html`` links every executed notebook.

``make run`` (:mod:`qatlab.runner`) renders each executed notebook to
``build/html/<stem>.html`` and then calls :func:`write_index`, which lists every
notebook with its one-line summary (the italic line right after the
``# NN · Title`` heading of its first markdown cell) and the merged results
table of ``build/results.json``. Plain HTML with inline CSS: no network assets,
so the site opens offline from disk.
"""

import html
import math
import numbers
import re
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
        seconds = metrics.get("seconds")
        names = sorted(k for k in metrics if k != "seconds")
        time_cell = f"{seconds:.1f}" if isinstance(seconds, numbers.Real) else "–"
        if not names:
            rows.append(f"<tr><td>{html.escape(stem)}</td><td class=missing>(no metrics recorded)</td>"
                        f"<td></td><td class=num>{time_cell}</td></tr>")
            continue
        for j, name in enumerate(names):
            first = (f'<td rowspan="{len(names)}">{html.escape(stem)}</td>' if j == 0 else "")
            last = (f'<td class=num rowspan="{len(names)}">{time_cell}</td>' if j == 0 else "")
            rows.append(f"<tr>{first}<td>{html.escape(name)}</td>"
                        f"<td class=num>{_format_value(metrics[name])}</td>{last}</tr>")
    return rows


def write_index(html_dir, results, notebooks_dir):
    """Write ``html_dir/index.html`` and return its path.

    ``results`` is the merged ``build/results.json``:
    ``{"<stem>": {"<metric>": value, ..., "seconds": wall time}}``. Every notebook
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
        text = f"<span class=summary>{html.escape(summary)}</span>" if summary else ""
        items.append(f"<li>{link}{text}</li>")
    rows = _results_rows(results)
    table = ("<table>\n<thead><tr><th>notebook</th><th>metric</th><th>value</th><th>seconds</th></tr></thead>\n"
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
<h2>Results</h2>
{table}
</body>
</html>
"""
    path = html_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
