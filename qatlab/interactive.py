"""Widgets where a person is looking, one static picture where nobody is.

Taught in 01_fake_quant_math (the first explorer); used by every notebook with sliders.

:func:`interact` is ``ipywidgets.interact`` in JupyterLab. In a *headless* run (``make run``,
the papermill and nbval tests: :data:`ENV` is set by :mod:`qatlab.runner` and ``tests/conftest.py``)
there is no front end to draw controls, so it calls the function once with the values the controls
would start at and says so. The executed notebook and its HTML page then show a real plot instead
of a widget that cannot render offline.

It also keeps headless runs off a fragile path. A live ``interact`` puts its output in an ``Output``
widget; a headless client (nbclient, used by papermill) imitates the front end's ``Output`` widget
and answers every output captured in it with a ``comm_msg`` on the shell channel, while the kernel is
still executing the cell. That traffic, which only widget cells cause, is where executions were seen
to stall with ipykernel 7 (see ``scripts/stress_kernels``).
"""

import inspect
import os
from types import SimpleNamespace

ENV = "QATLAB_HEADLESS"


def headless():
    """True when no front end will draw widgets: ``QATLAB_HEADLESS`` is set to a non-empty value
    other than ``0``.

    >>> headless() in (True, False)
    True
    """
    return os.environ.get(ENV, "") not in ("", "0")


def start_values(fn, **controls):
    """The keyword arguments ``ipywidgets.interact(fn, **controls)`` first calls ``fn`` with.

    Controls are widgets, ``fixed(...)`` values or interact's abbreviations: a ``(min, max[, step])``
    tuple starts at the function's default for that argument if it has one, else at its middle; a
    list at its first item; a bool or number at itself.

    >>> def f(bits, mode, scale, width=4):
    ...     pass
    >>> start_values(f, bits=(2, 8), mode=["minmax", "histogram"], scale=0.5, width=(1, 9))
    {'bits': 5, 'mode': 'minmax', 'scale': 0.5, 'width': 4}
    """
    from ipywidgets import interactive

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    shim = SimpleNamespace(signature=lambda: inspect.signature(fn))
    values = {}
    for name, abbrev, default in interactive.find_abbreviations(shim, controls):
        widget = interactive.widget_from_abbrev(abbrev, default)
        if widget is None:
            raise ValueError(f"{abbrev!r} (argument {name!r}) cannot be turned into a widget")
        values[name] = widget.value
        if widget is not abbrev and hasattr(widget, "close"):
            widget.close()  # a widget made only to read its start value
    return values


def interact(fn, /, **controls):
    """``ipywidgets.interact(fn, **controls)``; in a headless run, ``fn(**start_values(...))`` once.

    Returns what ``ipywidgets.interact`` returns, or ``fn``'s return value when headless.
    """
    if not headless():
        from ipywidgets import interact as live_interact

        return live_interact(fn, **controls)
    values = start_values(fn, **controls)
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if not _is_fixed(controls.get(k)))
    print(f"(drawn once for {shown or 'its defaults'}: run this cell in JupyterLab for the controls)")
    return fn(**values)


def _is_fixed(control):
    from ipywidgets import fixed

    return isinstance(control, fixed)
