"""Where qatlab reads and writes, and how it writes without leaving half a file.

``build_dir()`` holds everything a run produces (checkpoints, results, executed
notebooks); ``data_dir()`` holds dataset caches; ``cache_dir()`` holds what any run may
reuse (torchao's pattern graphs, :mod:`qatlab.patterns`). They can be moved with the
environment variables ``QATLAB_BUILD``, ``QATLAB_DATA`` and ``QATLAB_CACHE`` (the tests use
this to run in a scratch folder).
"""

import contextlib
import os
import tempfile
from pathlib import Path


def repo_root():
    """The checkout that holds qatlab, or the current folder for a plain install."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def build_dir():
    """``$QATLAB_BUILD`` or ``<repo>/build``, created on demand."""
    path = Path(os.environ.get("QATLAB_BUILD") or repo_root() / "build")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir():
    """``$QATLAB_CACHE`` or ``<repo>/build/cache``, created on demand: what a run may reuse from any other run.

    Unlike :func:`build_dir` it does not follow ``QATLAB_BUILD``, so runs with build folders of their
    own (the tests' scratch folders) share it. ``make test`` points it at ``build/test/cache``.
    """
    path = Path(os.environ.get("QATLAB_CACHE") or repo_root() / "build" / "cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir():
    """``$QATLAB_DATA`` or ``<repo>/data``, created on demand."""
    path = Path(os.environ.get("QATLAB_DATA") or repo_root() / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def shown_path(path):
    """``path`` as a log line should show it: relative to the current folder (``build/...`` from the
    repository, ``../build/...`` from ``notebooks/``), so a log does not print this machine's folders;
    the path as given when it is not below the current folder's parent.

    >>> import os
    >>> shown_path(os.path.join(os.getcwd(), "build", "x.pt")) == os.path.join("build", "x.pt")
    True
    """
    path = os.fspath(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:   # another drive on Windows
        return path
    return path if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; move it into place only on success.

    A crash or an exception while writing leaves the old file (or nothing)
    behind, never half a file:

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock tied to ``path`` (on ``.<name>.lock`` beside it) for the block.

    Two processes that make the same file (two kernels of a class, two test workers training
    the same baseline) take turns: the second waits, then finds the file made and loads it
    instead of making it again. The lock is ``fcntl.flock``, released when the block ends
    or the process dies; where ``fcntl`` does not exist (Windows) the block runs unlocked.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "model.pt"
    >>> with locked(target):
    ...     target.exists()
    False
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
