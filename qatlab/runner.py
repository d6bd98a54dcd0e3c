"""``make run``: execute every notebook, render HTML, merge the results, print a table.

``python -m qatlab.runner [--only 00 03] [--jobs N] [-p name value ...]``

- executes ``notebooks/*.ipynb`` with papermill into ``build/executed/``, ``--jobs`` at a time
  (default: one per CPU this process may use, at most 4; :func:`default_jobs`), each kernel with
  ``CPUs // jobs`` torch threads (``QATLAB_THREADS``), the notebooks whose last run took longest
  first (:func:`run_order`). On 2 cores two 1-thread kernels side by side get more done than one
  2-thread kernel: the course's small models gain much less than 2x from a second thread, and
  exports and conversions are single-threaded Python. ``--jobs 1`` runs the notebooks one by one,
  in course order, each with every CPU: the times a reader sees when running one notebook;
- removes the progress bars from the saved outputs (:func:`strip_progress_bars`: a
  tqdm bar is a widget, and without a live kernel only its first frame, ``0%|``, is left),
  and the stream outputs that hold only whitespace (the clearing frame of a text-mode bar);
- renders each executed notebook to ``build/html/<stem>.html``, ``notebooks/glossary.md``
  to ``build/html/glossary.html``, and writes ``build/html/index.html``; the site works
  offline (see :mod:`qatlab.site`);
- merges ``build/results/<stem>.json`` into ``build/results.json`` as
  ``{"<stem>": {"<metric>": value, ..., "seconds": wall time, "cpu_seconds": its kernel's CPU
  time}}``; with ``--jobs`` above 1 a notebook's wall time includes waiting for the CPU
  beside another kernel, its CPU time does not;
- gives every cell and every notebook a time limit (:func:`time_limits`): past it the run of
  that notebook fails with a message naming the notebook, the cell and the limit, and no
  kernel process is left behind (:func:`reap_kernels`);
- prints a results table, and exits 1 if any notebook failed (the others still run).
"""

import argparse
import json
import math
import os
import re
import sys
import time

from .files import atomic_path, build_dir, repo_root
from .site import render_glossary, render_notebook_html, write_index
from .threads import positive_int

# time limits of one notebook execution (seconds); QATLAB_CELL_TIMEOUT / QATLAB_NOTEBOOK_TIMEOUT
# override them. The budget is 120 s a notebook on 2 quiet cores: the limits leave room for a
# busy machine and a first run that trains the baselines, and still stop a hung kernel.
CELL_TIMEOUT = 600
NOTEBOOK_TIMEOUT = 1200


class NotebookTimeoutError(TimeoutError):
    """A notebook ran past its per-cell or per-notebook time limit; its kernel was shut down."""


def time_limits(cell_timeout=None, notebook_timeout=None):
    """``(cell_timeout, notebook_timeout)`` in seconds: the arguments, else the environment
    variables ``QATLAB_CELL_TIMEOUT`` / ``QATLAB_NOTEBOOK_TIMEOUT``, else the defaults.

    >>> time_limits(30, 90)
    (30.0, 90.0)
    >>> time_limits(0, 90)
    Traceback (most recent call last):
    ...
    ValueError: cell_timeout must be a positive number of seconds, got 0
    """
    out = []
    for name, value, env, default in (("cell_timeout", cell_timeout, "QATLAB_CELL_TIMEOUT", CELL_TIMEOUT),
                                      ("notebook_timeout", notebook_timeout, "QATLAB_NOTEBOOK_TIMEOUT",
                                       NOTEBOOK_TIMEOUT)):
        if value is None:
            value = os.environ.get(env, default)
            name = f"{env} (environment)" if env in os.environ else name
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = -1.0
        if isinstance(value, bool) or not seconds > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        out.append(seconds)
    return tuple(out)


