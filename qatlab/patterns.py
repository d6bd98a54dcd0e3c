"""torchao's pattern graphs, exported once per process instead of on every call.

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
2. **skipping absent conv kinds**: torchao's two conv-BN rewrites run once per conv kind
   (``conv1d``, ``conv2d``, ``conv_transpose1d``, ``conv_transpose2d``); a kind with no
   node in the graph can match nothing, so its pass is skipped.

``tests/test_patterns.py`` checks that a prepared and a converted model are the same bit
for bit with and without the block. Where the installed torchao has no such functions
the block changes nothing. Used by :mod:`qatlab.conversion` and
:func:`qatlab.qat.allow_train_eval`; taught in 10_qat_your_own_model.
"""

import contextlib
import copy
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
    """Within the block, torchao's pattern graphs are exported once per process and then copied.

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
            _PATTERNS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
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
