"""Group-wise weights and per-token activations, from scratch: the arithmetic of torchao's QAT.

Taught in 07_qat_transformers. torchao's ``QATConfig`` with an "8da4w" base config
(``Int8DynamicActivationIntxWeightConfig``) fake-quantizes every ``nn.Linear``
it swaps twice per forward pass:

- **weights, group-wise symmetric.** The ``(out, in)`` weight is cut into groups
  of ``group_size`` consecutive input columns; each group gets its own scale
  (``group_size=None`` means one group per row: per-channel, the limit)::

      qmin, qmax = -2**(bits-1), 2**(bits-1) - 1        # int4: -8, 7;  int2: -2, 1
      amax  = max(-min(min(group), 0), max(max(group), 0))
      scale = max(amax / ((qmax - qmin) / 2), eps)       # int4: amax / 7.5
      q     = clamp(round(w * (1 / scale)), qmin, qmax)  # zero-point 0
      w_hat = q * scale

  Dividing by ``(qmax - qmin) / 2`` (7.5 for int4, 1.5 for int2) rather than by
  ``qmax`` means the group's largest magnitude lands on a half step: ``-amax``
  rounds (half to even) onto ``qmin`` and ``+amax`` rounds to ``qmax + 1``,
  which the clamp pulls back to ``qmax``.

- **activations, per-token dynamic asymmetric int8.** Every row of the input
  (every token) gets its own scale and zero-point, computed from that row at
  run time::

      lo, hi = min(min(row), 0), max(max(row), 0)
      scale  = max((hi - lo) / 255, eps)
      zp     = clamp(-128 - round(lo / scale), -128, 127)
      x_hat  = (clamp(round(x * (1 / scale)) + zp, -128, 127) - zp) * scale

**Dtypes** (what LLM QAT in bfloat16 needs). The ranges, ``scale`` and ``zp`` are
computed in the input's dtype, with ``eps = torch.finfo(input.dtype).smallest_normal``
(about 1.2e-38 in float32 and bfloat16, 6.1e-5 in float16; not the machine epsilon
torch's observers use); then ``scale`` is cast to ``scale_dtype``. The quantize and
dequantize steps run in the promoted dtype of input and scale, and the result is cast
back to the input's dtype. ``scale_dtype=torch.float32`` (the default) is
``IntxFakeQuantizeConfig``'s default ``scale_precision``: a bfloat16 weight is quantized
in float32. ``scale_dtype=None`` keeps the input's dtype, as ``QATConfig`` with an
8da4w base config does (it passes ``scale_precision=None``) and as the converted
model's activation quantizer does: there a bfloat16 weight is quantized in bfloat16,
so some codes differ from the float32 path. ``round`` is half to even.

Backward (the straight-through estimator) is autograd of that forward with
``round``'s derivative replaced by 1 (:class:`RoundSTE`) and the scale treated as a
constant (it is computed under ``no_grad``), so in float32::

    dw = where(qmin < round(w * (1 / scale)) + zp < qmax, dy * scale, 0) * (1 / scale)

which equals ``dy`` strictly inside the range (up to float round-off) and 0
elsewhere: torch's ``clamp`` passes no gradient at exactly ``qmin`` or ``qmax``
either, so a weight whose code lands on an end of the grid does not move
(``torch.fake_quantize_*``, notebook 01, passes the gradient there). In bfloat16 or
float16 each product is rounded to the dtype of the tensor it flows back to, as
autograd does. Everything here equals torchao 0.18's primitives
(``choose_qparams_affine``, ``quantize_affine``, ``dequantize_affine``) and the
``IntxFakeQuantizer`` modules that ``QATConfig`` inserts, bit for bit, forward
and backward, in float32, float16 and bfloat16 (``tests/test_groupwise.py``).

The rest of the module is what the notebook needs around it: which layers can
take a group size (:func:`make_group_filter`), storage cost
(:func:`bits_per_weight`), and the error of each scheme on real weights
(:func:`sqnr_table`).
"""

import math

import torch

from .quant import quant_range, sqnr_db

#: torchao's floor on a float32 scale: the smallest normal float32 (see :func:`scale_floor`).
EPS = torch.finfo(torch.float32).smallest_normal

