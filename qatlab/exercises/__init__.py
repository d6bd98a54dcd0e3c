"""Checks for the notebooks' exercises: each passes on a right answer and, on a
wrong one, raises :class:`ExerciseError` with a hint that says what differs,
where and by how much.

The checks live in one module per notebook (``ex01`` … ``ex12``; notebook 10 has none); every
``check_*`` name is also reachable here, e.g. ``qatlab.exercises.check_quantize``.
"""

from importlib import import_module

from ._common import ExerciseError, passed

_MODULES = ("ex01", "ex02", "ex03", "ex04", "ex05", "ex06", "ex07", "ex08", "ex09", "ex11", "ex12")

__all__ = ["ExerciseError", "passed"]


def __getattr__(name):
    if name in _MODULES:
        return import_module(f".{name}", __name__)
    if name.startswith("check_"):
        for mod in _MODULES:
            try:
                module = import_module(f".{mod}", __name__)
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{mod}":
                    raise
                continue
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
