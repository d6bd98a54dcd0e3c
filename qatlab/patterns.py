"""torchao's pattern graphs, exported once per machine instead of on every call.

``prepare_qat_pt2e``, ``convert_pt2e``, XNNPACK's quantizer and a PT2E model's
``.train()`` / ``.eval()`` find the subgraphs they rewrite (conv → BN, conv → BN → ReLU,
dropout, batch norm) by matching small *pattern* functions, and they ``torch.export``
every pattern anew on every call: about 40 exports in ``prepare_qat_pt2e``, 96 in
``convert_pt2e`` (4 conv kinds × 12 variants × match and replacement), 6 in each
``.train()`` / ``.eval()``, a fraction of a second each. On 2 CPU cores that is tens of
seconds per QAT run spent on graphs that never change.

:func:`pattern_cache` removes that cost without changing a result:

1. **caching**: the graph of a pattern depends only on the pattern function's code, its
   closure (the conv function, flags), the shapes of its example inputs and the keyword
   inputs, so the first export of each is kept and every caller gets a deep copy, which is
   what a fresh export returns;
2. **on disk**: the exported program of each pattern is also written with
   ``torch.export.save`` to ``patterns/`` of :func:`qatlab.files.cache_dir`, under a name
   made from the same description (:func:`pattern_file_key`: the function's module, name and
   bytecode, its closure, the example shapes, and the torch, torchao and ExecuTorch versions),
   so a new process loads it, in a fraction of an export's time, instead of exporting it
   again; a file that does not load is exported and written again;
3. **skipping absent conv kinds**: torchao's two conv-BN rewrites run once per conv kind
   (``conv1d``, ``conv2d``, ``conv_transpose1d``, ``conv_transpose2d``); a kind with no
   node in the graph can match nothing, so its pass is skipped.

``tests/test_patterns.py`` checks that a prepared and a converted model are the same bit
for bit with and without the block, and with the graphs exported or loaded from disk.
Where the installed torchao has no such functions the block changes nothing. Used by
:mod:`qatlab.conversion` and :func:`qatlab.qat.allow_train_eval`; taught in 10_qat_your_own_model.
"""

import contextlib
import copy
import hashlib
import io
import sys

_PATTERNS = {}
_ORIGINAL = "_get_aten_graph_module_for_pattern"
_CONV_KINDS = ("conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")


