"""Per-tensor fake quantization from vectorized tensor ops: torch's numbers, bit for bit, several times faster.

torch's CPU kernel for ``fake_quantize_per_tensor_affine`` (and for the fused observer +
fake-quant op that QAT's ``FusedMovingAvgObsFakeQuantize`` calls) takes many times as long as a
ReLU on the same tensor (notebook 10 times both on a 64×16×28×28 activation). The same numbers
come from five vectorized passes. The forward, as torch's kernel computes it::

    y = (clamp(z + round(x * inv), q_min, q_max) - z) * s,     inv = float32(1 / s)

with ``round`` half to even (``std::nearbyint``) and every step in float32. The backward is the
straight-through estimator: the gradient passes where the unclamped code is in range,
``q_min <= z + round(x * inv) <= q_max``. For ``s > 0`` that condition is monotone in ``x``
(a product with a positive number and ``round`` are both monotone), so the floats that pass
form one interval ``[lo, hi]``; :func:`mask_interval` finds its two ends exactly, and the
backward is hardtanh's (``grad`` where ``lo⁻ < x < hi⁺``, the neighbouring floats): one
vectorized pass and no boolean mask kept between forward and backward.

:func:`observe_and_fake_quantize` is a drop-in for ``FusedMovingAvgObsFakeQuantize.forward``
on a per-tensor CPU float32 input: torch's fused op still updates the moving-average min/max
and computes the scale and zero-point (same kernel, same buffers), and the fake quantization is
:func:`fake_quantize_per_tensor`. ``qatlab.conversion.KernelQParamsFakeQuantize`` uses it.
Anything else (per-channel weights, CUDA, other dtypes, tracing) goes to torch's op. Taught in
10_qat_your_own_model; ``tests/test_fast_fake_quant.py`` checks outputs and gradients against
torch's kernel bit for bit.
"""

import contextlib

import numpy as np
import torch

_WINDOW = 24   # floats searched on each side of a boundary's estimate (it is within a few ulps)
_INTERVALS = {}   # (scale, zero_point, quant_min, quant_max) -> mask_interval(...): a scale repeats once observers freeze
_FLAGS = {}
_USE_TORCH_KERNEL = [0]   # > 0 inside use_torch_kernel()


def _flags():
    if not _FLAGS:
        _FLAGS.update(on=torch.tensor([1], dtype=torch.long), off=torch.tensor([0], dtype=torch.long),
                      zero=torch.zeros(1))
    return _FLAGS["on"], _FLAGS["off"], _FLAGS["zero"]


def mask_interval(scale, zero_point, quant_min, quant_max):
    """``(lo, hi, lo⁻, hi⁺)``: the smallest and largest float32 ``x`` with
    ``q_min <= z + round(x * inv) <= q_max``, and the floats just below ``lo`` and just above ``hi``.

    ``inv = float32(1 / scale)``. Each end is searched among the consecutive float32 values around
    its estimate ``(q_min - z - 1/2) s`` or ``(q_max - z + 1/2) s`` and checked with the kernel's
    own float32 arithmetic (NumPy float32 scalars: IEEE single precision, ``rint`` half to even);
    ``None`` when ``scale`` is not a positive normal float32 whose reciprocal is finite, when
    ``z`` is outside ``[q_min, q_max]``, or when an end is not in the window (callers then use
    torch's kernel).

    Ties round to even, so the two ends differ: with ``s = 0.5``, ``-64.25 * 2 = -128.5`` rounds
    to ``-128`` (in range) but ``63.75 * 2 = 127.5`` rounds to ``128`` (out), so ``hi`` is the
    float just below 63.75:

    >>> mask_interval(0.5, 0, -128, 127)
    (-64.25, 63.749996185302734, -64.25000762939453, 63.75)
    """
    key = (float(scale), int(zero_point), int(quant_min), int(quant_max))
    if key in _INTERVALS:
        return _INTERVALS[key]
    if len(_INTERVALS) > 4096:
        _INTERVALS.clear()
    _INTERVALS[key] = result = _search_interval(*key)
    return result


def _search_interval(scale, z, qmin, qmax):
    s = np.float32(scale)
    with np.errstate(over="ignore", divide="ignore"):
        inv = np.float32(1) / s
    if not (s >= np.finfo(np.float32).tiny and np.isfinite(inv) and s == scale and qmin <= z <= qmax):
        return None
    ends = []
    for estimate, keep in ((np.float32((qmin - z - 0.5) * float(s)), lambda c: c >= qmin),
                           (np.float32((qmax - z + 0.5) * float(s)), lambda c: c <= qmax)):
        if estimate == 0 or not np.isfinite(estimate) or abs(estimate) > 3e38:
            return None
        bits = np.array([estimate], dtype=np.float32).view(np.int32)[0]
        # one sign, no zero and no infinity in the window: consecutive floats, sorted
        xs = np.sort((bits + np.arange(-_WINDOW, _WINDOW + 1, dtype=np.int32)).view(np.float32))
        ok = keep(np.rint(xs * inv) + np.float32(z))
        flips = np.flatnonzero(ok[1:] != ok[:-1])
        if len(flips) != 1:
            return None
        i = int(flips[0])
        ends.append((float(xs[i + 1]), float(xs[i])) if ok[i + 1] else (float(xs[i]), float(xs[i + 1])))
    (lo, below_lo), (hi, above_hi) = ends
    return lo, hi, below_lo, above_hi


