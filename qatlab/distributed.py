"""torch.distributed for QAT: who am I, gather and broadcast state, RNG, digests, and launching jobs.

Taught in 08_qat_at_scale; used by :mod:`qatlab.train_qat` (inside every process) and by the
notebook and tests (which start ``torchrun`` jobs and must leave no process behind).

Two halves:

- **inside a rank**: :func:`init_distributed` (joins torchrun's group: gloo on CPU, nccl with
  CUDA), :func:`gather_to_rank0`, :func:`broadcast_state`, :func:`capture_rng` /
  :func:`restore_rng`, :func:`state_digest`, :func:`max_rel_diff`. Every collective is
  ``torch.distributed``'s own.
- **outside, launching**: :func:`torchrun_command` builds a ``torchrun`` command with a loopback
  rendezvous (``127.0.0.1``, a free port), and :class:`Job` runs it. ``torchrun`` starts each
  worker in a **session of its own** (``start_new_session=True`` in torch's elastic
  launcher), so killing the launcher's process group does not reach the workers: a
  ``SIGKILL`` to ``torchrun`` alone leaves orphaned workers training on. :class:`Job` tags
  every process of the job with an environment variable, finds them all in ``/proc`` (Linux),
  kills every process group among them, and can prove that none is left.
"""

import datetime
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

TAG = "QATLAB_JOB"


def _env_world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- inside a rank: the process group ------------------------------------------------------

@dataclass
class Dist:
    """Who this process is: ``rank`` of ``world_size``, its device and backend.

    Taught in 08_qat_at_scale.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: str = "cpu"
    store_prefix: str | None = None  # where this round's keys live in torchrun's shared store

    @property
    def distributed(self):
        return self.world_size > 1


SHARED_STORE_OPT_OUT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_store_prefix(env):
    """The key prefix that keeps a restarted round away from the failed round's keys, or ``None``.

    ``env`` is the worker's environment (``os.environ``), as torchrun sets it. torchrun's
    launcher hosts the store the workers meet in (``TORCHELASTIC_USE_AGENT_STORE=True``) and
    keeps it across ``--max-restarts`` restarts, with every key the failed round wrote, such
    as each rank's gloo/nccl address (pytorch/pytorch#135712). On one node every worker has
    the same launcher, hence the same ``TORCHELASTIC_RESTART_COUNT``: a prefix named after it
    separates the rounds. Across nodes each launcher counts its own restarts, and the counts
    can differ (same issue), so no prefix is safe there: this returns ``None``, and
    :func:`init_distributed` asks for ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives
    every round a fresh store. Taught in 08_qat_at_scale.

    >>> restart_store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2",
    ...                       "GROUP_WORLD_SIZE": "1"})
    'qatlab/restart_2/'
    >>> restart_store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}) is None
    True
    >>> restart_store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RESTART_COUNT": "1"}) is None
    True
    >>> restart_store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "1",
    ...                       "GROUP_WORLD_SIZE": "2"}) is None
    True
    """
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    one_node = int(env.get("GROUP_WORLD_SIZE", "1")) == 1
    return f"qatlab/restart_{restart}/" if shared and restart > 0 and one_node else None


def shared_store_warning(env):
    """Why a torchrun job on several nodes with ``--max-restarts`` needs a fresh store per round, or ``None``.

    Taught in 08_qat_at_scale (see :func:`restart_store_prefix`).

    >>> env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3"}
    >>> "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_warning(env)
    True
    >>> shared_store_warning({**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # the variable is set
    True
    >>> shared_store_warning({**env, "GROUP_WORLD_SIZE": "1"}) is None  # one node: restart_store_prefix
    True
    """
    if (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("GROUP_WORLD_SIZE", "1")) > 1
            and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        return (f"torchrun on several nodes with --max-restarts keeps one rendezvous store across restarts, "
                f"and a restarted rank can read a dead rank's address from it; the nodes' restart counts "
                f"can differ, so no key prefix separates the rounds (pytorch/pytorch#135712). Set "
                f"{SHARED_STORE_OPT_OUT}=1 for torchrun on every node: each round then gets a fresh store")
    return None


def init_distributed(backend="auto", timeout=600.0):
    """Join torchrun's process group (``env://``) when there is one; return a :class:`Dist`.

    Without torchrun's ``WORLD_SIZE`` (or with 1) there is no group: one plain process.
    ``backend="auto"`` picks nccl when CUDA is present, else gloo. After a torchrun restart
    on one node, the group's keys go under :func:`restart_store_prefix` in torchrun's shared
    store (``Dist.store_prefix``). On several nodes with ``--max-restarts``, rank 0 warns
    unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. Taught in 08_qat_at_scale.
    """
    import torch
    import torch.distributed as dist

    world = _env_world_size()
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device="cuda" if cuda else "cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("--backend nccl needs CUDA GPUs; this machine has none: use gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank = int(os.environ["RANK"])
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    wait = datetime.timedelta(seconds=timeout)
    prefix = restart_store_prefix(os.environ)
    warning = shared_store_warning(os.environ)
    if rank == 0 and warning:
        import warnings

        warnings.warn(warning, stacklevel=2)
    if prefix is not None:
        store = dist.PrefixStore(prefix, dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=wait))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
    else:
        dist.init_process_group(backend, timeout=wait)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, prefix)


def gather_to_rank0(obj, d):
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere): ``torch.distributed.gather_object``.

    Taught in 08_qat_at_scale.
    """
    if not d.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size if d.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_state(model, d, src=0):
    """Copy rank ``src``'s parameters and buffers into every rank's ``model``, in place.

    After it, every rank holds the same QAT state (weights, BN statistics, observers,
    scale and zero-point), so every rank's ``convert`` gives the same int8 model.
    Uses ``torch.distributed.broadcast``. Taught in 08_qat_at_scale.
    """
    if not d.distributed:
        return model
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src)
    return model


def wrap_ddp(model, cfg, d):
    """``DistributedDataParallel(model)`` with ``cfg.forward_sync_buffers``. Taught in 08_qat_at_scale.

    torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers``. Both copy rank 0's
    buffers to every rank at the start of each forward when ``True``. With ``False`` the new
    flag still copies them once, when DDP wraps the model; the old one skipped that copy too.
    Here that copy is harmless: the ranks' buffers are equal before training, and a resumed
    rank loads its own state *after* wrapping.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None,
               **{name: cfg.forward_sync_buffers})


# --- state: RNG, digests, scales ------------------------------------------------------------

def capture_rng():
    """Every RNG a training step may draw from, as weights-only-loadable data.

    ``{"torch": ByteTensor, "cuda": [ByteTensor...], "numpy": {...}, "python": tuple}``;
    numpy's key array is stored as a tensor (``weights_only`` loads no numpy arrays).

    Taught in 08_qat_at_scale.
    """
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def restore_rng(state):
    """Inverse of :func:`capture_rng`.

    Taught in 08_qat_at_scale.

    >>> import torch
    >>> s = capture_rng(); a = torch.rand(3); restore_rng(s); torch.equal(a, torch.rand(3))
    True
    """
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def state_digest(state):
    """SHA-256 (16 hex digits) of a state dict, bit for bit, including quantized tensors.

    Two models have the same digest exactly when every tensor has the same dtype, shape and
    bits (for int8 tensors: the integers, scales and zero-points). Taught in 08_qat_at_scale.

    >>> import torch
    >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(2)})
    True
    >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.tensor([0.0, -0.0])})
    False
    >>> scale = torch.ones(1); _ = state_digest({"scale": scale}); scale.resize_(3).shape  # still resizable
    torch.Size([3])
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()[:16]


