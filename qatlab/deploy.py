"""Deploy an int8 model to real runtimes, time it honestly, and check parity.

Taught in 05_deployment. The three runtimes side by side:

- eager PyTorch (fp32, and the legacy ``torch.ao.quantization`` int8 kernels);
- ExecuTorch with the XNNPACK delegate (:func:`export_executorch`, :func:`run_executorch`);
- ONNX Runtime (:func:`export_onnx`, :func:`run_onnx`).

Latency is measured with :func:`benchmark` (warm-up, then median and IQR of
repeated runs at a fixed thread count), two callables are compared with
:func:`compare_speed` (interleaved rounds, a sign test over rounds), and each runtime's logits are
compared with PyTorch's with :func:`parity`. ``executorch`` and
``onnxruntime`` are imported inside the functions that use them.
"""

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_path

# CPU features that decide which int8 kernels run fast on x86 (and NEON/dotprod on ARM)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
             "asimd", "asimddp")


def file_size(path):
    """Size of the file at ``path`` in bytes (taught in 05_deployment).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
    >>> _ = p.write_bytes(bytes(1000))
    >>> file_size(p)
    1000
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}")
    return path.stat().st_size


def save_state_dict(model, path):
    """Save ``model.state_dict()`` atomically and return its size in bytes (05_deployment).

    This is the on-disk size of the weights the way a checkpoint stores them:
    fp32 parameters take 4 bytes each, eager int8 weights 1 byte plus their
    scales and zero-points.
    """
    import torch

    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return file_size(path)


@dataclass(frozen=True)
class Timing:
    """What :func:`benchmark` measured: milliseconds per call, and how.

    ``threads`` is the thread count of the runtime that ran the calls, named in
    ``runtime`` (``None`` when that runtime cannot report it).
    """

    median_ms: float
    iqr_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    warmup: int
    threads: int | None
    times_ms: tuple
    runtime: str = "PyTorch"

    def __str__(self):
        threads = ("unknown" if self.threads is None else self.threads, "thread" if self.threads == 1 else "threads")
        return (f"{self.median_ms:.3f} ms (IQR {self.iqr_ms:.3f} ms, {self.repeats} runs, "
                f"{threads[0]} {self.runtime} {threads[1]})")


def benchmark(fn, *args, warmup=3, repeats=20, threads=2):
    """Time ``fn(*args)``: ``warmup`` untimed calls, then the median and IQR of ``repeats``.

    Taught in 05_deployment. ``torch.set_num_threads(threads)`` holds during
    the measurement (and is restored after). Runtimes with their own thread
    pools are sized when they are loaded (:func:`load_executorch`,
    :func:`load_onnx`), and the result records the threads of the runtime
    that really ran ``fn``, read after the timed calls: for a callable from
    :func:`load_executorch`, the size of ExecuTorch's (process-wide) thread pool
    as its runtime reports it; for one from :func:`load_onnx`, the session's
    intra-op threads; for anything else (an eager module, a function), torch's
    intra-op threads. ``Timing.runtime`` names which. The median and the
    interquartile range (q3 − q1) are robust to the odd slow run caused by
    another process on a shared machine.

    >>> t = benchmark(sum, [1, 2, 3], warmup=1, repeats=5, threads=1)
    >>> t.repeats, t.threads, t.runtime, t.median_ms >= 0, t.iqr_ms >= 0
    (5, 1, 'PyTorch', True, True)
    """
    import torch

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 2), ("threads", threads, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                fn(*args)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(*args)
                times.append(1e3 * (time.perf_counter() - start))
        thread_count = getattr(fn, "thread_count", None)  # set by load_executorch / load_onnx
        measured_threads = thread_count() if callable(thread_count) else torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median_ms=statistics.median(times), iqr_ms=q3 - q1, q1_ms=q1, q3_ms=q3,
                  repeats=repeats, warmup=warmup, threads=measured_threads, times_ms=tuple(times),
                  runtime=getattr(fn, "runtime", "PyTorch") if callable(thread_count) else "PyTorch")


@dataclass(frozen=True)
class SpeedComparison:
    """What :func:`compare_speed` measured: per round, ``ratio = t(b) / t(a)`` (above 1: ``a`` is
    faster in that round), and the exact two-sided sign test over rounds."""

    name_a: str
    name_b: str
    ratios: tuple
    a_faster_rounds: int
    b_faster_rounds: int
    p_value: float
    median_ms_a: float
    median_ms_b: float

    @property
    def ratio(self):
        """The median over rounds of t(b) / t(a)."""
        return statistics.median(self.ratios)

    @property
    def significant(self):
        return self.p_value < 0.05

    def __str__(self):
        n = len(self.ratios)
        detail = (f"{self.name_a} faster in {self.a_faster_rounds} of {n} interleaved rounds, sign test p = "
                  f"{self.p_value:.2g}; medians {self.median_ms_a:.3f} vs {self.median_ms_b:.3f} ms")
        if not self.significant:
            return f"{self.name_a} vs {self.name_b}: no difference detected ({detail})"
        r = self.ratio
        return f"{self.name_a}: {max(r, 1 / r):.2f}x {'faster' if r > 1 else 'slower'} than {self.name_b} ({detail})"


def compare_speed(a, b, args_a, args_b=None, names=("a", "b"), rounds=10, calls=2, warmup=2, settle=1, threads=2,
                  clock=time.perf_counter):
    """Is ``a(*args_a)`` faster than ``b(*args_b)``? Timed in interleaved rounds, tested over rounds.

    Taught in 05_deployment. Timing all of ``a``'s calls and then all of ``b``'s lets a change
    of load between the two blocks pass for a difference, and calls within a block are not
    independent samples of the comparison. Here each of ``rounds`` rounds times ``calls``
    calls of ``a`` and ``calls`` of ``b`` (``qatlab.qat_cost.interleaved_step_times``, wall time
    by default; ``a`` first in even rounds,
    ``b`` first in odd ones, so that an effect of the order, such as a cache the first one
    warms, does not point the same way every round), so
    a burst of load lasting a round or more hits both, and forms the round's ratio
    ``r_i = t_i(b) / t_i(a)``. The verdict is the exact sign test over rounds: with ``k`` of
    ``n`` rounds faster for ``a``, ``p = min(1, 2 * P(Binomial(n, 1/2) <= min(k, n - k)))``
    (rounds with ``r_i = 1`` are dropped). With 10 rounds the smallest p is 0.002; with 5
    rounds it is 0.0625, so 5 rounds can never call one faster.

    ``warmup`` calls of each run once, untimed, before the first round; ``settle`` calls of
    each run untimed right before each of its timed blocks, so that every timed call follows
    a call of the same function, as in a :func:`benchmark` block (the first call after the
    other one ran can pay for caches or thread pools left in another state). Where the
    interleaved medians still differ from a block's, the two ran under different conditions.

    Both run under ``torch.inference_mode()`` with ``torch.set_num_threads(threads)`` (restored
    after), as in :func:`benchmark`; set threads or engines inside ``a`` and ``b`` when that is
    what is compared. ``args_b`` defaults to ``args_a``.

    >>> ticks = iter(range(1000))
    >>> c = compare_speed(lambda: None, lambda: None, (), rounds=6, calls=1, warmup=0,
    ...                   clock=lambda: next(ticks))
    >>> c.ratios, c.p_value   # a fake clock: every call takes one tick
    ((1.0, 1.0, 1.0, 1.0, 1.0, 1.0), 1.0)
    """
    import torch

    from .qat_cost import interleaved_step_times
    from .stats import sign_test_p

    for name, fn in (("a", a), ("b", b)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    args_b = args_a if args_b is None else args_b
    for name, value in (("args_a", args_a), ("args_b", args_b)):
        if not isinstance(value, tuple):
            raise TypeError(f"{name} must be a tuple of arguments, got {type(value).__name__}")
    if not (isinstance(names, tuple | list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise TypeError(f"names must be two strings, got {names!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise ValueError(f"rounds must be an int >= 2, got {rounds!r}")
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be an int >= 1, got {calls!r}")
    for name, value in (("warmup", warmup), ("settle", settle)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    _check_threads(threads)
    steps = {"a": lambda: a(*args_a), "b": lambda: b(*args_b)}
    times = {"a": [], "b": []}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for r in range(rounds):   # A first in even rounds, B first in odd ones: an effect of order cancels
                order = ("a", "b") if r % 2 == 0 else ("b", "a")
                one = interleaved_step_times({k: steps[k] for k in order}, rounds=1, repeats=calls,
                                             warmup=warmup if r == 0 else 0, clock=clock, settle=settle)
                for k in order:
                    times[k] += one[k]
    finally:
        torch.set_num_threads(old_threads)
    ratios = tuple(1.0 if ta == tb else tb / ta if ta > 0 else math.inf for ta, tb in zip(times["a"], times["b"]))
    a_faster = sum(r > 1 for r in ratios)
    b_faster = sum(r < 1 for r in ratios)
    return SpeedComparison(names[0], names[1], ratios, a_faster, b_faster, sign_test_p(a_faster, b_faster),
                           1e3 * statistics.median(times["a"]), 1e3 * statistics.median(times["b"]))


def parity(a_logits, b_logits):
    """Top-1 agreement (%) and max |a − b| between two runtimes' logits (05_deployment).

    Agreement is the share of rows whose argmax is the same; it is what a
    user of the classifier sees. ``max_abs_diff`` shows how far the numbers
    drifted (int8 kernels round differently, so it is rarely 0).

    >>> import torch
    >>> a = torch.tensor([[1.0, 2.0], [3.0, 0.0]]); b = torch.tensor([[1.0, 2.5], [0.0, 3.0]])
    >>> parity(a, b)
    {'top1_agreement': 50.0, 'max_abs_diff': 3.0}
    """
    import torch

    a, b = torch.as_tensor(a_logits).float(), torch.as_tensor(b_logits).float()
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"logits must be two (N, classes) tensors of one shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    agree = 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item()
    return {"top1_agreement": agree, "max_abs_diff": (a - b).abs().max().item()}


def cpu_flags(names=CPU_FLAGS):
    """``{flag: present}`` for the CPU features that decide int8 speed (05_deployment).

    Read from ``/proc/cpuinfo`` (Linux); elsewhere every flag reads ``False``.
    ``torch.backends.cpu.get_cpu_capability()`` gives torch's own summary.
    AVX-512 VNNI / AVX-VNNI (x86) and dot-product (ARM ``asimddp``) are the
    instructions that multiply-accumulate int8 in one step.
    """
    present = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {name: name in present for name in names}


# ---------------------------------------------------------------- ExecuTorch


def _check_threads(threads):
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")


def _require(module, what):
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the {module.split('.')[0]!r} package, which is not "
                          f"installed here: pip install {module.split('.')[0]} ({e})") from e


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_executorch` wrote: the file, its size, what XNNPACK took, the batch bound.

    ``max_batch`` is ``None`` for a program with the fixed input shape of its
    example, else the largest batch the program promises to run.
    """

    path: Path
    bytes: int
    delegated_nodes: int
    non_delegated_nodes: int
    summary: str
    max_batch: int | None = None
    reused: bool = False


