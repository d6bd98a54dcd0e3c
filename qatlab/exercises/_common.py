"""What every exercise check shares: the error it raises, the success message, and the
guards that turn a learner's slip (not a function, a crash, ``None``, a number of an
unexpected type, an input changed in place) into a hint instead of a traceback."""

import numbers
from fractions import Fraction

import torch


class ExerciseError(AssertionError):
    """A wrong answer. The message is the hint: what differs, where, by how much."""


def passed(name):
    """Print the success line and return True (so a check cell can be asserted)."""
    print(f"✅ {name}: correct")
    return True


def require_callable(fn, name):
    """Raise a hint unless ``fn`` can be called (a value passed instead of the function)."""
    if not callable(fn):
        raise ExerciseError(f"pass your function itself, {name}, not its result or another value "
                            f"(got {type(fn).__name__}: {_short(fn)})")


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tensors(values, copy):
    """The tensors among ``values`` (also inside lists/tuples/dicts), by position; cloned when
    ``copy`` (a snapshot to compare against later), else detached views of the current ones."""
    out = {}

    def visit(key, v):
        if isinstance(v, torch.Tensor):
            out[key] = v.detach().clone() if copy else v.detach()
        elif isinstance(v, list | tuple):
            for i, item in enumerate(v):
                visit(f"{key}[{i}]", item)
        elif isinstance(v, dict):
            for k, item in v.items():
                visit(f"{key}[{k!r}]", item)

    for key, v in values.items():
        visit(key, v)
    return out


def _unchanged(old, new):
    if new.shape != old.shape or new.dtype != old.dtype:
        return False
    if torch.equal(new, old):
        return True
    return bool(new.is_floating_point() and torch.allclose(new, old, rtol=0, atol=0, equal_nan=True))


def call(fn, what, *args, on_error=None, allow_none=False, **kwargs):
    """Call the learner's ``fn(*args, **kwargs)`` and return its result, with hints for slips.

    ``what`` names the call in messages (e.g. ``"my_quantize(x, 0.5, 0, -8, 7)"``).
    ``NotImplementedError`` (the stub of a student copy) and :class:`ExerciseError`
    pass through unchanged; any other exception becomes an :class:`ExerciseError`
    naming the call and the exception, with ``on_error(exc)``'s hint when it returns
    one. A ``None`` result (a forgotten ``return``) and a tensor argument changed in
    place are reported too.
    """
    named = {f"argument {i + 1}": a for i, a in enumerate(args)}
    named.update({f"argument {k}": v for k, v in kwargs.items()})
    before = _tensors(named, copy=True)
    try:
        result = fn(*args, **kwargs)
    except (NotImplementedError, ExerciseError):
        raise
    except Exception as e:  # noqa: BLE001 - the learner's code may raise anything; say where
        hint = on_error(e) if on_error is not None else None
        raise ExerciseError(f"{what} raised {type(e).__name__}: {e}"
                            + (f". {hint}" if hint else "")) from e
    after = _tensors(named, copy=False)
    for key, old in before.items():
        new = after.get(key)
        if new is not None and not _unchanged(old, new):
            raise ExerciseError(f"{what} changed its input ({key}) in place: an in-place "
                                f"operation (x.div_(...), x /= s, x[...] = ..., .clamp_(...)) "
                                f"overwrites the caller's tensor. Compute a new tensor instead")
    if result is None and not allow_none:
        raise ExerciseError(f"{what} returned None: did you forget the `return` statement?")
    return result


def as_number(value, what):
    """``value`` as a float when it is one number (int, float, Fraction, numpy scalar, one-element
    tensor or array); a hint naming ``what`` otherwise."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        raise ExerciseError(f"{what} should be a number, got {type(value).__name__} {_short(value)}")
    if isinstance(value, numbers.Real) or isinstance(value, Fraction):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return float(value.detach().reshape(-1)[0])
        raise ExerciseError(f"{what} should be one number, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
    try:  # numpy scalars and one-element arrays
        import numpy as np

        if isinstance(value, np.generic | np.ndarray) and np.size(value) == 1 \
                and np.issubdtype(np.asarray(value).dtype, np.number) \
                and not np.issubdtype(np.asarray(value).dtype, np.complexfloating):
            return float(np.asarray(value).reshape(-1)[0])
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    raise ExerciseError(f"{what} should be a number, got {type(value).__name__} {_short(value)}")


def as_int(value, what):
    """``value`` as an int when it is a whole number of any numeric type (109, 109.0,
    ``numpy.int64(109)``, ``torch.tensor(109)``); a hint naming ``what`` otherwise."""
    number = as_number(value, what)
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise ExerciseError(f"{what} should be a whole number, got {number!r}")
    return int(number)


def as_sequence(value, length, what, names=None):
    """``value`` as a list of ``length`` items when it is a tuple, list, array or 1-D tensor of
    that length; a hint naming ``what`` (and the expected ``names``) otherwise."""
    expected = f"({', '.join(names)})" if names else f"{length} values"
    if isinstance(value, tuple | list):
        items = list(value)
    elif isinstance(value, torch.Tensor) and value.dim() == 1:
        items = list(value.detach())
    else:
        try:
            import numpy as np

            if isinstance(value, np.ndarray) and value.ndim == 1:
                items = list(value)
            else:
                items = None
        except ImportError:  # pragma: no cover
            items = None
    if items is None:
        raise ExerciseError(f"{what} should return {expected}, got {type(value).__name__} "
                            f"{_short(value)}")
    if len(items) != length:
        raise ExerciseError(f"{what} should return {expected}: {length} values, got {len(items)}")
    return items


def as_tensor_result(value, what):
    """``value`` detached when it is a tensor; a hint naming ``what`` otherwise (a numpy array
    or a list is not what the exercise asks for: torch's kernels take tensors)."""
    if not isinstance(value, torch.Tensor):
        raise ExerciseError(f"{what} should return a torch.Tensor, got {type(value).__name__}"
                            + (" (torch.from_numpy turns an array into one)"
                               if type(value).__module__.startswith("numpy") else ""))
    return value.detach()