def _feed(h, obj):
    import torch

    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"<{k}>".encode())
            _feed(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"[{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.is_quantized:
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                               torch.per_channel_affine_float_qparams):
                _feed(h, [t.q_per_channel_scales(), t.q_per_channel_zero_points(), t.q_per_channel_axis()])
            else:
                h.update(f"{t.q_scale()!r}{t.q_zero_point()}".encode())
            t = t.int_repr()
        # through a copy: .numpy() on the tensor itself would pin its storage (observers resize
        # their buffers in their first forward, which then fails)
        h.update(t.reshape(-1).contiguous().view(torch.uint8).clone().numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(obj).encode())


def max_rel_diff(vectors):
    """Largest ``(max over ranks - min over ranks) / min over ranks`` of equally shaped vectors.

    0 means the ranks agree exactly. Taught in 08_qat_at_scale.

    >>> import torch
    >>> max_rel_diff([torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])])
    0.25
    >>> max_rel_diff([torch.tensor([1.0])])
    0.0
    """
    import torch

    s = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vectors])
    lo, hi = s.min(0).values, s.max(0).values
    return float(((hi - lo) / lo.abs().clamp_min(1e-30)).max()) if s.numel() else 0.0




# --- outside: launching jobs and leaving nothing behind ---------------------------------------