MAX_BATCH_METHOD = "get_max_batch"  # constant method that records a .pte's batch bound


def _planned_batch(edge):
    """Upper bound of the first user input's batch dimension that ExecuTorch will plan memory for."""
    from executorch.exir.sym_util import eval_upper_bound

    program = edge.exported_program()
    first = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
    return eval_upper_bound(node.meta["val"].shape[0])


def program_digest(program, example_inputs, delegate="xnnpack", max_batch=None):
    """SHA-256 of what a lowering depends on: the exported graph's code, every weight and constant
    (name, dtype, shape, bytes), the example inputs' shapes and dtypes, ``delegate``,
    ``max_batch`` and the torch / ExecuTorch versions. Two programs with the same digest lower
    to the same ``.pte``. Taught in 12_qat_language_model."""
    import hashlib
    from importlib.metadata import version

    import torch

    h = hashlib.sha256()
    h.update(repr((delegate, max_batch, [(tuple(x.shape), str(x.dtype)) for x in example_inputs],
                   torch.__version__, version("executorch"))).encode())
    h.update(program.graph_module.code.encode())
    for name, value in sorted({**program.state_dict, **program.constants}.items()):
        h.update(name.encode())
        _hash_value(h, value)
    return h.hexdigest()


def _hash_value(h, value):
    """Feed a tensor (a tensor subclass through its inner tensors and metadata) or any other value to ``h``."""
    import torch

    if not isinstance(value, torch.Tensor):
        h.update(repr(value).encode())
        return
    if type(value) not in (torch.Tensor, torch.nn.Parameter) and hasattr(value, "__tensor_flatten__"):
        names, meta = value.__tensor_flatten__()   # e.g. torchao's quantized weights: qdata, scale, ...
        h.update(repr((type(value).__name__, meta, tuple(value.shape))).encode())
        for n in names:
            h.update(n.encode())
            _hash_value(h, getattr(value, n))
        return
    t = value.detach().cpu().contiguous().reshape(-1)
    h.update(repr((str(t.dtype), tuple(value.shape))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def export_executorch(model, example_inputs, path, delegate="xnnpack", max_batch=None, reuse=False):
    """Lower ``model`` to an ExecuTorch program and write it atomically to ``path`` (.pte).

    Taught in 05_deployment. ``torch.export`` → ``to_edge_transform_and_lower``
    with the ``XnnpackPartitioner`` (``delegate="xnnpack"``, or ``None`` for
    ExecuTorch's portable kernels) → ``to_executorch`` → bytes. ``model`` may be
    a float module or a ``convert_pt2e`` model; an ``ExportedProgram`` is
    lowered as it is.

    Shapes: with ``max_batch=None`` the program has the static input shapes of
    ``example_inputs``. With ``max_batch=N`` the first dimension of the first
    input is exported as ``torch.export.Dim("batch", min=1, max=N)``:
    ExecuTorch plans its memory for the upper bound, and the program runs any
    batch up to it (the example needs 2 to ``N`` rows, since ``torch.export``
    specialises a dimension of size 1). Lowering can narrow that range: a
    shape function that compares the batch with a constant adds a guard, and
    the guard keeps the side of the constant that holds the example batch
    (with torch 2.14 / ExecuTorch 1.5.1, XNNPACK's channels-last pass re-runs
    torch's conv backend selection, which compares the batch with 16). The
    bound the program really has is read back from the lowered program; if it
    is below ``N``, a ``UserWarning`` says so and the smaller bound is used.
    ``N`` is stored in the file as the constant method ``get_max_batch``;
    :func:`load_executorch` enforces the smaller of it and the planned input size.
    Returns an :class:`ExportSummary` with the delegation counts.

    Lowering is the slow step (a minute for a small LLM on 2 cores). With ``reuse=True`` the
    exported program's :func:`program_digest` is compared with the one stored beside an
    existing ``path`` (in ``<path>.json``, written after the file): when they match, the
    file is that program's and is kept, and the summary says ``reused=True``.
    """
    import json

    import torch

    _require("executorch.exir", "export_executorch")
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    from .provenance import shared_provenance

    if delegate not in ("xnnpack", None):
        raise ValueError(f"delegate must be 'xnnpack' or None, got {delegate!r}")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
            raise ValueError(f"max_batch must be None or an int >= 2, got {max_batch!r}")
        if isinstance(model, torch.export.ExportedProgram):
            raise ValueError("max_batch needs the module, not an ExportedProgram (its shapes are fixed)")
        rows = example_inputs[0].shape[0]
        if not 2 <= rows <= max_batch:
            raise ValueError(f"with max_batch={max_batch} the example batch must have 2..{max_batch} "
                             f"rows (a size-1 dimension is specialised), got {rows}")
    partitioner = []
    if delegate == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner()]

    if isinstance(model, torch.export.ExportedProgram):
        program = model
    elif max_batch is None:
        with shared_provenance():
            program = torch.export.export(model, example_inputs)
    else:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        shapes = ({0: batch},) + tuple(None for _ in example_inputs[1:])
        with shared_provenance():
            program = torch.export.export(model, example_inputs, dynamic_shapes=shapes)
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    digest = program_digest(program, example_inputs, delegate, max_batch) if reuse else None
    if reuse and path.is_file() and sidecar.is_file():
        try:
            stored = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            stored = {}
        if stored.get("digest") == digest and stored.get("bytes") == file_size(path):
            return ExportSummary(path=path, bytes=stored["bytes"], delegated_nodes=stored["delegated_nodes"],
                                 non_delegated_nodes=stored["non_delegated_nodes"], summary=stored["summary"],
                                 max_batch=stored["max_batch"], reused=True)
    methods = None if max_batch is None else {MAX_BATCH_METHOD: max_batch}
    with shared_provenance():   # the same program, about a fifth faster (qatlab.provenance)
        edge = to_edge_transform_and_lower(program, partitioner=partitioner, constant_methods=methods)
    if max_batch is not None:
        planned = _planned_batch(edge)
        if planned < max_batch:
            import warnings

            warnings.warn(f"a shape guard added while lowering narrowed the batch range to 1..{planned} "
                          f"(asked for 1..{max_batch}); the program runs at most {planned} rows. "
                          f"Run with TORCH_LOGS=+dynamic to see the guard.", UserWarning, stacklevel=2)
            max_batch = planned
    info = get_delegation_info(edge.exported_program().graph_module)
    with shared_provenance():
        buffer = edge.to_executorch().buffer
    if sidecar.exists():
        sidecar.unlink()   # the old digest no longer describes the file about to be written
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer)
    summary = ExportSummary(path=path, bytes=file_size(path), delegated_nodes=info.num_delegated_nodes,
                            non_delegated_nodes=info.num_non_delegated_nodes,
                            summary=info.get_summary().strip(), max_batch=max_batch)
    if reuse:
        record = {"digest": digest, "bytes": summary.bytes, "delegated_nodes": summary.delegated_nodes,
                  "non_delegated_nodes": summary.non_delegated_nodes, "summary": summary.summary,
                  "max_batch": summary.max_batch}
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(record))
    return summary


