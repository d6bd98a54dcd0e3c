"""Silence output that teaches nothing, so the warnings a notebook shows are the ones that matter.

Four kinds of noise, four tools:

- **library log lines** (Python ``logging``): :func:`silence_noise` raises the
  level of the loggers in :data:`NOISY_LOGGERS`. Every notebook calls it once
  in its setup cell, before torchao or ExecuTorch is imported.
- **Python warnings nobody can act on**: :func:`silence_noise` also ignores the
  warnings in :data:`NOISY_WARNINGS` (emitted inside torch's own default
  qconfigs). It never hides a warning a lesson relies on: torch's deprecation
  of its eager quantization API is shown once, where it teaches something
  (04_qat_training), and :func:`silence_legacy_api` quiets it afterwards.
- **native (C++) log lines** written straight to file descriptor 2, which no
  Python filter sees: ExecuTorch's runtime reports its CPU probing
  (``cpuinfo_utils.cpp``) and every thread-pool reset (``threadpool.cpp``).
  :func:`native_stderr_filtered` redirects the descriptor for the length of a
  ``with`` block, then re-emits every line that is *not* in
  :data:`NATIVE_NOISE`, so a real error from the runtime still shows.
- **machine paths in warnings**: Python prints a warning as
  ``/home/you/.../qatlab/baseline.py:119: UserWarning: ... at /home/you/.../build/x.pt``
  plus the source line. :func:`plain_warnings` prints ``UserWarning: ... at build/x.pt``:
  the same message, with the checkout and build folders written as ``<repo>`` and ``build``.
"""

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

# logger name -> why its messages are noise for a reader of these notebooks
NOISY_LOGGERS = {
    # torchao registers its KernelPreference enum with torch's pytree; torch 2.14 logs a
    # deprecation of that internal call at import time, once per process.
    "torch.utils._pytree": "torchao's KernelPreference register_constant() deprecation at import",
}

# (message regex, category) -> why nobody reading a notebook can act on it
NOISY_WARNINGS = {
    (r"Please use quant_min and quant_max to specify the range for observers", UserWarning):
        "raised inside torch's own x86 default qconfigs (reduce_range=True); "
        "qatlab.qat.make_qconfig passes quant_min/quant_max itself",
}

# the legacy eager API's deprecation messages: shown once where they teach, then quiet
LEGACY_WARNINGS = {
    (r"torch\.ao\.quantization is deprecated", DeprecationWarning):
        "torch's eager / FX quantization API is deprecated in favour of torchao",
    (r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor", UserWarning):
        "quantized tensors (quint8, qint8, qint32), which eager int8 modules hold, are deprecated",
}

# native log lines (a regex per line) that report the runtime's own housekeeping
NATIVE_NOISE = (
    r"^\[cpuinfo_utils\.cpp:\d+\]",                     # ExecuTorch probing /sys for the CPU model
    r"^\[threadpool\.cpp:\d+\] Resetting threadpool",   # ExecuTorch: thread pool resized on load
)


def silence_noise(level=logging.ERROR):
    """Quiet the loggers in :data:`NOISY_LOGGERS` and the warnings in :data:`NOISY_WARNINGS`.

    Raises each logger's level to ``level`` and installs an "ignore" filter per
    warning. Returns the logger names. Call it in the setup cell, before
    importing torchao or ExecuTorch. Taught in 00_start_here.

    >>> "torch.utils._pytree" in silence_noise()
    True
    """
    if not isinstance(level, int) or isinstance(level, bool):
        raise TypeError(f"level must be a logging level (int), got {level!r}")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    return sorted(NOISY_LOGGERS)


def silence_legacy_api():
    """Ignore the deprecation warnings of torch's eager quantization API from here on.

    Call it right after the cell that shows the warning once (04_qat_training,
    05_deployment). Returns the number of filters installed.

    >>> silence_legacy_api()
    2
    """
    for message, category in LEGACY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    return len(LEGACY_WARNINGS)


@dataclass
class NativeOutput:
    """What :func:`native_stderr_filtered` captured: lines dropped as noise, lines passed on."""

    dropped: list = field(default_factory=list)
    kept: list = field(default_factory=list)


def _is_noise(line, patterns):
    return any(re.search(p, line) for p in patterns)


def _flush_c_stdio():
    """``fflush(NULL)``: push out what the C library buffers for every open stream."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def native_stderr_filtered(patterns=NATIVE_NOISE):
    """Capture file descriptor 2 inside the block; re-emit the lines that are not noise.

    Native libraries (ExecuTorch's C++ runtime) write log lines with
    ``write(2, ...)``, below Python's ``sys.stderr``, or hand them to
    ``sys.stderr`` in pieces from C++, so neither ``warnings`` nor ``logging``
    can filter them, and Jupyter shows each piece as its own output. Inside
    the block descriptor 2 points at a temporary file and ``sys.stderr`` at a
    buffer; on exit (also on an exception) both are restored and every
    captured line that matches none of ``patterns`` (regexes) is written to
    ``sys.stderr``. Yields a
    :class:`NativeOutput` that lists the dropped and the kept lines.
    Used by :func:`qatlab.deploy.load_executorch`; taught in 05_deployment.

    >>> with native_stderr_filtered() as out:
    ...     _ = os.write(2, b"[threadpool.cpp:66] Resetting threadpool to 2 threads.\\n")
    >>> out.dropped
    ['[threadpool.cpp:66] Resetting threadpool to 2 threads.']
    """
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"patterns must be a sequence of regex strings, got {patterns!r}")
    result = NativeOutput()
    with contextlib.suppress(AttributeError, ValueError):
        sys.stderr.flush()
    saved = os.dup(2)
    python_side = io.StringIO()  # extensions may also route their log through Python's sys.stderr
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield result
        finally:
            _flush_c_stdio()  # native code may still hold lines in the C library's stderr buffer
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace") + "\n" + python_side.getvalue()
            for line in text.splitlines():
                if not line.strip():
                    continue
                (result.dropped if _is_noise(line, patterns) else result.kept).append(line)
            if result.kept:
                sys.stderr.write("\n".join(result.kept) + "\n")
                with contextlib.suppress(AttributeError, ValueError):
                    sys.stderr.flush()


def _relative_paths(text):
    from .files import build_dir, repo_root

    for folder, name in ((build_dir(), "build"), (repo_root(), "<repo>")):
        text = text.replace(str(folder.resolve()), name).replace(str(folder), name)
    return text


def format_warning_plainly(message, category, filename, lineno, line=None):
    """``"<Category>: <message>\\n"`` with the build and checkout folders shortened; no file, line or source.

    The signature of :func:`warnings.formatwarning`, which :func:`plain_warnings` replaces.

    >>> format_warning_plainly("no checkpoint: training it now", UserWarning, "/x/qatlab/baseline.py", 119)
    'UserWarning: no checkpoint: training it now\\n'
    """
    return f"{category.__name__}: {_relative_paths(str(message))}\n"


def plain_warnings():
    """Show every warning from here on as ``Category: message``, paths of this checkout shortened.

    A warning still shows (nothing is filtered); only the machine-specific prefix (the
    absolute path and line of the code that warned, and its source line) goes, and the build
    folder reads ``build``. Returns the previous formatter, which
    ``warnings.formatwarning = previous`` restores. Called in the setup cell of notebooks
    04-08.

    >>> previous = plain_warnings()
    >>> warnings.formatwarning("careful", UserWarning, "/abs/path/file.py", 3)
    'UserWarning: careful\\n'
    >>> warnings.formatwarning = previous
    """
    previous = warnings.formatwarning
    warnings.formatwarning = format_warning_plainly
    return previous
