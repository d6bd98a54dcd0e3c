"""``make run``: execute every notebook, render HTML, merge the results, print a table.

``python -m qatlab.runner [--only 00 03] [-p name value ...]``

- executes ``notebooks/*.ipynb`` in order with papermill into ``build/executed/``;
- renders each executed notebook to ``build/html/<stem>.html`` and writes
  ``build/html/index.html`` (see :mod:`qatlab.site`);
- merges ``build/results/<stem>.json`` into ``build/results.json`` as
  ``{"<stem>": {"<metric>": value, ..., "seconds": wall time}}``;
- prints a results table, and exits 1 if any notebook failed (the others still run).
"""

import argparse
import json
import sys
import time

from .files import atomic_path, build_dir, repo_root


def execute(notebook, out_dir, parameters):
    import papermill as pm

    out = out_dir / notebook.name
    start = time.time()
    pm.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(notebook.parent),
                        kernel_name="python3", progress_bar=False, log_output=False)
    return out, time.time() - start


def render_html(executed, html_dir):
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    path = html_dir / f"{executed.stem}.html"
    with atomic_path(path) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return path


def merge_results(build, stems, seconds):
    """Merge the per-notebook result files of ``stems`` into ``build/results.json``."""
    path = build / "results.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    for stem in stems:
        per_nb = build / "results" / f"{stem}.json"
        entry = json.loads(per_nb.read_text()) if per_nb.exists() else {}
        if stem in seconds:
            entry["seconds"] = round(seconds[stem], 1)
        merged[stem] = entry
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=2, sort_keys=True))
    return merged


def format_table(merged):
    rows = [(nb, k, v) for nb, metrics in sorted(merged.items()) for k, v in sorted(metrics.items())]
    w = max([len(nb) for nb, _, _ in rows] + [8])
    m = max([len(k) for _, k, _ in rows] + [6])
    lines = [f"{'notebook':{w}}  {'metric':{m}}  value", f"{'-' * w}  {'-' * m}  {'-' * 10}"]
    lines += [f"{nb:{w}}  {k:{m}}  {v:.6g}" if isinstance(v, int | float) else f"{nb:{w}}  {k:{m}}  {v}"
              for nb, k, v in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qatlab.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 03")
    parser.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="papermill parameter for every notebook (VALUE parsed as JSON when it can be)")
    args = parser.parse_args(argv)

    def parse(v):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    params = {k: parse(v) for k, v in args.p}
    notebooks = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in args.only)]
        if not notebooks:
            parser.error(f"no notebook matches --only {args.only}")
    build = build_dir()
    executed_dir, html_dir = build / "executed", build / "html"
    executed_dir.mkdir(parents=True, exist_ok=True)
    html_dir.mkdir(parents=True, exist_ok=True)
    seconds, failed = {}, []
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {nb.name} ...", flush=True)
        # a notebook's params: only those its parameters cell knows would be ignored by papermill
        try:
            out, seconds[nb.stem] = execute(nb, executed_dir, params)
            print(f"    ok in {seconds[nb.stem]:.1f} s", flush=True)
        except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
            failed.append(nb.stem)
            out = executed_dir / nb.name
            print(f"    FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  f"\n    see {out}", flush=True)
        if out.exists():
            render_html(out, html_dir)
    merged = merge_results(build, [nb.stem for nb in notebooks], seconds)
    try:
        from .site import write_index

        write_index(html_dir, merged, repo_root() / "notebooks")
    except ImportError:  # qatlab.site not present
        pass
    print()
    print(format_table(merged))
    print(f"\nresults: {build / 'results.json'}\nhtml:    {html_dir / 'index.html'}")
    if failed:
        print(f"\nFAILED notebooks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