def pattern_key(pattern, example_inputs, is_cuda, kwargs):
    """What determines the graph ``torch.export`` makes of one of torchao's pattern functions, or ``None``.

    ``(code, closure values, example shapes/dtypes/devices, is_cuda, keyword inputs)``;
    ``None`` (do not cache) for anything that is not a plain function or torchao's wrapper
    of one, or whose closure is not hashable.
    """
    import torch

    def describe(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device.type)
        return v

    fn = getattr(pattern, "fn", pattern) if isinstance(pattern, torch.nn.Module) else pattern  # torchao wraps them
    code = getattr(fn, "__code__", None)
    if code is None or isinstance(fn, torch.nn.Module):
        return None
    try:
        cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
        key = (code, cells, tuple(describe(x) for x in example_inputs), bool(is_cuda),
               tuple(sorted((k, describe(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):  # an unhashable closure value or an empty cell: do not cache
        return None
    return key


def describe_stably(value):
    """``value`` as text that is the same in every process, or ``None`` where there is no such text.

    Numbers, strings, ``None`` and dtypes by ``repr``; functions (torch's builtins included) by
    module and name; tuples element by element; anything else ``None``.

    >>> import torch
    >>> describe_stably(torch.nn.functional.conv2d), describe_stably((True, 1e-05)), describe_stably(object())
    ('function torch._VariableFunctionsClass.conv2d', '(True, 1e-05)', None)
    """
    import torch

    if value is None or isinstance(value, bool | int | float | str | torch.dtype):
        return repr(value)
    if isinstance(value, tuple):
        parts = [describe_stably(v) for v in value]
        return None if None in parts else "(" + ", ".join(parts) + ")"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    module = getattr(value, "__module__", None) or getattr(getattr(value, "__self__", None), "__module__", None)
    if callable(value) and name and module:
        return f"function {module}.{name}"
    return None


def _code_digest(code, h):
    # the bytecode, names and constants of a code object and of the code objects inside it
    h.update(code.co_code)
    h.update(repr((code.co_qualname, code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _code_digest(const, h)
        else:
            h.update(repr(const).encode())


def pattern_file_key(key):
    """The file name (a sha256) of the pattern that :func:`pattern_key` described, or ``None``.

    Made from what determines the exported graph, in a form that is the same in every process:
    the function's module, qualified name and bytecode, its closure values
    (:func:`describe_stably`), the example shapes, ``is_cuda``, the keyword inputs, and the
    torch, torchao and ExecuTorch versions. ``None`` where a closure value has no stable
    description: that pattern is cached in memory only.
    """
    from importlib.metadata import PackageNotFoundError, version

    import torch

    code, cells, examples, is_cuda, kwargs = key
    closure = [describe_stably(c) for c in cells]
    if None in closure:
        return None
    h = hashlib.sha256()
    _code_digest(code, h)
    versions = []
    for package in ("torchao", "executorch"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append(None)
    h.update(repr((code.co_filename.rsplit("site-packages", 1)[-1], closure, examples, is_cuda, kwargs,
                   torch.__version__, versions)).encode())
    return h.hexdigest()


def load_or_export(original, pattern, example_inputs, is_cuda, kwargs, path):
    """``original(pattern, ...)`` (torchao's exporter) with its ``torch.export.export`` answered from ``path``.

    When ``path`` holds a program that loads, that program stands in for the export; otherwise
    the export runs and its program is written to ``path`` (atomically) before torchao's
    post-processing (dead code, ``copy_`` nodes) touches it. Either way torchao's own code makes
    the graph module from the program.
    """
    import torch

    from .files import atomic_path

    real_export = torch.export.export
    program = None
    if path.is_file():
        try:
            program = torch.export.load(io.BytesIO(path.read_bytes()))
        except Exception:   # written by another version of a library, or damaged: export it again
            program = None
    written = []

    def export(*args, **kw):
        if program is not None:
            return program
        exported = real_export(*args, **kw)
        buffer = io.BytesIO()
        torch.export.save(exported, buffer)   # to memory first: the temporary name is not *.pt2
        written.append(buffer.getvalue())
        return exported

    torch.export.export = export
    try:
        graph_module = original(pattern, example_inputs, is_cuda, **kwargs)
    finally:
        torch.export.export = real_export
    if written:
        with atomic_path(path) as tmp:
            tmp.write_bytes(written[0])
    return graph_module


def conv_kinds(graph_module):
    """The conv kinds (``"conv2d"``, ...) that occur as aten calls in ``graph_module``'s graph."""
    found = set()
    for node in graph_module.graph.nodes:
        packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
        name = getattr(packet, "__name__", None)
        if name in _CONV_KINDS:
            found.add(name)
    return found


def _skipping_absent_kinds(helper):
    # torchao's per-conv-kind rewrite pass, skipped when the graph holds no conv of that kind
    def run(m, conv_fn, example_inputs, is_cuda):
        kind = getattr(conv_fn, "__name__", None)
        if kind in _CONV_KINDS and kind not in conv_kinds(m):
            return m
        return helper(m, conv_fn, example_inputs, is_cuda=is_cuda)

    run.__wrapped__ = helper
    return run


@contextlib.contextmanager
def pattern_cache():
    """Within the block, torchao's pattern graphs are exported once per machine and then loaded and copied.

    Patches ``_get_aten_graph_module_for_pattern`` wherever a loaded torchao or ExecuTorch
    module holds it, and torchao's two per-conv-kind conv-BN passes (``_fuse_conv_bn_qat_helper``
    in prepare, ``_fold_conv_bn_qat_helper`` in convert) to skip conv kinds the graph lacks;
    restores them on exit. Blocks nest.
    """
    try:
        from torchao.quantization.pt2e import qat_utils
        from torchao.quantization.pt2e import utils as pt2e_utils
    except ImportError:
        yield
        return
    original = getattr(pt2e_utils, _ORIGINAL, None)
    if original is None or getattr(original, "__wrapped__", None) is not None:   # absent, or already patched
        yield
        return

    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        key = pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            name = pattern_file_key(key)
            if name is None:
                _PATTERNS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
            else:
                from .files import cache_dir

                _PATTERNS[key] = load_or_export(original, pattern, example_inputs, is_cuda, kwargs,
                                                cache_dir() / "patterns" / f"{name}.pt2")
        return copy.deepcopy(_PATTERNS[key])

    cached.__wrapped__ = original
    patched = [(module, _ORIGINAL, original, cached) for module in list(sys.modules.values())
               if str(getattr(module, "__name__", "")).startswith(("torchao", "executorch"))
               and getattr(module, _ORIGINAL, None) is original]
    for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
        helper = getattr(qat_utils, name, None)
        if helper is not None:
            patched.append((qat_utils, name, helper, _skipping_absent_kinds(helper)))
    for module, name, _, new in patched:
        setattr(module, name, new)
    try:
        yield
    finally:
        for module, name, old, _ in patched:
            setattr(module, name, old)