#: the input dtypes torchao's affine primitives accept
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scale_floor(dtype):
    """torchao's default ``eps`` for an input of ``dtype``: its smallest normal number.

    Taught in 07_qat_transformers. A scale is floored at ``eps`` so that an
    all-zero group does not divide by zero. The floor must be a normal number
    *of the input's dtype*: float32's (1.2e-38) is 0 in float16, and ``1 / scale``
    of a float16 subnormal overflows to ``inf``.

    >>> scale_floor(torch.float32) == EPS, scale_floor(torch.float16), scale_floor(torch.bfloat16) == EPS
    (True, 6.103515625e-05, True)
    """
    return torch.finfo(dtype).smallest_normal


def _check_float(t, name):
    if not t.is_floating_point() or t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, float16 or bfloat16 tensor, got dtype {t.dtype}")
    return t


def _check_scale_dtype(scale_dtype, default):
    if scale_dtype is None:
        return default
    if scale_dtype not in FLOAT_DTYPES:
        raise ValueError(f"scale_dtype must be torch.float32, torch.float16, torch.bfloat16 or None "
                         f"(the input's dtype), got {scale_dtype!r}")
    return scale_dtype


def _check_eps(eps, dtype):
    if eps is None:
        return scale_floor(dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number or None (the dtype's smallest normal), "
                         f"got {eps!r}")
    return eps


# ---------------------------------------------------------------------------
# weights: group-wise symmetric
# ---------------------------------------------------------------------------

def weight_qrange(bits):
    """``(qmin, qmax)`` of a signed ``bits``-bit weight, as torchao's ``torch.int{bits}`` bounds.

    Taught in 07_qat_transformers.

    >>> [weight_qrange(b) for b in (2, 3, 4, 8)]
    [(-2, 1), (-4, 3), (-8, 7), (-128, 127)]
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    return quant_range(bits)


def _check_weight(w):
    w = torch.as_tensor(w)
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")
    if w.shape[1] == 0:
        raise ValueError(f"w has no input columns (shape {tuple(w.shape)}): there is no group to take a "
                         f"scale from")
    return w


def _group_size(w, group_size):
    """The group size to use on ``w`` (``None`` -> per-channel), validated."""
    in_features = w.shape[1]
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None (per-channel), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}: "
                         f"every group must be whole (use a divisor of {in_features}, or None for per-channel)")
    return group_size


def _groups(w, group_size):
    """``w`` viewed as ``(out, n_groups, group_size)``."""
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def choose_qparams_groupwise(w, bits, group_size=None, eps=None, scale_dtype=torch.float32):
    """Symmetric per-group ``(scale, zero_point)`` of a 2-D weight. Taught in 07_qat_transformers.

    ``scale[r, j] = max(amax / ((qmax - qmin) / 2), eps)`` with ``amax`` the
    largest magnitude in row ``r``, columns ``j*group_size ... (j+1)*group_size - 1``
    (the range always holds 0), computed in ``w``'s dtype and then cast to
    ``scale_dtype`` (``None``: ``w``'s dtype). ``eps`` defaults to
    :func:`scale_floor` of ``w``'s dtype. ``zero_point`` is all zeros (int32).
    Both have shape ``(out_features, in_features // group_size)``;
    ``group_size=None`` is per-channel (one group per row). Equals torchao's
    ``choose_qparams_affine(w, MappingType.SYMMETRIC, (1, group_size), ...,
    scale_dtype=scale_dtype)`` with the bounds of ``torch.int{bits}``.

    >>> w = torch.tensor([[0.5, -1.5, 0.75, 0.25], [3.0, 0.0, -0.3, 0.6]])
    >>> scale, zp = choose_qparams_groupwise(w, bits=4, group_size=2)
    >>> scale                                   # amax / 7.5 per group of 2
    tensor([[0.2000, 0.1000],
            [0.4000, 0.0800]])
    >>> choose_qparams_groupwise(w, bits=4)[0]  # per-channel: one scale per row
    tensor([[0.2000],
            [0.4000]])
    >>> choose_qparams_groupwise(torch.zeros(1, 2, dtype=torch.float16), 4)[0]  # float16's floor
    tensor([[6.1035e-05]])
    """
    w = _check_weight(w)
    group_size = _group_size(w, group_size)
    qmin, qmax = weight_qrange(bits)
    eps = _check_eps(eps, w.dtype)
    scale_dtype = _check_scale_dtype(scale_dtype, w.dtype)
    g = _groups(w.detach(), group_size)
    lo = torch.min(torch.amin(g, dim=-1), torch.zeros(1, dtype=w.dtype))
    hi = torch.max(torch.amax(g, dim=-1), torch.zeros(1, dtype=w.dtype))
    amax = torch.max(-lo, hi)
    scale = torch.clamp(amax / (float(qmax - qmin) / 2), min=eps)
    return scale.to(scale_dtype), torch.zeros(scale.shape, dtype=torch.int32)


def quantize_groupwise(w, scale, bits):
    """Weight → int8 codes in ``[qmin, qmax]``: ``clamp(round(w * (1/scale)), qmin, qmax)``.

    ``scale`` has shape ``(out, n_groups)`` (from :func:`choose_qparams_groupwise`);
    the group size is ``in_features // n_groups``. The product is computed in the
    promoted dtype of ``w`` and ``scale`` (float32 for a bfloat16 weight with a
    float32 scale). Equals torchao's ``quantize_affine(w, (1, group_size), scale,
    zero_point, torch.int8, qmin, qmax)``. Taught in 07_qat_transformers.

    >>> w = torch.tensor([[0.5, -1.5, 0.75, 0.25]])
    >>> quantize_groupwise(w, torch.tensor([[0.2, 0.1]]), bits=4)   # -1.5/0.2 = -7.5 -> -8
    tensor([[ 2, -8,  7,  2]], dtype=torch.int8)
    """
    w = _check_weight(w)
    qmin, qmax = weight_qrange(bits)
    s = _check_scale(w, scale)
    q = torch.round(_groups(w, w.shape[1] // s.shape[1]) * (1.0 / s.unsqueeze(-1)))
    return q.clamp(qmin, qmax).reshape(w.shape).to(torch.int8)


def dequantize_groupwise(q, scale, output_dtype=torch.float32):
    """int codes → float: ``q * scale``, each group with its own scale. Taught in 07_qat_transformers.

    The codes are cast to ``output_dtype``, multiplied by the scale (in the
    promoted dtype) and the product is cast to ``output_dtype``. Equals torchao's
    ``dequantize_affine(..., output_dtype=output_dtype)`` (zero-point 0).

    >>> dequantize_groupwise(torch.tensor([[2, -8, 7, 2]], dtype=torch.int8), torch.tensor([[0.2, 0.1]]))
    tensor([[ 0.4000, -1.6000,  0.7000,  0.2000]])
    """
    q = torch.as_tensor(q)
    if q.is_floating_point() or q.dim() != 2:
        raise TypeError(f"q must be a 2-D integer tensor, got dtype {q.dtype} and shape {tuple(q.shape)}")
    if output_dtype not in FLOAT_DTYPES:
        raise ValueError(f"output_dtype must be torch.float32, torch.float16 or torch.bfloat16, "
                         f"got {output_dtype!r}")
    s = _check_scale(q, scale)
    out = _groups(q.to(output_dtype), q.shape[1] // s.shape[1]) * s.unsqueeze(-1)
    return out.reshape(q.shape).to(output_dtype)


def _check_scale(w, scale):
    s = torch.as_tensor(scale).detach()
    if not s.is_floating_point():
        raise TypeError(f"scale must be a floating-point tensor, got dtype {s.dtype}")
    if s.dim() == 1:
        s = s.unsqueeze(1)  # per-channel scales given as a vector
    if w.shape[1] == 0:
        raise ValueError(f"the weight has no input columns (shape {tuple(w.shape)})")
    if (s.dim() != 2 or s.shape[0] != w.shape[0] or s.shape[1] == 0 or s.shape[1] > w.shape[1]
            or w.shape[1] % s.shape[1]):
        raise ValueError(f"scale must have shape (out_features, in_features // group_size) = "
                         f"({w.shape[0]}, a divisor of {w.shape[1]}), got {tuple(s.shape)}")
    if s.numel() and not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError(f"scale must be positive and finite, got min {s.min().item()}")
    return s


class RoundSTE(torch.autograd.Function):
    """``round`` (half to even) forward, identity backward: the straight-through estimator.

    Taught in 07_qat_transformers. torchao's ``_Round``; everything else in a
    fake quantizer is ordinary torch ops, so autograd does the rest (the clamp's
    mask, the scale's products, the dtype casts).

    >>> x = torch.tensor([0.4, 1.5, 2.5], requires_grad=True)
    >>> y = RoundSTE.apply(x); y.sum().backward(); y.detach(), x.grad
    (tensor([0., 2., 2.]), tensor([1., 1., 1.]))
    """

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def _fake_quantize_affine(x, scale, zero_point, qmin, qmax):
    """``(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale`` in torchao's order and dtypes.

    ``scale`` and ``zero_point`` broadcast against ``x``; the quantize step runs in
    the promoted dtype of ``x`` and ``scale``, the codes are cast to ``x``'s dtype,
    multiplied by ``scale`` and the product cast back to ``x``'s dtype, as
    torchao's ``_fake_quantize_affine`` does.
    """
    q = torch.clamp(RoundSTE.apply(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return ((q.to(x.dtype) - zero_point.to(x.dtype)) * scale).to(x.dtype)


def fake_quantize_groupwise(w, bits, group_size=None, scale=None, scale_dtype=torch.float32):
    """Group-wise symmetric fake quantization of a weight, with the STE gradient.

    Taught in 07_qat_transformers. ``dequantize(quantize(w))`` with scales from
    :func:`choose_qparams_groupwise` (or the given ``scale``), returned in ``w``'s
    dtype; the gradient passes straight through except where the clamp saturated
    or the code landed exactly on ``qmin`` or ``qmax`` (torch's ``clamp`` passes no
    gradient at its bounds; ``torch.fake_quantize_*`` of notebook 01 does). Equals
    torchao's weight ``IntxFakeQuantizer`` (``IntxFakeQuantizeConfig(torch.int{bits},
    group_size=...)``, or ``"per_channel"`` for ``group_size=None``) bit for bit,
    forward and backward, in float32, float16 and bfloat16; ``scale_dtype=None``
    equals the quantizer ``QATConfig`` inserts for an 8da4w base config (scales
    kept in ``w``'s dtype).

    >>> w = torch.tensor([[0.5, -1.5, 0.75, 0.25]], requires_grad=True)
    >>> y = fake_quantize_groupwise(w, bits=4, group_size=2)
    >>> y.detach()                       # 0.75 is its group's +amax: 7.5 -> 8, clamped to 7
    tensor([[ 0.4000, -1.6000,  0.7000,  0.2000]])
    >>> y.sum().backward(); w.grad       # -1.5 lands exactly on qmin = -8: no gradient either
    tensor([[1., 0., 0., 1.]])
    """
    w = _check_weight(w)
    if scale is None:
        scale, _ = choose_qparams_groupwise(w, bits, group_size, scale_dtype=scale_dtype)
    s = _check_scale(w, scale)
    qmin, qmax = weight_qrange(bits)
    gs = w.shape[1] // s.shape[1]
    zp = torch.zeros(s.shape + (1,), dtype=torch.int32)
    out = _fake_quantize_affine(_groups(w, gs), s.unsqueeze(-1), zp, qmin, qmax)
    return out.reshape(w.shape)


# ---------------------------------------------------------------------------
# activations: per-token dynamic asymmetric
# ---------------------------------------------------------------------------

def _check_tokens(x):
    x = torch.as_tensor(x)
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x must be a floating-point tensor with at least 1 dimension, got "
                        f"dtype {x.dtype} and shape {tuple(x.shape)}")
    _check_float(x, "x")
    if x.shape[-1] == 0:
        raise ValueError(f"x has tokens of length 0 (shape {tuple(x.shape)}): there is no range to take "
                         f"a scale from")
    return x


def choose_qparams_per_token(x, bits=8, eps=None, scale_dtype=torch.float32):
    """Asymmetric per-token ``(scale, zero_point)``: one pair per row of the last dimension.

    Taught in 07_qat_transformers. For each token (each vector ``x[..., :]``)::

        lo, hi = min(min(row), 0), max(max(row), 0)
        scale  = max((hi - lo) / (qmax - qmin), eps)
        zp     = clamp(qmin - round(lo / scale), qmin, qmax)     # int32

    with ``(qmin, qmax) = (-128, 127)`` for 8 bits, all in ``x``'s dtype (``eps``
    defaults to :func:`scale_floor` of that dtype); ``scale`` is then cast to
    ``scale_dtype`` (``None``: ``x``'s dtype). Shapes are ``x.shape[:-1]``.
    Equals torchao's ``choose_qparams_affine(x, MappingType.ASYMMETRIC,
    (1, ..., 1, x.shape[-1]), torch.int8, scale_dtype=scale_dtype)``.

    >>> scale, zp = choose_qparams_per_token(torch.tensor([[0.0, 2.55], [-1.0, 1.55]]))
    >>> scale, zp
    (tensor([0.0100, 0.0100]), tensor([-128,  -28], dtype=torch.int32))
    """
    x = _check_tokens(x)
    qmin, qmax = quant_range(bits)
    eps = _check_eps(eps, x.dtype)
    scale_dtype = _check_scale_dtype(scale_dtype, x.dtype)
    x = x.detach()
    lo = torch.min(torch.amin(x, dim=-1), torch.zeros(1, dtype=x.dtype))
    hi = torch.max(torch.amax(x, dim=-1), torch.zeros(1, dtype=x.dtype))
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale.to(scale_dtype), zero_point.to(torch.int32)


def fake_quantize_per_token(x, bits=8, scale_dtype=torch.float32):
    """Per-token dynamic asymmetric fake quantization (int8 by default), with the STE gradient.

    Taught in 07_qat_transformers. The qparams come from ``x`` itself
    (:func:`choose_qparams_per_token`), at every call: "dynamic". Equals
    torchao's activation ``IntxFakeQuantizer`` (``IntxFakeQuantizeConfig(torch.int8,
    "per_token", is_symmetric=False)``) bit for bit, forward and backward, in
    float32, float16 and bfloat16; with ``scale_dtype=None`` it equals the
    quantizer ``QATConfig`` inserts for an 8da4w base config and the activation
    quantize-dequantize of a converted 8da4w ``Linear``.

    >>> fake_quantize_per_token(torch.tensor([[0.0, 1.0, 2.55], [-1.0, 0.004, 1.55]]))
    tensor([[ 0.0000,  1.0000,  2.5500],
            [-1.0000,  0.0000,  1.5500]])
    """
    x = _check_tokens(x)
    scale, zero_point = choose_qparams_per_token(x, bits, scale_dtype=scale_dtype)
    qmin, qmax = quant_range(bits)
    return _fake_quantize_affine(x, scale.unsqueeze(-1), zero_point.unsqueeze(-1), qmin, qmax)


# ---------------------------------------------------------------------------
# which layers can take a group size
# ---------------------------------------------------------------------------

def is_swappable_linear(module):
    """Whether torchao's ``quantize_`` (default ``filter_fn``) would quantize ``module``.

    An ``nn.Linear`` that is not ``nn.MultiheadAttention``'s ``out_proj``
    (``NonDynamicallyQuantizableLinear``): MHA reads ``out_proj.weight`` directly
    in its forward, so swapping that module would change nothing. MHA's input
    projection is a bare ``in_proj_weight`` parameter, not a module at all.
    Taught in 07_qat_transformers.

    >>> is_swappable_linear(torch.nn.Linear(4, 4)), is_swappable_linear(torch.nn.MultiheadAttention(4, 1).out_proj)
    (True, False)
    """
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    return isinstance(module, torch.nn.Linear) and not isinstance(module, NonDynamicallyQuantizableLinear)


def make_group_filter(model, group_size, on_mismatch="raise", verbose=False):
    """A ``filter_fn`` for torchao's ``quantize_`` that respects ``group_size``.

    Taught in 07_qat_transformers. Selects the layers torchao would quantize
    (:func:`is_swappable_linear`) whose ``in_features`` is a multiple of
    ``group_size`` (``None`` = per-channel: every layer fits). A layer that
    does not fit makes torchao fail deep inside (an assertion in
    ``choose_qparams_affine`` for PTQ, a ``ValueError`` without the layer's
    name for QAT); here it either raises a ``ValueError`` naming the layer
    (``on_mismatch="raise"``) or is left in float (``"skip"``), and the returned
    function lists what it did in ``.selected`` and ``.skipped``
    (``{name: reason}``); ``verbose=True`` prints the skipped layers.

    >>> net = torch.nn.Sequential(torch.nn.Linear(49, 64), torch.nn.Linear(64, 10))
    >>> make_group_filter(net, 32)
    Traceback (most recent call last):
    ...
    ValueError: layer '0' (Linear, in_features=49) cannot take group_size=32: 49 is not a multiple of 32; pass on_mismatch='skip' to keep it in float, or pick a group size that divides 49
    >>> f = make_group_filter(net, 32, on_mismatch="skip")
    >>> f.selected, f.skipped
    (['1'], {'0': 'in_features=49 is not a multiple of group_size=32'})
    >>> f(net[1], "1"), f(net[0], "0")
    (True, False)
    """
    if on_mismatch not in ("raise", "skip"):
        raise ValueError(f"on_mismatch must be 'raise' or 'skip', got {on_mismatch!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None (per-channel), got {group_size!r}")
    selected, skipped = [], {}
    for name, module in model.named_modules():
        if not is_swappable_linear(module):
            continue
        if group_size is not None and module.in_features % group_size:
            if on_mismatch == "raise":
                raise ValueError(f"layer {name!r} ({type(module).__name__}, in_features={module.in_features}) "
                                 f"cannot take group_size={group_size}: {module.in_features} is not a multiple "
                                 f"of {group_size}; pass on_mismatch='skip' to keep it in float, or pick a "
                                 f"group size that divides {module.in_features}")
            skipped[name] = f"in_features={module.in_features} is not a multiple of group_size={group_size}"
            continue
        selected.append(name)
    chosen = set(selected)

    def filter_fn(module, fqn):
        return fqn in chosen and is_swappable_linear(module)

    filter_fn.selected, filter_fn.skipped = selected, skipped
    if verbose:
        for name, reason in skipped.items():
            print(f"kept in float: {name!r} ({reason})")
    return filter_fn


# ---------------------------------------------------------------------------
# storage and error
# ---------------------------------------------------------------------------

def bits_per_weight(bits, group_size, scale_bits=32, zero_point_bits=0):
    """Storage per weight, scales included: ``bits + (scale_bits + zero_point_bits) / group_size``.

    Taught in 07_qat_transformers. Each group of ``group_size`` weights carries
    one scale (fp32 = 32 bits, bf16 = 16) and, for an asymmetric scheme, one
    zero-point; per-channel is ``group_size = in_features``.

    >>> bits_per_weight(4, 32), bits_per_weight(4, 32, scale_bits=16), bits_per_weight(8, 64)
    (5.0, 4.5, 8.5)
    """
    for name, v in (("bits", bits), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return bits + (scale_bits + zero_point_bits) / group_size


def sqnr_table(weights, bits_list, group_sizes):
    """SQNR (dB) of group-wise fake quantization on real weights, for every bit width and group size.

    Taught in 07_qat_transformers. ``weights`` is a list of 2-D weights;
    every ``group_size`` (``None`` = per-channel) must divide each one's
    ``in_features``. The SQNR pools all weights:
    ``10 log10(sum w^2 / sum (w - w_hat)^2)``. Returns
    ``{(bits, group_size): dB}``.

    >>> w = [torch.randn(8, 64, generator=torch.Generator().manual_seed(0))]
    >>> t = sqnr_table(w, [8, 4], [16, None])
    >>> t[8, 16] > t[4, 16] > 0, t[4, 16] > t[4, None]
    (True, True)
    """
    out = {}
    for bits in bits_list:
        for gs in group_sizes:
            ref = torch.cat([w.detach().reshape(-1) for w in weights])
            fq = torch.cat([fake_quantize_groupwise(w.detach(), bits, gs).reshape(-1) for w in weights])
            out[bits, gs] = sqnr_db(ref, fq)
    return out


def rule_of_thumb_db(bits, offset_db):
    """``6.02 * bits + offset_db``: the 6 dB-per-bit rule of 01_fake_quant_math, anchored at ``offset_db``.

    >>> round(rule_of_thumb_db(4, 0.0), 2)
    24.08
    """
    return 20 * math.log10(2) * bits + offset_db


def plot_sqnr(table, bits_list, group_sizes, ax=None):
    """SQNR vs bit width, one line per group size, with the 6.02 dB/bit rule; returns ``ax``.

    Taught in 07_qat_transformers. ``table`` is :func:`sqnr_table`'s output;
    the dashed rule line goes through the per-channel 8-bit point.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for gs in group_sizes:
        label = "per-channel" if gs is None else f"group {gs}"
        ax.plot(bits_list, [table[b, gs] for b in bits_list], "o-", label=label)
    anchor = group_sizes[-1]
    top = max(bits_list)
    offset = table[top, anchor] - rule_of_thumb_db(top, 0.0)
    xs = [min(bits_list), top]
    ax.plot(xs, [rule_of_thumb_db(b, offset) for b in xs], "k--", lw=1, label="6.02 dB per bit")
    ax.set_xticks(bits_list)
    ax.set_xlabel("weight bit width (bits)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    return ax
