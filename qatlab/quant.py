"""Fake quantization from scratch: qparams, quantize, dequantize, fake-quantize.

Taught in 01_fake_quant_math. Everything here equals a torch op bit for bit
(``tests/test_quant.py`` checks it on random shapes and bit widths):

==============================  ===================================================
ours                            torch
==============================  ===================================================
``choose_qparams``              ``MinMaxObserver`` / ``PerChannelMinMaxObserver``
                                ``.calculate_qparams()``
``quantize``                    ``torch.quantize_per_tensor(...).int_repr()`` /
                                ``quantize_per_channel``
``dequantize``                  ``qtensor.dequantize()``
``fake_quantize``               ``torch.fake_quantize_per_tensor_affine`` /
                                ``fake_quantize_per_channel_affine`` (forward and
                                backward)
==============================  ===================================================

The affine map, in float32 exactly as torch's CPU kernels compute it::

    q     = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)
    x_hat = (q - zero_point) * scale            # dequantize(quantize(x))

``round`` is round-half-to-even (``torch.round`` / C's ``nearbyint``), torch
multiplies by ``1 / scale`` rather than dividing, and it adds the zero-point
*after* rounding. Per-channel: ``scale`` and ``zero_point`` hold one value per
slice along ``axis``.

Not covered by the bit-exact contract: NaN and ±inf inputs, and values with
``|x / scale| > 2**63``; torch's kernels cast those to int64, which is undefined
behaviour in C++ (on x86 its per-channel kernel maps ``+inf`` to ``quant_min``).

The plotting helpers at the bottom (``plot_staircase``, ``plot_fake_quant``,
``explore_fake_quant``, ...) draw the figures of notebook 01.
"""

import operator

import torch

#: The integer range of each storage dtype (one table, as in torchao's quant_primitives).
QUANT_RANGES = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.uint16: (0, 2**16 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}

#: torch observers' default floor on the scale: ``torch.finfo(torch.float32).eps``.
EPS = torch.finfo(torch.float32).eps


def quant_range(bits, signed=True):
    """``(quant_min, quant_max)`` of a ``bits``-bit integer. Taught in 01_fake_quant_math.

    signed: ``(-2**(bits-1), 2**(bits-1) - 1)``; unsigned: ``(0, 2**bits - 1)``.

    >>> quant_range(8), quant_range(8, signed=False), quant_range(4)
    ((-128, 127), (0, 255), (-8, 7))
    """
    bits = _as_int(bits, "bits")
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be between 1 and 32, got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def storage_dtype(quant_min, quant_max):
    """The smallest integer dtype that holds ``[quant_min, quant_max]``.

    >>> storage_dtype(-128, 127), storage_dtype(0, 255), storage_dtype(0, 65535)
    (torch.int8, torch.uint8, torch.int32)
    """
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        lo, hi = QUANT_RANGES[dtype]
        if lo <= quant_min and quant_max <= hi:
            return dtype
    return torch.int64


# ---------------------------------------------------------------------------
# choose_qparams
# ---------------------------------------------------------------------------

def choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=False, *,
                   eps=EPS, customized_qrange=None):
    """``(scale, zero_point)`` for values in ``[min_val, max_val]``. Taught in 01_fake_quant_math.

    Equals ``MinMaxObserver`` / ``PerChannelMinMaxObserver.calculate_qparams()``
    for the same min/max, range and scheme. Tensors of min/max (one per channel)
    give per-channel results; a number or 0-d tensor gives tensors of shape ``(1,)``
    (as torch does). Computed in float32::

        lo, hi = min(min_val, 0), max(max_val, 0)      # the range always holds 0
        affine:     scale = max((hi - lo) / (quant_max - quant_min), eps)
                    zero_point = clamp(quant_min - round(lo / scale), quant_min, quant_max)
        symmetric:  scale = max(max(-lo, hi) / ((quant_max - quant_min) / 2), eps)
                    zero_point = 0                      if quant_min < 0 (signed)
                               = the range's midpoint   if quant_min >= 0 (unsigned)

    The unsigned midpoint follows torch: a ``quint8`` observer built without an
    explicit range uses 128 (``uint16``: 32768); one built *with* an explicit
    ``quant_min``/``quant_max`` ("customized qrange") uses
    ``(quant_min + quant_max) // 2``. By default we assume the explicit range
    unless it is exactly ``(0, 255)`` or ``(0, 65535)``; pass
    ``customized_qrange=True/False`` to pick.

    ``zero_point`` is int32 (torch returns int32 for affine and int64 for
    symmetric; the values are equal). ``eps`` is torch's default floor.

    >>> choose_qparams(-1.0, 3.0, 0, 255)                  # affine uint8
    (tensor([0.0157]), tensor([64], dtype=torch.int32))
    >>> choose_qparams(0.5, 2.0, -128, 127, symmetric=True)  # the range stretches to 0
    (tensor([0.0157]), tensor([0], dtype=torch.int32))
    >>> choose_qparams(-1.0, 1.0, 0, 255, symmetric=True)[1]
    tensor([128], dtype=torch.int32)
    >>> choose_qparams(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0]), -8, 7)
    (tensor([1.3333e-01, 1.1921e-07]), tensor([-1, -8], dtype=torch.int32))
    """
    quant_min, quant_max = _check_range(quant_min, quant_max)
    min_val = _as_minmax(min_val, "min_val")
    max_val = _as_minmax(max_val, "max_val")
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape, got "
                         f"{tuple(min_val.shape)} and {tuple(max_val.shape)}")
    bad = min_val > max_val
    if bad.any():
        i = _first_index(bad)
        raise ValueError(f"min_val must be <= max_val, got min_val={min_val.reshape(-1)[i].item()} "
                         f"> max_val={max_val.reshape(-1)[i].item()} at index {i}")
    eps = torch.tensor([float(eps)], dtype=torch.float32)

    lo = torch.min(min_val, torch.zeros_like(min_val))
    hi = torch.max(max_val, torch.zeros_like(max_val))
    if symmetric:
        hi = torch.max(-lo, hi)
        scale = torch.max(hi / (float(quant_max - quant_min) / 2), eps)
        if quant_min < 0:
            zp = 0
        else:
            if customized_qrange is None:
                customized_qrange = (quant_min, quant_max) not in ((0, 255), (0, 2**16 - 1))
            zp = (quant_min + quant_max) // 2 if customized_qrange else (quant_max + 1) // 2
        zero_point = torch.full(scale.shape, zp, dtype=torch.int32)
    else:
        scale = torch.max((hi - lo) / float(quant_max - quant_min), eps)
        zero_point = quant_min - torch.round(lo / scale).to(torch.int32)
        zero_point = torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)
    if scale.dim() == 0:
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    return scale, zero_point


# ---------------------------------------------------------------------------
# quantize / dequantize / fake_quantize
# ---------------------------------------------------------------------------

def quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    """Float → integer: ``clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max)``.

    Taught in 01_fake_quant_math. Equals ``torch.quantize_per_tensor(x, scale,
    zero_point, dtype).int_repr()`` (``quantize_per_channel`` when ``axis`` is
    given) for int8/uint8. Returns the smallest integer dtype that holds the
    range (int8 for ``(-128, 127)``, uint8 for ``(0, 255)``, ...).

    >>> quantize(torch.tensor([-1.0, 0.0, 0.25, 0.75, 9.0]), 0.5, 0, -128, 127)
    tensor([-2,  0,  0,  2, 18], dtype=torch.int8)
    """
    x, scale, zero_point, quant_min, quant_max = _prepare(x, scale, zero_point,
                                                          quant_min, quant_max, axis)
    q = torch.round(x * (1.0 / scale)) + zero_point
    return q.clamp(quant_min, quant_max).to(storage_dtype(quant_min, quant_max))


def dequantize(q, scale, zero_point, axis=None):
    """Integer → float: ``(q - zero_point) * scale`` in float32. Taught in 01_fake_quant_math.

    Equals ``qtensor.dequantize()`` of torch's quantized tensors.

    >>> dequantize(torch.tensor([-2, 0, 18], dtype=torch.int8), 0.5, 0)
    tensor([-1.,  0.,  9.])
    """
    q = torch.as_tensor(q)
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor, got dtype {q.dtype}")
    scale, zero_point = _prepare_qparams(q, scale, zero_point, None, None, axis)
    return (q.to(torch.int64) - zero_point).to(torch.float32) * scale


class FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization with the straight-through estimator (STE). Taught in 01_fake_quant_math.

    forward:  ``x_hat = (clamp(q, quant_min, quant_max) - zero_point) * scale``
              with ``q = round(x * (1/scale)) + zero_point``
    backward: ``dx = dy * mask`` with ``mask = (quant_min <= q <= quant_max)``:
              round's own derivative is 0 almost everywhere, so the STE passes
              the gradient straight through, except where the clamp saturated.
    Expects ``scale``/``zero_point`` already shaped to broadcast against ``x``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):
        q = torch.round(x * (1.0 / scale)) + zero_point
        mask = (q >= quant_min) & (q <= quant_max)
        ctx.save_for_backward(mask)
        return (q.clamp(quant_min, quant_max) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return grad_output * mask, None, None, None, None


def fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    """Quantize then dequantize, in float, with an STE gradient. Taught in 01_fake_quant_math.

    ``fake_quantize(x) == dequantize(quantize(x))`` and equals
    ``torch.fake_quantize_per_tensor_affine`` (``axis=None``) or
    ``torch.fake_quantize_per_channel_affine`` (``axis`` given) bit for bit,
    forward and backward, for any range from 2 to 16 bits::

        x_hat = (clamp(round(x * (1/scale)) + zero_point, quant_min, quant_max) - zero_point) * scale
        dx    = dy * (quant_min <= round(x * (1/scale)) + zero_point <= quant_max)

    >>> x = torch.tensor([-3.0, -0.26, 0.25, 0.7, 3.0], requires_grad=True)
    >>> y = fake_quantize(x, 0.5, 0, -4, 3)
    >>> y.detach()
    tensor([-2.0000, -0.5000,  0.0000,  0.5000,  1.5000])
    >>> y.sum().backward(); x.grad
    tensor([0., 1., 1., 1., 0.])
    """
    x, scale, zero_point, quant_min, quant_max = _prepare(x, scale, zero_point,
                                                          quant_min, quant_max, axis)
    return FakeQuantizeSTE.apply(x, scale, zero_point, quant_min, quant_max)


def fake_quantize_with_torch(x, scale, zero_point, quant_min, quant_max, axis=None):
    """torch's own op for the same arguments: the reference ``fake_quantize`` is compared with.

    Calls ``torch.fake_quantize_per_tensor_affine`` or, with ``axis``,
    ``torch.fake_quantize_per_channel_affine`` (float32 scale, int32 zero-point).

    >>> fake_quantize_with_torch(torch.tensor([0.25, 0.75]), 0.5, 0, -128, 127)
    tensor([0., 1.])
    """
    x = torch.as_tensor(x)
    quant_min, quant_max = _check_range(quant_min, quant_max)
    if axis is None:
        scale = _as_qparam_tensor(scale, "scale", torch.float32).reshape(-1)
        zero_point = _as_qparam_tensor(zero_point, "zero_point", torch.int32).reshape(-1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
    axis = _check_axis(axis, x.dim())
    scale = _as_qparam_tensor(scale, "scale", torch.float32).reshape(-1)
    zero_point = _as_qparam_tensor(zero_point, "zero_point", torch.int32).reshape(-1)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max)


def sqnr_db(x, x_hat):
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum x^2 / sum (x - x_hat)^2)``.

    Taught in 01_fake_quant_math (error vs bit width; the 6.02 dB/bit rule).

    >>> round(sqnr_db(torch.tensor([1.0, -1.0]), torch.tensor([0.9, -1.1])), 2)
    20.0
    """
    x, x_hat = torch.as_tensor(x).double(), torch.as_tensor(x_hat).double()
    noise = (x - x_hat).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(x.pow(2).sum() / noise))


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _as_int(value, name):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _check_range(quant_min, quant_max):
    quant_min, quant_max = _as_int(quant_min, "quant_min"), _as_int(quant_max, "quant_max")
    if quant_min >= quant_max:
        raise ValueError(f"quant_min must be < quant_max, got quant_min={quant_min}, "
                         f"quant_max={quant_max}")
    return quant_min, quant_max


def _first_index(bad):
    return int(bad.reshape(-1).nonzero()[0, 0])


def _as_minmax(value, name):
    t = torch.as_tensor(value)
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int16,
                                                  torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real number or tensor, got dtype {t.dtype}")
    t = t.detach().to(torch.float32)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: observe some data first")
    bad = ~torch.isfinite(t)
    if bad.any():
        i = _first_index(bad)
        raise ValueError(f"{name} must be finite, got {t.reshape(-1)[i].item()} at index {i}")
    return t


def _as_qparam_tensor(value, name, dtype):
    t = torch.as_tensor(value).detach()
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    return t.to(dtype)


def _check_axis(axis, ndim):
    axis = _as_int(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def _prepare_qparams(x, scale, zero_point, quant_min, quant_max, axis):
    """Validate scale/zero_point and shape them to broadcast against ``x``."""
    s = torch.as_tensor(scale).detach()
    if s.is_complex() or s.dtype == torch.bool:
        raise TypeError(f"scale must be real, got dtype {s.dtype}")
    s = s.to(torch.float32)
    z = torch.as_tensor(zero_point).detach()
    if z.is_complex() or z.dtype == torch.bool:
        raise TypeError(f"zero_point must be real, got dtype {z.dtype}")
    if z.is_floating_point():
        frac = z != torch.round(z)
        if frac.any():
            i = _first_index(frac)
            raise ValueError(f"zero_point must hold integers, got {z.reshape(-1)[i].item()} "
                             f"at index {i}")
    z = z.to(torch.int64)
    if axis is None:
        if s.numel() != 1 or z.numel() != 1:
            raise ValueError(f"per-tensor quantization needs one scale and one zero_point, got "
                             f"scale of shape {tuple(s.shape)} and zero_point of shape "
                             f"{tuple(z.shape)} (pass axis=... for per-channel)")
        s, z = s.reshape(()), z.reshape(())
    else:
        axis = _check_axis(axis, x.dim())
        channels = x.shape[axis]
        for name, t in (("scale", s), ("zero_point", z)):
            if t.dim() > 1 or t.numel() != channels:
                raise ValueError(f"per-channel {name} must have shape ({channels},) for axis "
                                 f"{axis} of input shape {tuple(x.shape)}, got {tuple(t.shape)}")
        shape = [1] * x.dim()
        shape[axis] = channels
        s, z = s.reshape(shape), z.reshape(shape)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():
        i = _first_index(bad)
        raise ValueError(f"scale must be positive and finite, got {s.reshape(-1)[i].item()} "
                         f"at index {i}")
    if quant_min is not None:
        out = (z < quant_min) | (z > quant_max)
        if out.any():
            i = _first_index(out)
            raise ValueError(f"zero_point {z.reshape(-1)[i].item()} (index {i}) is outside "
                             f"[quant_min, quant_max] = [{quant_min}, {quant_max}]")
    return s, z


def _prepare(x, scale, zero_point, quant_min, quant_max, axis):
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    quant_min, quant_max = _check_range(quant_min, quant_max)
    scale, zero_point = _prepare_qparams(x, scale, zero_point, quant_min, quant_max, axis)
    return x, scale, zero_point, quant_min, quant_max


# ---------------------------------------------------------------------------
# plots and the explorer of notebook 01 (matplotlib / ipywidgets imported inside)
# ---------------------------------------------------------------------------

def _axes(ax, figsize=(5, 3.5)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def clamp_points(scale, zero_point, quant_min, quant_max):
    """``(x_lo, x_hi)``: where a quantizer starts to saturate.

    The grid ends at ``(quant_min - zero_point) * scale`` and
    ``(quant_max - zero_point) * scale``, but values up to half a step beyond
    an end still round onto it; only past ``end ± scale / 2`` does the clamp
    change the result. Taught in 01_fake_quant_math.

    >>> clamp_points(0.25, 0, -4, 3)
    (-1.125, 0.875)
    """
    scale, zero_point = float(scale), int(zero_point)
    return (quant_min - zero_point - 0.5) * scale, (quant_max - zero_point + 0.5) * scale


def plot_staircase(x, x_hat, ax=None, title=None, clip=None):
    """Plot ``x_hat`` against ``x`` (the staircase) over the identity line; return ``ax``.

    ``clip=(x_lo, x_hi)`` shades where the quantizer saturates (see
    :func:`clamp_points`). Taught in 01_fake_quant_math.
    """
    ax = _axes(ax)
    x, x_hat = torch.as_tensor(x).detach().reshape(-1), torch.as_tensor(x_hat).detach().reshape(-1)
    order = torch.argsort(x)
    x, x_hat = x[order].numpy(), x_hat[order].numpy()
    ax.plot(x, x, color="0.7", lw=1, ls="--", label="identity (no error)")
    ax.plot(x, x_hat, color="C0", lw=1.5, drawstyle="steps-mid", label="fake_quantize(x)")
    if clip is not None:
        lo, hi = clip
        ax.axvspan(min(x.min(), lo), lo, color="C3", alpha=0.12, lw=0, label="saturated (clamped)")
        ax.axvspan(hi, max(x.max(), hi), color="C3", alpha=0.12, lw=0)
    ax.set_xlabel("input value x")
    ax.set_ylabel("fake-quantized value")
    ax.set_title(title or "fake-quant staircase")
    return ax


def plot_quant_error(x, x_hat, scale=None, ax=None, title=None, clip=None):
    """Plot the error ``x_hat - x`` against ``x``; return ``ax``.

    With ``scale``, the band ±scale/2 that rounding stays within is drawn
    between the clamp points ``clip=(x_lo, x_hi)`` (everywhere when ``clip`` is None).
    """
    ax = _axes(ax)
    x, x_hat = torch.as_tensor(x).detach().reshape(-1), torch.as_tensor(x_hat).detach().reshape(-1)
    order = torch.argsort(x)
    x, err = x[order].numpy(), (x_hat - x)[order].numpy()
    ax.plot(x, err, color="C1", lw=1, label="error")
    if clip is not None:
        lo, hi = clip
        ax.axvspan(min(x.min(), lo), lo, color="C3", alpha=0.12, lw=0)
        ax.axvspan(hi, max(x.max(), hi), color="C3", alpha=0.12, lw=0)
    if scale is not None:
        s = float(torch.as_tensor(scale).reshape(-1)[0])
        lo, hi = clip if clip is not None else (x.min(), x.max())
        ax.fill_between([lo, hi], -s / 2, s / 2, color="C2", alpha=0.2, lw=0,
                        label="±scale/2 (rounding only)")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("input value x")
    ax.set_ylabel("error: fake-quantized − x")
    ax.set_title(title or "quantization error")
    return ax


def plot_fake_quant(bits=4, min_val=-1.0, max_val=1.0, symmetric=False, axes=None):
    """Staircase and error of a ``bits``-bit signed quantizer calibrated on ``[min_val, max_val]``.

    The plain function behind :func:`explore_fake_quant`; returns the two axes.
    Three things are marked, and they differ: the calibrated range (dotted),
    the grid's end points (the first and last step) and the clamp points half
    a step further out, where saturation starts (shaded, :func:`clamp_points`).
    Taught in 01_fake_quant_math.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    quant_min, quant_max = quant_range(bits)
    scale, zero_point = choose_qparams(min_val, max_val, quant_min, quant_max, symmetric=symmetric)
    x = torch.linspace(-2.5, 2.5, 2001)
    x_hat = fake_quantize(x, scale, zero_point, quant_min, quant_max)
    clip = clamp_points(scale, zero_point, quant_min, quant_max)
    grid_lo = float((quant_min - zero_point) * scale)
    grid_hi = float((quant_max - zero_point) * scale)
    inside = (x >= min_val) & (x <= max_val)
    rmse = float((x_hat - x)[inside].pow(2).mean().sqrt())
    scheme = "symmetric" if symmetric else "affine"
    plot_staircase(x, x_hat, ax=axes[0], clip=clip,
                   title=f"{bits}-bit {scheme}: scale={float(scale):.4f}, zero_point={int(zero_point)}")
    axes[0].plot([grid_lo, grid_hi], [grid_lo, grid_hi], "o", color="C0", ms=5,
                 label="grid ends (first and last code)")
    plot_quant_error(x, x_hat, scale=scale, ax=axes[1], clip=clip,
                     title=f"error (RMSE on [{min_val:g}, {max_val:g}] = {rmse:.4f})")
    for ax in axes:
        ax.axvline(min_val, color="k", lw=0.9, ls=":")
        ax.axvline(max_val, color="k", lw=0.9, ls=":", label="calibrated range [min_val, max_val]")
    axes[1].set_ylim(-max(0.6, float(scale)), max(0.6, float(scale)))
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig = axes[0].figure
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return axes