_ET_POOL = {"resizes": 0}   # how often load_executorch has resized ExecuTorch's process-wide thread pool


def load_executorch(path, threads=2, max_batch=None):
    """Load a .pte file and return a callable ``run(x) -> logits`` (05_deployment).

    ``threads`` sets the size of ExecuTorch's CPU thread pool (the one
    XNNPACK uses). The pool is one per process: loading another program with
    other ``threads`` resizes it for every program. The resize
    (``_unsafe_reset_threadpool``) leaves programs loaded before it holding the
    old pool, and running one of them can crash the process (a segfault was
    seen): such a callable raises ``RuntimeError`` instead, and a load at the
    pool's current size does not resize it (an ExecuTorch without
    ``_threadpool_get_thread_count`` resizes on every load: only the program
    loaded last runs). ``run.thread_count()``
    returns its size as the runtime reports it (``None`` for an ExecuTorch
    without ``_threadpool_get_thread_count``), which is what :func:`benchmark`
    records. A file that is not an ExecuTorch program raises
    ``ValueError`` naming it. The callable exposes the program's planned input
    shape as ``run.input_shape`` and its batch bound as ``run.max_batch``
    (``None`` for a program with a fixed batch). The bound comes from the
    file's ``get_max_batch`` method (written by :func:`export_executorch`) or,
    for a program exported elsewhere with a dynamic batch, from ``max_batch``;
    either way it is capped at the planned input size. A batch outside what
    the program accepts raises ``ValueError`` before the runtime sees it. The
    runtime's native log lines about CPU probing and its thread pool are
    filtered out (:func:`qatlab.noise.native_stderr_filtered`); any other
    native output still shows.
    """
    _require("executorch.runtime", "load_executorch")
    from .noise import native_stderr_filtered

    _check_threads(threads)
    path = Path(path)
    file_size(path)  # FileNotFoundError for a missing file
    if path.read_bytes()[4:8] != b"ET12":
        raise ValueError(f"{str(path)!r} is not an ExecuTorch program (.pte): its header "
                         f"does not carry the 'ET12' file identifier")
    with native_stderr_filtered():
        import executorch.extension.pybindings.portable_lib as portable
        from executorch.runtime import Runtime

        pool_size = getattr(portable, "_threadpool_get_thread_count", None)
        if pool_size is None or int(pool_size()) != threads:
            portable._unsafe_reset_threadpool(int(threads))   # programs loaded before it must not run again
            _ET_POOL["resizes"] += 1
        generation = _ET_POOL["resizes"]
        try:
            program = Runtime.get().load_program(path)
            method = program.load_method("forward")
        except RuntimeError as e:
            raise ValueError(f"{str(path)!r} is not a valid ExecuTorch program: {e}") from e
        if MAX_BATCH_METHOD in program.method_names:
            max_batch = int(program.load_method(MAX_BATCH_METHOD).execute([])[0])
        elif max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                        or max_batch < 1):
            raise ValueError(f"max_batch must be None or a positive int, got {max_batch!r}")
    meta = program.metadata("forward")
    shape = tuple(meta.input_tensor_meta(0).sizes())
    if max_batch is not None:
        max_batch = min(max_batch, shape[0])  # memory is planned for shape[0] rows at most

    def run(x):
        if _ET_POOL["resizes"] != generation:
            raise RuntimeError(f"ExecuTorch's thread pool was resized after {path.name} was loaded (another "
                               f"load_executorch with other threads): load it again; running it could crash")
        rows = x.shape[0]
        if max_batch is None and rows != shape[0]:
            raise ValueError(f"{path.name} was exported for batch {shape[0]}, got {rows} rows")
        if max_batch is not None and not 1 <= rows <= max_batch:
            raise ValueError(f"{path.name} runs batches of 1..{max_batch} rows, got {rows}")
        return method.execute((x.contiguous(),))[0]

    run.input_shape, run.program, run.max_batch = shape, program, max_batch
    run.runtime, run.thread_count = "ExecuTorch", (lambda: int(pool_size()) if pool_size else None)
    return run