class _FakeQuantizePerTensor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, inv, zero_point, quant_min, quant_max, outside):
        # python floats holding float32 values: the kernels compute in float32, as torch's does
        y = torch.mul(x, inv).round_().add_(zero_point).clamp_(quant_min, quant_max).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(x)
        ctx.outside = outside
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        below_lo, above_hi = ctx.outside
        return torch.ops.aten.hardtanh_backward(grad, x, below_lo, above_hi), None, None, None, None, None, None


def fake_quantize_per_tensor(x, scale, zero_point, quant_min, quant_max):
    """torch's ``fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)``, bit for bit
    (outputs and gradients, for finite ``x``), from vectorized ops; torch's kernel where
    :func:`mask_interval` returns ``None``.

    ``scale``: a float32 value (a Python float, or a tensor of one element); ``zero_point``: an
    int (or a tensor of one element).
    """
    s = float(scale.item() if isinstance(scale, torch.Tensor) else np.float32(scale))
    z = int(zero_point.item() if isinstance(zero_point, torch.Tensor) else zero_point)
    interval = mask_interval(s, z, quant_min, quant_max)
    if interval is None:
        return torch.fake_quantize_per_tensor_affine(x, torch.tensor([s]), torch.tensor([z], dtype=torch.int32),
                                                     quant_min, quant_max)
    _, _, below_lo, above_hi = interval
    inv = float(np.float32(1) / np.float32(s))
    return _FakeQuantizePerTensor.apply(x, s, inv, z, quant_min, quant_max, (below_lo, above_hi))


@contextlib.contextmanager
def use_torch_kernel():
    """Within the block every fake-quantizer of this module calls torch's fused op, as torch's own
    class does: to time the two (notebook 10) or compare them. Blocks nest."""
    _USE_TORCH_KERNEL[0] += 1
    try:
        yield
    finally:
        _USE_TORCH_KERNEL[0] -= 1


def takes_fast_path(module, x):
    """Whether :func:`observe_and_fake_quantize` computes ``module(x)`` itself (else torch's fused op)."""
    return (not _USE_TORCH_KERNEL[0] and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and not module.is_per_channel and module.fake_quant_enabled.item() == 1
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def observe_moving_average_minmax(observer, x):
    """The per-tensor observer step of torch's fused op, in place on ``observer.min_val`` / ``max_val``::

        m <- min(x)                   on the first call (m is still +inf)
        m <- m + c * (min(x) - m)     after, with c = averaging_constant

    and the same for the maximum, each operation rounded to float32 as the C++ kernel does.
    """
    c = np.float32(observer.averaging_constant)
    for running, current in zip((observer.min_val, observer.max_val), torch.aminmax(x.detach())):
        m, v = np.float32(running.item()), np.float32(current.item())
        running.fill_(float(v if np.isinf(m) else m + c * (v - m)))


def observe_and_fake_quantize(module, x):
    """``FusedMovingAvgObsFakeQuantize.forward(x)`` for a per-tensor CPU float32 ``x``, the same numbers.

    1. observer on: :func:`observe_moving_average_minmax` (the fused op's own update, without the
       copy of ``x`` and the all-true mask it returns when fake quantization is off);
    2. torch's fused op on one zero, fake quantization on: it computes the scale and zero-point
       from the running min/max into the module's buffers, as it does before fake-quantizing;
    3. :func:`fake_quantize_per_tensor` with those buffers.
    """
    obs = module.activation_post_process
    on, off, zero = _flags()
    args = (obs.min_val, obs.max_val, module.scale, module.zero_point, obs.averaging_constant,
            obs.quant_min, obs.quant_max, module.ch_axis, False, module.is_symmetric_quant)
    with torch.no_grad():
        if module.observer_enabled.item() == 1:
            observe_moving_average_minmax(obs, x)
        torch.fused_moving_avg_obs_fake_quant(zero, off, on, *args)   # scale and zero-point from min/max
    return fake_quantize_per_tensor(x, module.scale, module.zero_point, obs.quant_min, obs.quant_max)


class FastForward:
    """Mixin for a fused observer + fake-quantizer class (torch.ao's or torchao's
    ``FusedMovingAvgObsFakeQuantize``): a per-tensor CPU float32 input goes through
    :func:`observe_and_fake_quantize`, anything else through the class's own ``forward``."""

    def forward(self, X):
        if takes_fast_path(self, X):
            return observe_and_fake_quantize(self, X)
        return super().forward(X)


def _make_eager_class():
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

    class FastFusedMovingAvgObsFakeQuantize(FastForward, FusedMovingAvgObsFakeQuantize):
        """torch.ao's fused observer + fake-quantizer for eager QAT (:func:`qatlab.qat.make_qconfig`),
        the same numbers from :class:`FastForward`."""

    FastFusedMovingAvgObsFakeQuantize.__module__ = __name__
    return FastFusedMovingAvgObsFakeQuantize


FastFusedMovingAvgObsFakeQuantize = _make_eager_class()