def _kernel_children():
    """Kernel processes (``ipykernel_launcher``) started by this process and still alive."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("ipykernel_launcher" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def reap_kernels():
    """Kill kernel processes this process started that are still alive; return their pids.

    nbclient shuts its kernel down when a run ends or fails; this is the last line of defence,
    so that a failed or timed-out run never leaves a kernel behind.
    """
    import psutil

    procs = _kernel_children()
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def execute(notebook, out_dir, parameters, cell_timeout=None, notebook_timeout=None, headless=True):
    """Execute ``notebook`` with papermill into ``out_dir``; return ``(path, seconds)``.

    Every cell gets at most ``cell_timeout`` seconds and the whole notebook at most
    ``notebook_timeout`` (see :func:`time_limits`). Past either, the kernel is interrupted and
    shut down and :class:`NotebookTimeoutError` names the notebook, the cell and the limit. The
    partly executed notebook is still written to ``out_dir``: its cell metadata
    (``execution.iopub.status.busy``, ``shell.execute_reply``) tells whether the kernel had
    started, finished or replied to the cell it stopped in.

    The kernel client polls its sockets in short slices (:mod:`qatlab.kernels`): a message whose
    wakeup the client missed is read within half a second instead of never.

    ``headless`` sets ``QATLAB_HEADLESS=1`` for the kernel: explorers draw once instead of
    opening widgets nobody sees (:func:`qatlab.interactive.interact`).
    """
    import nbformat
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from .kernels import KernelManager  # polls in slices: a lost wakeup cannot hang a run

    cell_limit, nb_limit = time_limits(cell_timeout, notebook_timeout)
    out = out_dir / notebook.name
    start = time.monotonic()
    deadline = start + nb_limit
    current = {}

    def timeout_func(cell):
        current["cell"] = cell
        left = deadline - time.monotonic()
        current["limit"] = ("cell", cell_limit) if cell_limit <= left else ("notebook", nb_limit)
        return max(1, int(min(cell_limit, left)))

    saved = os.environ.get("QATLAB_HEADLESS")
    if headless:
        os.environ["QATLAB_HEADLESS"] = "1"
    else:
        os.environ.pop("QATLAB_HEADLESS", None)
    try:
        # the kernel's own log stays quiet (it warns at every start that its local TCP traffic is
        # unencrypted); errors in cells still reach the notebook and fail the run
        pm.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(notebook.parent),
                            kernel_name="python3", progress_bar=False, log_output=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            timeout_func=timeout_func, kernel_manager_class=KernelManager)
    except (CellTimeoutError, DeadKernelError, TimeoutError) as e:
        cell = current.get("cell")
        index = "?"
        if cell is not None and out.exists():
            ids = [c.get("id") for c in nbformat.read(out, as_version=4).cells]
            index = ids.index(cell.get("id")) if cell.get("id") in ids else "?"
        kind, limit = current.get("limit", ("cell", cell_limit))
        raise NotebookTimeoutError(
            f"{notebook.name}: cell {index} did not finish within the {kind} limit of {limit:g} s "
            f"({type(e).__name__}); its kernel was shut down. Partial output: {out}") from e
    finally:
        if saved is None:
            os.environ.pop("QATLAB_HEADLESS", None)
        else:
            os.environ["QATLAB_HEADLESS"] = saved
        left = reap_kernels()
        if left:
            print(f"    killed {len(left)} kernel process(es) left behind: {left}", file=sys.stderr)
    return out, time.monotonic() - start


def _children_cpu_seconds():
    """User + system CPU seconds of this process's finished, waited-for children (and theirs):
    a kernel's CPU time once papermill has shut it down."""
    t = os.times()
    return t.children_user + t.children_system


_TQDM = re.compile(r"\d+%\|")


def _is_progress_bar(output):
    """A tqdm bar: a widget whose text repr is ``desc:  0%|...``, or a stderr stream of
    carriage-return-separated bar frames."""
    if output.get("output_type") == "display_data":
        data = output.get("data", {})
        return ("application/vnd.jupyter.widget-view+json" in data
                and bool(_TQDM.search(str(data.get("text/plain", "")))))
    if output.get("output_type") == "stream" and output.get("name") == "stderr":
        frames = [f for f in re.split(r"[\r\n]+", output.get("text", "")) if f.strip()]
        return bool(frames) and all(_TQDM.search(f) for f in frames)
    return False


def _is_blank_stream(output):
    """A stdout/stderr output with nothing but whitespace: the ``\\r   \\r`` frame a text-mode
    tqdm bar (``leave=False``) writes to clear itself, or a lone newline; rendered, an empty box."""
    return output.get("output_type") == "stream" and not output.get("text", "").strip()


def strip_progress_bars(nb):
    """Remove tqdm progress-bar outputs, and stream outputs that are only whitespace, from the
    nbformat notebook ``nb`` (in place); return how many were removed.

    >>> import nbformat
    >>> cell = nbformat.v4.new_code_cell("train()", outputs=[
    ...     nbformat.v4.new_output("display_data", data={
    ...         "text/plain": "epoch 1/8:   0%|          | 0/63 [00:00<?, ?it/s]",
    ...         "application/vnd.jupyter.widget-view+json": {"model_id": "abc"}}),
    ...     nbformat.v4.new_output("stream", name="stderr", text="\\r" + " " * 60 + "\\r"),
    ...     nbformat.v4.new_output("stream", name="stdout", text="trained in 7.5 s\\n")])
    >>> nb = nbformat.v4.new_notebook(cells=[cell])
    >>> strip_progress_bars(nb), [o.output_type for o in nb.cells[0].outputs]
    (2, ['stream'])
    """
    removed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = [o for o in cell.outputs if not (_is_progress_bar(o) or _is_blank_stream(o))]
        removed += len(cell.outputs) - len(kept)
        cell.outputs = kept
    return removed