def _run_batches(run, batches, batch_size, max_batch=None):
    import torch

    outputs = []
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        if max_batch is not None:
            outputs.extend(run(part) for part in x.split(max_batch))
        elif batch_size is not None and x.shape[0] != batch_size:
            if x.shape[0] % batch_size:
                raise ValueError(f"a batch of {x.shape[0]} rows does not split into the "
                                 f"program's fixed batch size {batch_size}")
            outputs.extend(run(part) for part in x.split(batch_size))
        else:
            outputs.append(run(x))
    return torch.cat([torch.as_tensor(o).float() for o in outputs])


def run_executorch(path, batches, threads=2, max_batch=None):
    """Run a .pte program over ``batches`` and return the concatenated logits (05_deployment).

    ``batches`` is an iterable of tensors or of ``(x, y)`` pairs (a
    DataLoader). A program exported for a fixed batch size ``b`` runs each
    batch in chunks of ``b`` rows; one with a batch bound ``N`` (see
    :func:`load_executorch`) runs each batch in chunks of at most ``N`` rows.
    """
    run = load_executorch(path, threads=threads, max_batch=max_batch)
    return _run_batches(run, batches, run.input_shape[0], run.max_batch)


# ---------------------------------------------------------------- ONNX Runtime


def export_onnx(model, example_inputs, path, dynamic_batch=True, strip_metadata=True):
    """Export ``model`` to ONNX with ``torch.onnx.export(..., dynamo=True)`` (05_deployment).

    A ``convert_pt2e`` model becomes a QDQ graph (QuantizeLinear /
    DequantizeLinear around float ops), which ONNX Runtime fuses into int8
    kernels where it can. With ``dynamic_batch=True`` the first input
    dimension is left free, so one file serves batch 1 and batch 32 (the
    example needs at least 2 rows for that). The weights are stored inside
    the one file (``external_data=False``). The exporter annotates every node
    with debugging metadata (the FX node, its Python stack trace, its module
    path); ``strip_metadata=True`` removes it, so the file size is the model's
    (weights + graph), not its provenance. Put the model in eval mode first
    (``.eval()``; for a PT2E model, ``move_exported_model_to_eval``). Written
    atomically; returns the size in bytes.
    """
    import torch

    _require("onnxscript", "export_onnx")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    dynamic_shapes = None
    if dynamic_batch:
        if example_inputs[0].shape[0] < 2:
            raise ValueError("dynamic_batch=True needs an example batch of at least 2 rows, "
                             f"got {tuple(example_inputs[0].shape)}")
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = ({0: batch},) + tuple(None for _ in example_inputs[1:])
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx_path = tmp.with_suffix(".onnx")  # the exporter wants an .onnx name
        try:
            torch.onnx.export(model, example_inputs, str(onnx_path), dynamo=True,
                              dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
            if strip_metadata:
                strip_onnx_metadata(onnx_path)
            onnx_path.replace(tmp)
        finally:
            onnx_path.unlink(missing_ok=True)
            onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)
    return file_size(path)


