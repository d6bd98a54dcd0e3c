"""Record a notebook's measured results, and compare ours with torch's.

Taught in 00_start_here. A notebook starts with ``begin_notebook("00_start_here")``
and then calls ``record("fp32_acc", acc)``; each value is written, quietly, to
``build/results/<notebook>.json``, and ``make run`` merges those files into
``build/results.json``. The notebook itself states its numbers in sentences and in its
summary, printed from the same values; a bare ``recorded x = 0.97`` line teaches nothing.
"""

import json
import math
import numbers
import sys
import time

from .files import atomic_path, build_dir

_state = {"notebook": None, "started": None}
comparisons = []  # (name, exact, close, max_diff) of every cmp() since begin_notebook


def begin_notebook(name):
    """Start a notebook's results: forget old values and earlier comparisons."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"notebook name must be a plain file stem, got {name!r}")
    _state.update(notebook=name, started=time.time())
    comparisons.clear()
    path = _results_path()
    path.unlink(missing_ok=True)
    return path


def _results_path():
    if _state["notebook"] is None:
        raise RuntimeError("call qatlab.begin_notebook('<notebook stem>') before qatlab.record(...)")
    return build_dir() / "results" / f"{_state['notebook']}.json"


def record(name, value, *, show=False):
    """Store ``name = value`` in ``build/results/<notebook>.json`` and return ``value``.

    ``value`` must be a finite real number (bools are stored as 0/1). Beside it the file keeps
    ``torch_threads``: torch's thread count when the notebook last recorded a value, so every
    timing in it says how many threads it ran with.

    Quiet by default: the notebook prints its numbers in sentences (an f-string beside the
    measurement, and the summary at its end). ``show=True`` also prints one line,
    ``recorded <notebook>.<name> = <value>``, for debugging. Taught in 00_start_here.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"metric name must be an identifier-like string, got {name!r}")
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
    path = _results_path()
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = value
    if "torch" in sys.modules:  # the threads this notebook's timings ran with (qatlab.set_threads)
        results["torch_threads"] = sys.modules["torch"].get_num_threads()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    if show:
        print(f"recorded {_state['notebook']}.{name} = {value:.6g}")
    return value


def cmp(name, ours, ref, rtol=1e-5, atol=1e-8):
    """Compare our tensor with torch's reference, print one line, return ``exact``.

    The line reads ``name | exact: True | close: True | maxdiff: 0.00e+00``
    (in the style of micrograd / nn-zero-to-hero). The return value is whether
    the two are bit-for-bit equal, so a notebook can ``assert cmp(...)``; use
    ``close`` from :data:`comparisons` when round-off is expected.

    >>> import torch
    >>> cmp("same", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    same            | exact: True  | close: True  | maxdiff: 0.00e+00
    True
    """
    import torch

    ours, ref = torch.as_tensor(ours).detach(), torch.as_tensor(ref).detach()
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shapes differ, ours {tuple(ours.shape)} vs ref {tuple(ref.shape)}")
    exact = bool(torch.equal(ours, ref))
    diff = (ours.double() - ref.double()).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    close = bool(torch.allclose(ours.double(), ref.double(), rtol=rtol, atol=atol))
    comparisons.append((name, exact, close, max_diff))
    print(f"{name:15s} | exact: {exact!s:5} | close: {close!s:5} | maxdiff: {max_diff:.2e}")
    return exact