def torchrun_command(module_args, nproc=2, module="qatlab.train_qat", max_restarts=0, python=None):
    """The command that runs ``python -m <module> <module_args>`` under torchrun on this machine.

    Equivalent to ``torchrun --standalone --nproc_per_node=<nproc> -m <module> ...``, but the
    rendezvous store listens on ``127.0.0.1`` (loopback only, port 0 = any free port).
    ``nproc=None`` gives the plain one-process command, without torchrun.

    Taught in 08_qat_at_scale.

    >>> torchrun_command(["--steps", "5"], nproc=None, python="python")
    ['python', '-m', 'qatlab.train_qat', '--steps', '5']
    >>> torchrun_command(["--steps", "5"], nproc=2, python="python")[:6]
    ['python', '-m', 'torch.distributed.run', '--nnodes=1', '--nproc-per-node=2', '--rdzv-backend=c10d']
    """
    python = python or sys.executable
    args = [str(a) for a in module_args]
    if nproc is None:
        return [python, "-m", module, *args]
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int or None, got {nproc!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be a non-negative int, got {max_restarts!r}")
    return [python, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4().hex[:12]}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", module, *args]


def _proc_info(pid):
    """``{"ppid", "pgid", "sid", "state", "env"}`` of a live process, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:  # gone, or not ours
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    env = dict(e.decode(errors="replace").split("=", 1) for e in env if b"=" in e)
    return {"state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2]), "sid": int(fields[3]),
            "env": env}


def tagged_processes(tag):
    """``{pid: info}`` of every live (not zombie) process whose environment carries ``QATLAB_JOB=tag``.

    Reads ``/proc``, so it works on Linux; elsewhere it returns ``{}``.

    Taught in 08_qat_at_scale.
    """
    if not os.path.isdir("/proc"):
        return {}
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _proc_info(int(name))
            if info and info["state"] != "Z" and info["env"].get(TAG) == tag:
                out[int(name)] = info
    return out


class Job:
    """A launched command (e.g. torchrun and its workers) that can be watched, killed and audited.

    Started in a new session (``start_new_session=True``) with ``QATLAB_JOB=<random tag>`` in its
    environment, which torchrun passes on to every worker. ``stdout`` is a pipe (read it line by
    line with :meth:`lines`); ``stderr`` goes to ``log`` (a file), shown by :meth:`check`.
    Use it as a context manager: on leaving the block, by any path, every process of the job
    is killed and :meth:`leftovers` must be empty. Taught in 08_qat_at_scale.
    """

    def __init__(self, cmd, log, env=None, cwd=None, timeout=900.0):
        self.cmd, self.log, self.tag = list(cmd), str(log), uuid.uuid4().hex
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), TAG: self.tag}
        os.makedirs(os.path.dirname(os.path.abspath(self.log)), exist_ok=True)
        self._err = open(self.log, "w")  # noqa: SIM115 (closed in kill/wait)
        self._lock = threading.Lock()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=full_env, cwd=cwd, start_new_session=True)
        self.output = []  # every stdout line read so far
        self.seconds = None
        self.timed_out = False
        self._timer = threading.Timer(timeout, self._expire)  # a hung job is killed, never waited for
        self._timer.daemon = True
        self._timer.start()

    def _expire(self):
        self.timed_out = True
        self.kill()

    def lines(self):
        """Yield stdout lines as they arrive (until the job closes stdout); also kept in ``output``."""
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))
            yield self.output[-1]

    def wait(self):
        """Read the rest of stdout, wait for the launcher to exit, return its exit code."""
        for _ in self.lines():
            pass
        code = self.proc.wait()
        self._timer.cancel()
        self.seconds = time.perf_counter() - self.started
        self._err.close()
        return code

    def processes(self):
        """``{pid: info}`` of every live process of this job (the launcher and its workers)."""
        procs = tagged_processes(self.tag)
        if self.proc.poll() is None and self.proc.pid not in procs:
            procs[self.proc.pid] = {"pgid": self.proc.pid, "sid": self.proc.pid, "env": {}}
        return procs

    def workers(self):
        """``{rank: pid}`` of the live processes that torchrun started (they have ``RANK`` set)."""
        return {int(i["env"]["RANK"]): pid for pid, i in self.processes().items() if "RANK" in i["env"]}

    def kill_rank(self, rank, sig=signal.SIGKILL):
        """Send ``sig`` to the process group of worker ``rank`` only (a single failing worker)."""
        pid = self.workers().get(rank)
        if pid is None:
            raise ValueError(f"no live worker with rank {rank!r} in this job")
        os.killpg(os.getpgid(pid), sig)
        return pid

    def kill(self, sig=signal.SIGKILL, timeout=10.0):
        """Kill the launcher's process group and every worker's, until none is left; return the pids.

        A node failure in miniature. Raises ``RuntimeError`` if a process survives ``timeout``.
        """
        with self._lock:
            self._timer.cancel()
            killed = set()
            deadline = time.perf_counter() + timeout
            while procs := self.processes():
                for pgid in {i["pgid"] for i in procs.values()}:
                    try:
                        os.killpg(pgid, sig)
                    except ProcessLookupError:
                        pass
                killed |= set(procs)
                try:
                    self.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"processes survived signal {sig}: {sorted(self.processes())}")
            self.proc.wait()
            self._err.close()
            return sorted(killed)

    def leftovers(self):
        """Pids of this job's processes still alive (must be ``[]`` after :meth:`wait` or :meth:`kill`)."""
        return sorted(self.processes())

    def check(self, returncode):
        """Raise ``RuntimeError`` with the end of stderr unless ``returncode`` is 0."""
        if self.timed_out:
            raise RuntimeError(f"job killed after its timeout: {' '.join(self.cmd)}")
        if returncode != 0:
            with open(self.log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"job failed with exit code {returncode}: {' '.join(self.cmd)}\n"
                               f"--- last lines of {self.log} ---\n{tail}")
        return returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        self.proc.stdout.close()
        left = self.leftovers()
        if left:
            raise RuntimeError(f"processes left behind by {self.cmd[:4]}...: {left}")
        return False