def strip_onnx_metadata(path):
    """Remove per-node debugging metadata and doc strings from an ONNX file, in place (05_deployment).

    ``torch.onnx.export(dynamo=True)`` stores, for every node, its FX node, its
    module path and the Python stack trace that created it
    (``metadata_props``); in a small model that is more bytes than the weights.
    Returns the number of bytes removed.
    """
    onnx = _require("onnx", "strip_onnx_metadata")

    path = Path(path)
    before = file_size(path)
    model = onnx.load(str(path))
    for graph in [model.graph] + [a.g for n in model.graph.node for a in n.attribute if a.HasField("g")]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(model, str(path))
    return before - file_size(path)


ORT_OPTIMIZATIONS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                     "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def load_onnx(path, threads=2, optimization="all", optimized_model_path=None):
    """An ONNX Runtime session as a callable ``run(x) -> logits`` (05_deployment).

    ``threads`` sets ``intra_op_num_threads`` (inter-op is 1);
    ``run.thread_count()`` reads it back from the session (what
    :func:`benchmark` records). ``optimization`` is ORT's graph optimization
    level (a key of :data:`ORT_OPTIMIZATIONS`), which decides what a QDQ graph
    computes (taught in 05_deployment and 09_integer_kernels):

    - ``"none"`` (``ORT_DISABLE_ALL``) runs the graph as exported: dequantize,
      float Conv/Gemm with the float bias, ``QuantizeLinear``, which computes
      ``round(x / s) + z`` where PyTorch computes ``round(x · (1/s)) + z``;
    - ``"basic"`` already rewrites it: ORT's ``WeightBiasQuantization`` pass turns
      each Conv/Gemm float bias into an int32 initializer ``round(b / (s_x s_w))``
      followed by ``DequantizeLinear``, the integer kernels' bias rounding;
    - from ``"extended"`` on (``"all"`` is ORT's default), each DequantizeLinear →
      Conv/Gemm → QuantizeLinear group is fused into one ``QLinearConv``/``QGemm``.

    ``optimized_model_path`` (a file path, or ``None``) saves the graph the session
    really runs (``SessionOptions.optimized_model_filepath``; written by ORT when the
    session is created, then moved into place), so you can read which of these it
    is. A file that is not an ONNX model raises ``ValueError`` naming it.
    """
    ort = _require("onnxruntime", "load_onnx")
    import contextlib

    import torch

    if optimization not in ORT_OPTIMIZATIONS:
        raise ValueError(f"optimization must be one of {sorted(ORT_OPTIMIZATIONS)}, got {optimization!r}")
    _check_threads(threads)
    if optimized_model_path is not None and not isinstance(optimized_model_path, str | Path):
        raise TypeError(f"optimized_model_path must be a path or None, got {type(optimized_model_path).__name__}")
    path = Path(path)
    file_size(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPTIMIZATIONS[optimization])
    options.log_severity_level = 3
    saved = contextlib.nullcontext() if optimized_model_path is None else atomic_path(optimized_model_path)
    with saved as tmp:
        if tmp is not None:
            options.optimized_model_filepath = str(tmp)  # not .ort: ORT writes an ONNX file
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own InvalidGraph/Fail types
            raise ValueError(f"{str(path)!r} is not a valid ONNX model: {e}") from e
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: x.detach().contiguous().numpy()})[0])

    run.session, run.runtime = session, "ONNX Runtime"
    run.thread_count = lambda: session.get_session_options().intra_op_num_threads
    return run