def clean_executed(path):
    """Strip progress bars and blank stream outputs from the executed notebook at ``path``,
    rewriting it atomically."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if strip_progress_bars(nb):
        with atomic_path(path) as tmp:
            nbformat.write(nb, tmp)
    return path


def merge_results(build, stems, seconds, cpu_seconds=None):
    """Merge the per-notebook result files of ``stems`` into ``build/results.json``, with each
    notebook's wall time (``seconds``) and its kernel's CPU time (``cpu_seconds``) where given."""
    path = build / "results.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    for stem in stems:
        per_nb = build / "results" / f"{stem}.json"
        entry = json.loads(per_nb.read_text()) if per_nb.exists() else {}
        if stem in seconds:
            entry["seconds"] = round(seconds[stem], 1)
        if cpu_seconds and stem in cpu_seconds:
            entry["cpu_seconds"] = round(cpu_seconds[stem], 1)
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


def default_jobs(cpus=None, environ=None):
    """Notebooks ``make run`` executes at a time: one per CPU this process may use
    (:func:`qatlab.threads.available_cpus`), at most 4; ``QATLAB_JOBS`` overrides it.

    >>> default_jobs(2, environ={}), default_jobs(16, environ={}), default_jobs(2, environ={"QATLAB_JOBS": "1"})
    (2, 4, 1)
    """
    value = (os.environ if environ is None else environ).get("QATLAB_JOBS")
    if value:
        return positive_int(value, "QATLAB_JOBS (environment)")
    if cpus is None:
        from .threads import available_cpus

        cpus = available_cpus()
    return max(1, min(4, int(cpus)))


def kernel_threads(jobs, cpus=None, environ=None):
    """Torch threads of each kernel when ``jobs`` run at once: ``QATLAB_THREADS`` when set,
    else ``CPUs // jobs`` (at least 1), so that the kernels together use each CPU once.

    >>> kernel_threads(2, cpus=2, environ={}), kernel_threads(4, cpus=16, environ={}), kernel_threads(4, cpus=2, environ={})
    (1, 4, 1)
    """
    from .threads import available_cpus, choose_threads

    env = os.environ if environ is None else environ
    if env.get("QATLAB_THREADS"):
        return choose_threads(env)
    return max(1, int(available_cpus() if cpus is None else cpus) // jobs)


def run_order(notebooks, previous_seconds):
    """The order in which to start ``notebooks`` when several run at once: longest first.

    ``previous_seconds`` maps a stem to its wall time in the last run (``build/results.json``).
    A notebook without one goes first (it may be long), later notebooks of the course before
    earlier ones, which run shorter. Starting the long ones first keeps one long notebook from
    running alone at the end while the other CPUs idle (longest processing time first).

    >>> from pathlib import Path
    >>> nbs = [Path(f"{i:02d}_x.ipynb") for i in range(4)]
    >>> [p.stem[:2] for p in run_order(nbs, {"00_x": 20.0, "01_x": 90.0, "02_x": 5.0})]
    ['03', '01', '00', '02']
    """
    return sorted(notebooks, key=lambda nb: (nb.stem in previous_seconds,
                                             -previous_seconds.get(nb.stem, 0.0), -notebooks.index(nb)))


def run_one(notebook, executed_dir, html_dir, params, limits, threads=None):
    """Execute one notebook (:func:`execute`), clean and render it; return
    ``(stem, seconds or None, kernel CPU seconds, error message or None)``.

    With ``threads`` the kernel gets ``QATLAB_THREADS=threads``: :func:`run_notebooks` calls this
    in a process of its own per notebook, so its kernel is the only child :func:`reap_kernels`
    sees there and the CPU time of finished children is this notebook's alone.
    """
    if threads is not None:
        os.environ["QATLAB_THREADS"] = str(threads)
    before = _children_cpu_seconds()
    seconds = error = None
    try:
        _, seconds = execute(notebook, executed_dir, params, *limits)
    except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    cpu = _children_cpu_seconds() - before
    out = executed_dir / notebook.name
    if out.exists():
        clean_executed(out)
        render_notebook_html(out, html_dir)
    return notebook.stem, seconds, cpu, error


def run_notebooks(notebooks, executed_dir, html_dir, params, limits, jobs=1, previous_seconds=None):
    """Execute ``notebooks``, ``jobs`` at a time; return ``(seconds, cpu_seconds, failed)``.

    ``jobs=1``: one by one in the order given, in this process, each kernel with the threads
    it chooses itself. ``jobs > 1``: in :func:`run_order`, each notebook in a fresh worker
    process (``spawn``), each kernel with :func:`kernel_threads` threads. A notebook that fails
    or runs past its limit is reported and the others still run. Progress goes to stdout as
    each notebook finishes.
    """
    seconds, cpu, failed = {}, {}, []
    total = len(notebooks)
    jobs = max(1, min(jobs, total))

    def report(done, stem, secs, cpu_s, error):
        if error is None:
            seconds[stem], cpu[stem] = secs, cpu_s
            print(f"[{done}/{total}] {stem}: ok in {secs:.1f} s ({cpu_s:.1f} s of CPU in its kernel)", flush=True)
        else:
            failed.append(stem)
            print(f"[{done}/{total}] {stem}: FAILED: {error}\n    see {executed_dir / (stem + '.ipynb')}",
                  flush=True)

    if jobs == 1:
        for i, nb in enumerate(notebooks, 1):
            print(f"[{i}/{total}] {nb.name} ...", flush=True)
            report(i, *run_one(nb, executed_dir, html_dir, params, limits))
        return seconds, cpu, failed

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = kernel_threads(jobs)
    order = run_order(list(notebooks), previous_seconds or {})
    print(f"{total} notebook(s), {jobs} at a time, {threads} torch thread(s) per kernel, longest first: "
          f"{', '.join(nb.stem[:2] for nb in order)}", flush=True)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               max_tasks_per_child=1)
    with pool:
        futures = {pool.submit(run_one, nb, executed_dir, html_dir, params, limits, threads): nb for nb in order}
        for done, future in enumerate(as_completed(futures), 1):
            nb = futures[future]
            try:
                result = future.result()
            except Exception as e:  # the worker process itself died (killed, out of memory)
                result = (nb.stem, None, math.nan, f"{type(e).__name__}: {e}")
            report(done, *result)
    return seconds, cpu, failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qatlab.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 03")
    parser.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="papermill parameter for every notebook (VALUE parsed as JSON when it can be)")
    parser.add_argument("--cell-timeout", type=float, default=None, metavar="S",
                        help=f"seconds a cell may run (default: $QATLAB_CELL_TIMEOUT or {CELL_TIMEOUT})")
    parser.add_argument("--notebook-timeout", type=float, default=None, metavar="S",
                        help=f"seconds a notebook may run (default: $QATLAB_NOTEBOOK_TIMEOUT or "
                             f"{NOTEBOOK_TIMEOUT})")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="notebooks executed at a time, each in its own kernel with CPUs // N torch threads "
                             "(default: $QATLAB_JOBS or one per CPU this process may use, at most 4; "
                             "1 = one by one, each with every CPU)")
    args = parser.parse_args(argv)

    def parse(v):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    params = {k: parse(v) for k, v in args.p}
    try:
        limits = time_limits(args.cell_timeout, args.notebook_timeout)
        jobs = default_jobs() if args.jobs is None else positive_int(args.jobs, "--jobs")
    except ValueError as e:
        parser.error(str(e))
    notebooks = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in args.only)]
        if not notebooks:
            parser.error(f"no notebook matches --only {args.only}")
    build = build_dir()
    executed_dir, html_dir = build / "executed", build / "html"
    executed_dir.mkdir(parents=True, exist_ok=True)
    html_dir.mkdir(parents=True, exist_ok=True)
    previous = build / "results.json"
    try:
        previous_seconds = {stem: float(entry["seconds"]) for stem, entry in json.loads(previous.read_text()).items()
                            if isinstance(entry, dict) and isinstance(entry.get("seconds"), int | float)}
    except (OSError, ValueError):  # no earlier run, or an unreadable file: course order
        previous_seconds = {}
    jobs = min(jobs, len(notebooks))   # `--only 05` runs alone, with every CPU
    started = time.monotonic()
    seconds, cpu, failed = run_notebooks(notebooks, executed_dir, html_dir, params, limits, jobs=jobs,
                                         previous_seconds=previous_seconds)
    merged = merge_results(build, [nb.stem for nb in notebooks], seconds, cpu)
    glossary = repo_root() / "notebooks" / "glossary.md"
    if glossary.exists():
        render_glossary(glossary, html_dir)
    write_index(html_dir, merged, repo_root() / "notebooks")
    print()
    print(format_table(merged))
    print(f"\n{len(seconds)} notebook(s) in {time.monotonic() - started:.0f} s of wall time, {jobs} at a time "
          f"({sum(cpu.values()):.0f} s of CPU in their kernels; on a busy machine, or beside another kernel, "
          f"the wall time grows, the CPU time much less)")
    print(f"\nresults: {build / 'results.json'}\nhtml:    {html_dir / 'index.html'}")
    if failed:
        print(f"\nFAILED notebooks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