def show_fake_quant(bits=4, min_val=-1.0, max_val=1.0, symmetric=False):
    """Draw :func:`plot_fake_quant` and show it (what the ipywidgets explorer calls)."""
    import matplotlib.pyplot as plt

    plot_fake_quant(bits, min_val, max_val, symmetric)
    plt.show()


def explore_fake_quant(bits=4, min_val=-0.5, max_val=1.5, symmetric=False):
    """An ipywidgets explorer over :func:`show_fake_quant`: bits, range, symmetric toggle
    (:func:`qatlab.interactive.interact`: drawn once at the start values in a headless run)."""
    from ipywidgets import Checkbox, FloatSlider, IntSlider

    from .interactive import interact

    interact(show_fake_quant,
             bits=IntSlider(value=bits, min=2, max=8, description="bits"),
             min_val=FloatSlider(value=min_val, min=-2.0, max=0.0, step=0.05, description="min_val"),
             max_val=FloatSlider(value=max_val, min=0.0, max=2.0, step=0.05, description="max_val"),
             symmetric=Checkbox(value=symmetric, description="symmetric"))


def plot_channel_errors(per_tensor, per_channel, ax=None, ylabel="SQNR (dB)", title=None):
    """One marker per output channel, per-tensor vs per-channel qparams; return ``ax``.

    The y-axis is fitted to the data (it does not start at zero) and the
    legend sits outside it. Taught in 01_fake_quant_math (granularity of the scale).
    """
    import numpy as np

    ax = _axes(ax, figsize=(9, 3.2))
    per_tensor = np.asarray(torch.as_tensor(per_tensor).detach().double())
    per_channel = np.asarray(torch.as_tensor(per_channel).detach().double())
    idx = np.arange(len(per_tensor))
    ax.vlines(idx, per_tensor, per_channel, color="0.75", lw=1)
    ax.plot(idx, per_tensor, "o", color="C3", ms=4, label="one scale per tensor")
    ax.plot(idx, per_channel, "o", color="C0", ms=4, label="one scale per channel")
    ax.set_xlabel("output channel")
    ax.set_ylabel(ylabel + " (axis not from 0)")
    ax.set_title(title or "weight error per channel")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def plot_channel_gain(range_ratio, gain_db, ax=None, title=None):
    """Per-channel SQNR gain against ``tensor range / channel range``, with the prediction.

    With one scale per channel, a channel whose largest magnitude is ``r``
    times smaller than the tensor's gets a step ``r`` times finer, so its
    rounding-noise power falls by ``r**2``: a gain of ``20 log10(r)`` dB
    (the dashed line). Taught in 01_fake_quant_math.
    """
    import numpy as np

    ax = _axes(ax, figsize=(6.5, 3.6))
    r = np.asarray(torch.as_tensor(range_ratio).detach().double())
    g = np.asarray(torch.as_tensor(gain_db).detach().double())
    line = np.linspace(1.0, max(float(r.max()), 1.05), 50)
    ax.plot(line, 20 * np.log10(line), color="0.4", ls="--", lw=1,
            label="predicted: 20·log10(ratio)")
    ax.plot(r, g, "o", color="C0", ms=5, label="measured, one dot per channel")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set_xlabel("tensor's max |w| / channel's max |w|")
    ax.set_ylabel("SQNR gain of per-channel (dB)")
    ax.set_title(title or "per-channel gain follows the channel's range")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax


def plot_sqnr(bits, sqnr, slope=None, intercept=None, ax=None, title=None):
    """SQNR (dB) against bit width, with the fitted line and the 6.02 dB/bit rule; return ``ax``."""
    import numpy as np

    ax = _axes(ax)
    bits = np.asarray(bits, dtype=float)
    ax.plot(bits, sqnr, "o", color="C0", label="measured")
    if slope is not None:
        ax.plot(bits, slope * bits + intercept, color="C0", lw=1,
                label=f"fit: {slope:.2f} dB/bit")
        ax.plot(bits, 6.02 * bits + (intercept + (slope - 6.02) * bits.mean()), color="0.5",
                ls="--", lw=1, label="6.02 dB/bit rule")
    ax.set_xlabel("bits")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title or "error vs bit width")
    ax.legend(fontsize=8)
    return ax


def plot_ste(x, y, grad_round, grad_ste, ax=None):
    """round(x) and two gradients: round's true one (0) and the STE's clamp mask; return ``ax``."""
    ax = _axes(ax)
    x = torch.as_tensor(x).detach().numpy()
    ax.plot(x, torch.as_tensor(y).detach().numpy(), color="C0", label="fake_quantize(x)")
    ax.plot(x, torch.as_tensor(grad_round).detach().numpy(), color="C3", ls="--",
            label="d round / dx (autograd)")
    ax.plot(x, torch.as_tensor(grad_ste).detach().numpy(), color="C2", lw=2, alpha=0.7,
            label="STE gradient (clamp mask)")
    ax.set_xlabel("x")
    ax.set_title("straight-through estimator")
    ax.legend(fontsize=8)
    return ax