def run_onnx(path, batches, threads=2, optimization="all", optimized_model_path=None):
    """Run an ONNX model over ``batches`` in ONNX Runtime; concatenated logits (05_deployment).

    ``optimization`` and ``optimized_model_path`` as in :func:`load_onnx`.
    """
    run = load_onnx(path, threads=threads, optimization=optimization, optimized_model_path=optimized_model_path)
    shape = run.session.get_inputs()[0].shape
    fixed = shape[0] if isinstance(shape[0], int) else None
    return _run_batches(run, batches, fixed)


# ---------------------------------------------------------------- plots and tables


def format_table(rows, columns):
    """A plain-text table of ``rows`` (dicts) with ``columns`` (05_deployment).

    >>> print(format_table([{"a": 1, "b": 2.5}], ["a", "b"]))
    a | b
    --+------
    1 | 2.500
    """
    def cell(v):
        if v is None:
            return "—"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def plot_latency(rows, key="b1_ms", err_key="b1_iqr_ms", ax=None, title=None):
    """Median latency per runtime, fp32 and int8 side by side, with interquartile-range bars (05_deployment).

    Each row needs ``runtime``, ``precision`` and ``key`` (rows without it
    are skipped). The error bar spans the interquartile range: from
    ``<key>_q1`` to ``<key>_q3`` when the row has them (``b1_ms`` →
    ``b1_q1_ms``/``b1_q3_ms``), else ± half of ``err_key``. Each int8 bar is
    labelled with its speed-up over the same runtime's fp32 bar (fp32 time ÷
    int8 time: above 1 means int8 is faster). When the medians span more than
    a factor of 10 the y-axis is logarithmic (and says so). Returns the ``ax``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    rows = [r for r in rows if r.get(key) is not None]
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    q1_key, q3_key = key.replace("_ms", "_q1_ms"), key.replace("_ms", "_q3_ms")
    width, colors = 0.38, {"fp32": "tab:blue", "int8": "tab:orange"}
    by = {(r["runtime"], r["precision"]): r for r in rows}
    for j, precision in enumerate(("fp32", "int8")):
        xs, ys, lo, hi = [], [], [], []
        for i, runtime in enumerate(runtimes):
            r = by.get((runtime, precision))
            if r is None:
                continue
            m = r[key]
            if r.get(q1_key) is not None and r.get(q3_key) is not None:
                low, high = m - r[q1_key], r[q3_key] - m
            else:
                low = high = (r.get(err_key) or 0.0) / 2
            xs.append(i + (j - 0.5) * width)
            ys.append(m)
            lo.append(max(low, 0.0))
            hi.append(max(high, 0.0))
        ax.bar(xs, ys, width, yerr=[lo, hi], color=colors[precision], capsize=3, label=precision)
        if precision == "int8":
            for x, y, runtime in zip(xs, ys, [rt for rt in runtimes if (rt, "int8") in by]):
                fp32 = by.get((runtime, "fp32"))
                if fp32 is not None and y > 0:
                    ax.annotate(f"{fp32[key] / y:.2f}x", (x, y), xytext=(0, 6),
                                textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(runtimes)), runtimes)
    medians = [r[key] for r in rows if r[key] > 0]
    if medians and max(medians) / min(medians) > 10:  # runtimes an order of magnitude apart: log axis
        ax.set_yscale("log")
        ax.set_ylabel("median latency per call (ms, log scale)")
    else:
        ax.set_ylabel("median latency per call (ms)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.set_title(title or "latency (label on int8 bars: fp32 time / int8 time)", fontsize=10)
    ax.errorbar([], [], yerr=[], color="black", capsize=3, label="interquartile range")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_sizes(rows, ax=None):
    """Bar chart of ``rows[i]["bytes"]`` in kB per runtime and precision (05_deployment)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    rows = [r for r in rows if r.get("bytes") is not None]
    ax.bar(range(len(rows)), [r["bytes"] / 1e3 for r in rows],
           color=["tab:blue" if r["precision"] == "fp32" else "tab:orange" for r in rows])
    ax.set_xticks(range(len(rows)), [f"{r['runtime']}\n{r['precision']}" for r in rows], fontsize=8)
    ax.set_ylabel("file size (kB)")
    return ax
