"""How many threads torch should use: the CPUs this process may really use, not the machine's.

Taught in 00_start_here (its environment check prints the choice).

torch starts one intra-op thread per core it sees, and it sees every core of the machine. On a
shared machine that is too many: a classroom's JupyterHub runs many kernels at once, and a
container's CPU quota (cgroups) is invisible to torch. Threads that outnumber the CPUs they can
run on wait for each other at every parallel region; 40 SGD steps of the course's CNN took 0.53 s
alone on 2 cores, 3.18 s beside one busy process, and 0.71 s there with 1 thread.

:func:`available_cpus` is the smallest of

- the CPUs this process may run on (``os.sched_getaffinity``, set by ``taskset`` or a container's
  ``--cpuset-cpus``), and
- the CPU quota of its cgroup, rounded up: ``ceil(quota / period)`` from ``cpu.max`` (cgroup v2) or
  ``cpu.cfs_quota_us / cpu.cfs_period_us`` (v1), set by ``docker --cpus`` or Kubernetes limits.

:func:`choose_threads` returns that, unless the environment variable ``QATLAB_THREADS`` says
otherwise; :func:`set_threads` applies it to torch. Every notebook's setup cell calls
``qatlab.set_threads()``.
"""

import math
import os
from pathlib import Path

ENV = "QATLAB_THREADS"
CGROUP = Path("/sys/fs/cgroup")


def _cgroup_quota(root=CGROUP):
    """CPUs allowed by the cgroup quota (a float), or ``None`` when there is no quota."""
    v2 = root / "cpu.max"
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.exists() and p.exists():
            quota, period = int(q.read_text()), int(p.read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def available_cpus(cgroup_root=CGROUP):
    """The CPUs this process may use: ``min(affinity, ceil(cgroup quota))``, at least 1.

    >>> available_cpus() >= 1
    True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None and quota > 0:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def choose_threads(environ=None, cgroup_root=CGROUP):
    """``QATLAB_THREADS`` if set (a positive int), else :func:`available_cpus`.

    >>> choose_threads({"QATLAB_THREADS": "1"})
    1
    >>> choose_threads({"QATLAB_THREADS": "two"})
    Traceback (most recent call last):
    ...
    ValueError: QATLAB_THREADS must be a positive integer, got 'two'
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV)
    if value is None or value == "":
        return available_cpus(cgroup_root)
    return positive_int(value, ENV)


def positive_int(value, name):
    """``value`` as an int >= 1 (a string such as ``"2"`` too), else ``ValueError`` naming ``name``.

    >>> positive_int("3", "QATLAB_JOBS")
    3
    >>> positive_int(0, "--jobs")
    Traceback (most recent call last):
    ...
    ValueError: --jobs must be a positive integer, got 0
    """
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def set_threads(n=None):
    """Set torch's intra-op threads to ``n`` (default :func:`choose_threads`); return ``n``.

    >>> import torch
    >>> set_threads(1), torch.get_num_threads()
    (1, 1)
    """
    import torch

    if n is None:
        n = choose_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    torch.set_num_threads(n)
    return n


def describe_threads():
    """One line for an environment check: the choice and where it came from."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    quota = _cgroup_quota()
    source = (f"{ENV}={os.environ[ENV]}" if os.environ.get(ENV) else
              f"{affinity} CPUs in this process's affinity mask"
              + (f", cgroup quota {quota:g} CPUs" if quota is not None else ", no cgroup CPU quota"))
    return (f"torch threads: {torch.get_num_threads()} (chosen: {choose_threads()}; from {source}; "
            f"the machine has {os.cpu_count()} CPUs; set {ENV}=N to override)")
