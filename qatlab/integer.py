"""Integer-only inference from scratch: int32 accumulation, bias, requantization, saturation.

Taught in 09_integer_kernels. An int8 layer computes, with real values
``r = s·(q − z)`` (Jacob et al., CVPR 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", eq. 1-7)::

    acc[o]  = Σ_k (x_q[k] − z_x) · (w_q[o, k] − z_w[o])         exact, in int32
    real[o] = s_x · s_w[o] · acc[o] + b[o]                     the float layer output
    y_q[o]  = clamp(round(real[o] / s_y) + z_y, lo, hi)        requantization
            = clamp(round(M[o] · (acc[o] + b[o] / (s_x s_w[o]))) + z_y, lo, hi)
              with M[o] = s_x · s_w[o] / s_y                     (the multiplier)

``lo`` is the dtype's minimum, or ``z_y`` when a ReLU is fused (the output
range itself does the ReLU). Jacob et al. store ``round(b / (s_x s_w))`` as
an int32 bias and apply ``M`` in fixed point (:func:`requantize_fixed_point`).
The kernels this module reproduces bit for bit do it their own way, and two of
them keep a float step:

===========  ==========================================================================
kernel       what it computes (verified against the library in tests/test_integer.py)
===========  ==========================================================================
fbgemm       u8 × s8 → int32 acc; **float** bias ``b / (s_x·s_w)`` added to float(acc);
             × float32 ``M``; ``nearbyint``; + z_y; clamp [0 or z_y, 255]
             (:func:`requantize_fbgemm`; torch ``x86``/``fbgemm`` engines)
onednn       u8 × s8 → int32 acc; float(acc) × s_x × s_w + b, × 1/s_y, + z_y,
             ``nearbyint``, clamp (:func:`requantize_onednn`; the ``x86`` engine's
             convolutions on a CPU with AVX-512 VNNI, see :func:`select_x86_conv_kernel`)
qnnpack      u8 × s8 → int32 acc **+ int32 bias** ``round(b / (s_x·s_w))``; × float32
             ``M = (s_w·s_x)·(1/s_y)``; ``nearbyint``; + z_y; clamp (:func:`requantize_qnnpack`;
             torch's ``qnnpack`` engine)
xnnpack      s8 × s8 → int32 acc **+ int32 bias** ``round(b / (s_x·s_w))``;
             × float32 ``M``; ``nearbyint``; + z_y; clamp (:func:`requantize_xnnpack`;
             ExecuTorch's XNNPACK delegate, "fp32" requantization)
===========  ==========================================================================

Everything here takes plain integer tensors (``x.int_repr()`` of a quantized
tensor) and returns integer tensors; the only float arithmetic is the step
each real kernel does in float32, written out where it happens.

The saturation helpers (:func:`vpmaddubsw`, :func:`count_saturating_pairs`)
emulate x86's AVX2 ``vpmaddubsw``, which adds *pairs* of u8 × s8 products
into a saturating int16 before they reach the int32 accumulator; AVX-512
VNNI's ``vpdpbusd`` (:func:`vpdpbusd`) adds four products straight into int32.
"""

import contextlib
import types
from collections import Counter

import torch
import torch.nn.functional as F

KERNELS = ("fbgemm", "onednn", "qnnpack", "xnnpack")
#: the two textbook schemes the kernels are compared with (not libraries)
SCHEMES = ("fixed_point", "reference")
#: the int16 range ``vpmaddubsw`` saturates to
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
#: (input dtype, output dtype, output range) of each kernel
KERNEL_DTYPES = {
    "fbgemm": (torch.uint8, torch.uint8, (0, 255)),
    "onednn": (torch.uint8, torch.uint8, (0, 255)),
    "qnnpack": (torch.uint8, torch.uint8, (0, 255)),
    "xnnpack": (torch.int8, torch.int8, (-128, 127)),
}

_F32 = torch.float32


# ---------------------------------------------------------------- argument checks


def _check_kernel(kernel):
    if kernel not in KERNELS + SCHEMES:
        raise ValueError(f"kernel must be one of {KERNELS + SCHEMES}, got {kernel!r}")
    return kernel


def _io_dtypes(kernel, x_q):
    """(input dtype, output range) of a kernel; the schemes follow the input's dtype."""
    if kernel in KERNELS:
        return KERNEL_DTYPES[kernel][0], KERNEL_DTYPES[kernel][2]
    _check_int_tensor(x_q, "x_q")
    return x_q.dtype, ((0, 255) if x_q.dtype == torch.uint8 else (-128, 127))


def _check_int_tensor(t, name, dtypes=(torch.uint8, torch.int8)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(t).__name__}")
    if t.is_quantized:
        raise TypeError(f"{name} is a quantized tensor; pass its integers with {name}.int_repr() "
                        f"and its scale/zero-point as arguments")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    return t


def _check_scale(value, name):
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return t


def _check_zero_point(value, name, lo, hi):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            raise TypeError(f"{name} must be an integer, got a {value.dtype} tensor")
        t = value.to(torch.int64).reshape(-1)
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        t = torch.tensor([value], dtype=torch.int64)
    if bool((t < lo).any()) or bool((t > hi).any()):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value!r}")
    return t


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


def _per_channel(t, channels, name):
    """A (1,)-or-(channels,) tensor broadcast to (channels,), or a clear error."""
    if t.numel() == 1:
        return t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values, expected 1 or one per output "
                         f"channel ({channels})")
    return t


def _channel_view(t, ndim):
    """Shape a per-channel (C,) tensor to broadcast along dim 1 of an ndim tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


# ---------------------------------------------------------------- int32 accumulation


def accumulate_conv2d(x_q, w_q, *, x_zero_point, w_zero_point=0, stride=1, padding=0,
                      dilation=1, groups=1):
    """int32 accumulator of a quantized conv2d: ``Σ (x_q − z_x)(w_q − z_w)``. 09_integer_kernels.

    ``x_q`` is ``(N, C, H, W)`` uint8/int8, ``w_q`` is ``(O, C/groups, kh, kw)``
    int8; padding is filled with the zero-point ``z_x`` (the integer of real
    0), so padded taps add nothing. Computed with integer tensors only
    (im2col + int64 matmul) and returned as int32 (the sum is exact; an
    accumulator that leaves the int32 range raises ``OverflowError``).

    >>> x = torch.tensor([[[[3, 4], [5, 6]]]], dtype=torch.uint8)
    >>> w = torch.tensor([[[[1, -1], [2, 0]]]], dtype=torch.int8)
    >>> accumulate_conv2d(x, w, x_zero_point=3)    # (0·1 + 1·(−1) + 2·2 + 3·0)
    tensor([[[[3]]]], dtype=torch.int32)
    """
    _check_int_tensor(x_q, "x_q")
    _check_int_tensor(w_q, "w_q", (torch.int8, torch.uint8))
    if x_q.dim() != 4 or w_q.dim() != 4:
        raise ValueError(f"x_q must be (N, C, H, W) and w_q (O, C/groups, kh, kw), got shapes "
                         f"{tuple(x_q.shape)} and {tuple(w_q.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, c, _, _ = x_q.shape
    o, cg, kh, kw = w_q.shape
    if c % groups or o % groups or c // groups != cg:
        raise ValueError(f"x_q has {c} channels and w_q expects {cg} per group with groups={groups} "
                         f"(and {o} output channels): the shapes do not match")
    lo, hi = (0, 255) if x_q.dtype == torch.uint8 else (-128, 127)
    zx = _check_zero_point(x_zero_point, "x_zero_point", lo, hi)
    if zx.numel() != 1:
        raise ValueError("x_zero_point must be a single int (activations are per-tensor)")
    zw = _per_channel(_check_zero_point(w_zero_point, "w_zero_point", -128, 255), o, "w_zero_point")
    # int32 is what the kernels accumulate in; int64 only if a sum could leave int32
    wide = (cg * kh * kw) * 256 * 256 >= 2**31
    itype = torch.int64 if wide else torch.int32
    x = F.pad(x_q.contiguous().to(itype) - zx.to(itype), (pw, pw, ph, ph))     # zeros = real 0
    w = w_q.to(itype) - zw.reshape(-1, 1, 1, 1).to(itype)
    hp, wp = x.shape[2:]
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel ({kh}x{kw}, dilation {dilation}) does not fit the padded "
                         f"input ({hp}x{wp})")
    taps = [x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            for i in range(kh) for j in range(kw)]
    cols = torch.stack(taps, dim=2).reshape(n, groups, cg * kh * kw, oh * ow)   # k = (c, i, j)
    acc = w.reshape(groups, o // groups, cg * kh * kw) @ cols                   # exact integer sums
    return _to_int32(acc.reshape(n, o, oh, ow))


def accumulate_linear(x_q, w_q, *, x_zero_point, w_zero_point=0):
    """int32 accumulator of a quantized linear layer: ``Σ_k (x_q − z_x)(w_q − z_w)``. 09_integer_kernels.

    ``x_q`` is ``(N, K)`` uint8/int8 and ``w_q`` ``(O, K)`` int8.

    >>> accumulate_linear(torch.tensor([[130, 128]], dtype=torch.uint8),
    ...                   torch.tensor([[2, 5], [-1, 1]], dtype=torch.int8), x_zero_point=128)
    tensor([[ 4, -2]], dtype=torch.int32)
    """
    _check_int_tensor(x_q, "x_q")
    _check_int_tensor(w_q, "w_q", (torch.int8, torch.uint8))
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x_q must be (N, K) and w_q (O, K), got shapes {tuple(x_q.shape)} "
                         f"and {tuple(w_q.shape)}")
    lo, hi = (0, 255) if x_q.dtype == torch.uint8 else (-128, 127)
    zx = _check_zero_point(x_zero_point, "x_zero_point", lo, hi)
    if zx.numel() != 1:
        raise ValueError("x_zero_point must be a single int (activations are per-tensor)")
    zw = _per_channel(_check_zero_point(w_zero_point, "w_zero_point", -128, 255), w_q.shape[0],
                      "w_zero_point")
    itype = torch.int64 if x_q.shape[1] * 256 * 256 >= 2**31 else torch.int32
    acc = (x_q.to(itype) - zx.to(itype)) @ (w_q.to(itype) - zw.reshape(-1, 1).to(itype)).T
    return _to_int32(acc)


def _to_int32(acc):
    if acc.dtype == torch.int32:
        return acc
    if acc.numel() and (int(acc.min()) < _INT32_MIN or int(acc.max()) > _INT32_MAX):
        raise OverflowError("the accumulator left the int32 range")
    return acc.to(torch.int32)


# ---------------------------------------------------------------- FBGEMM: which instructions, which path

#: FBGEMM_ENABLE_INSTRUCTIONS values and the instruction set each forces (FBGEMM's ``fbgemmEnvGetIsa``)
_FBGEMM_ENV_ISA = {"AVX2": "avx2", "AVX512": "avx512", "AVX512_256": "avx512",
                   "AVX512_E1": "avx512_vnni", "AVX512_E1_256": "avx512_vnni"}
_FBGEMM_SUPPORTS = {"avx2": {"avx2"}, "avx512": {"avx2", "avx512"},
                    "avx512_vnni": {"avx2", "avx512", "avx512_vnni"}}


def fbgemm_isa(flags=None, env=None):
    """The instruction set FBGEMM's int8 GEMM kernels use: "avx512_vnni", "avx512" or "avx2".

    Taught in 09_integer_kernels. FBGEMM's ``fbgemmInstructionSet``: AVX-512
    VNNI if the CPU has it, else AVX-512 (F, BW, DQ and VL), else AVX2; the
    environment variable ``FBGEMM_ENABLE_INSTRUCTIONS`` (read once per
    process) can force an older one. ``flags`` is ``{name: bool}`` as
    :func:`qatlab.deploy.cpu_flags` returns (default: this CPU); ``env`` the
    variable's value (default: this process's). Returns ``None`` without AVX2.
    Only "avx512_vnni" accumulates with ``vpdpbusd`` (int32, no saturation);
    "avx512" and "avx2" go through ``vpmaddubsw``'s int16 pair sums.

    >>> fbgemm_isa({"avx2": True, "avx512f": False, "avx512_vnni": False})
    'avx2'
    >>> fbgemm_isa({"avx2": True, "avx512f": True, "avx512bw": True, "avx512dq": True,
    ...             "avx512vl": True, "avx512_vnni": True}, env="AVX2")
    'avx2'
    """
    import os

    if flags is None:
        from .deploy import cpu_flags

        flags = cpu_flags(("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"))
    if env is None:
        env = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS")
    if flags.get("avx512_vnni"):
        detected = "avx512_vnni"
    elif all(flags.get(f) for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl")):
        detected = "avx512"
    elif flags.get("avx2"):
        detected = "avx2"
    else:
        return None
    forced = _FBGEMM_ENV_ISA.get(str(env).upper()) if env else None
    return forced if forced in _FBGEMM_SUPPORTS[detected] else detected


def fbgemm_conv_path(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                     groups=1):
    """Which FBGEMM convolution path a 2-d conv takes: "depthwise", "pointwise" or "im2col".

    Taught in 09_integer_kernels. FBGEMM's ``ConvFastPath``: the depthwise
    path needs ``groups == in_channels``, ``out_channels`` = 1 or 2 × groups,
    ``groups % 8 == 0``, a square 3/5/7 kernel, stride 1 or 2, dilation 1 and
    "same" padding ``(k − 1) / 2``; its kernels are AVX2 code on every CPU,
    so they always go through ``vpmaddubsw``. A 1×1, stride-1, unpadded conv
    is a plain GEMM ("pointwise"); everything else is unrolled into a GEMM
    ("im2col"; FBGEMM's groupwise kernels pair the same inputs and are
    counted here).

    >>> fbgemm_conv_path(32, 32, 3, padding=1, groups=32)
    'depthwise'
    >>> fbgemm_conv_path(16, 32, 3, stride=2, padding=1)
    'im2col'
    """
    (kh, kw), (sh, sw) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    if (groups == in_channels and out_channels in (groups, 2 * groups) and groups % 8 == 0
            and kh == kw and kh in (3, 5, 7) and sh in (1, 2) and sw in (1, 2)
            and (dh, dw) == (1, 1) and (ph, pw) == ((kh - 1) // 2, (kw - 1) // 2)):
        return "depthwise"
    if (kh, kw, sh, sw, dh, dw, ph, pw) == (1, 1, 1, 1, 1, 1, 0, 0):
        return "pointwise"
    return "im2col"


def fbgemm_saturates(path, isa):
    """Whether FBGEMM sums u8 × s8 pairs in int16 (``vpmaddubsw``) for this path and ISA.

    Taught in 09_integer_kernels. True for the depthwise path on every CPU,
    and for the GEMM paths (conv "pointwise"/"im2col", and linear layers:
    ``path="gemm"``) unless the ISA is "avx512_vnni".

    >>> fbgemm_saturates("im2col", "avx512_vnni"), fbgemm_saturates("depthwise", "avx512_vnni")
    (False, True)
    """
    if path not in ("depthwise", "pointwise", "im2col", "gemm"):
        raise ValueError(f"path must be 'depthwise', 'pointwise', 'im2col' or 'gemm', got {path!r}")
    if isa not in _FBGEMM_SUPPORTS:
        raise ValueError(f"isa must be one of {sorted(_FBGEMM_SUPPORTS)}, got {isa!r}")
    return path == "depthwise" or isa != "avx512_vnni"


def accumulate_conv2d_fbgemm(x_q, w_q, *, x_zero_point, stride=1, padding=0, dilation=1, groups=1,
                             isa=None):
    """FBGEMM's int32 accumulator of a conv2d, int16 pair saturation included. 09_integer_kernels.

    FBGEMM multiplies the *raw* uint8 inputs (padding = ``z_x``) by the raw
    int8 weights and subtracts ``z_x · Σ w`` afterwards. Where it uses
    ``vpmaddubsw`` (:func:`fbgemm_saturates`), every pair of adjacent
    reduction terms (order ``(i, j, c)``, :func:`im2col_fbgemm`) is first
    saturated to int16::

        acc = Σ_pairs sat16(x[2p]·w[2p] + x[2p+1]·w[2p+1]) − z_x · Σ w

    Otherwise this equals :func:`accumulate_conv2d`. ``isa`` defaults to
    :func:`fbgemm_isa`.
    """
    acc = accumulate_conv2d(x_q, w_q, x_zero_point=x_zero_point, stride=stride, padding=padding,
                            dilation=dilation, groups=groups)
    isa = fbgemm_isa() if isa is None else isa
    o, cg, kh, kw = w_q.shape
    path = fbgemm_conv_path(x_q.shape[1], o, (kh, kw), stride, padding, dilation, groups)
    if not fbgemm_saturates(path, isa):
        return acc
    rows = im2col_fbgemm(x_q, x_zero_point=x_zero_point, kernel_size=(kh, kw), stride=stride,
                         padding=padding, dilation=dilation, groups=groups)
    correction, _ = _saturation_correction(rows, weights_fbgemm(w_q), groups)
    n, _, oh, ow = acc.shape
    correction = correction.reshape(n, oh, ow, o).permute(0, 3, 1, 2)
    return _to_int32(acc.to(torch.int64) + correction)


def accumulate_linear_fbgemm(x_q, w_q, *, x_zero_point, isa=None):
    """FBGEMM's int32 accumulator of a linear layer, int16 pair saturation included. 09_integer_kernels.

    As :func:`accumulate_conv2d_fbgemm`, with the pairs ``(x[2p], x[2p+1])``
    along the input features; saturates unless ``isa`` is "avx512_vnni".
    """
    acc = accumulate_linear(x_q, w_q, x_zero_point=x_zero_point)
    isa = fbgemm_isa() if isa is None else isa
    if not fbgemm_saturates("gemm", isa):
        return acc
    _check_int_tensor(x_q, "x_q", (torch.uint8,))
    correction, _ = _saturation_correction(x_q.unsqueeze(1), w_q, 1)
    return _to_int32(acc.to(torch.int64) + correction)


# ---------------------------------------------------------------- ONNX Runtime's MLAS: which instructions

#: MLAS's u8 × s8 GEMM kernels (ONNX Runtime's CPU math library) that add int16 pairs with
#: ``vpmaddubsw`` (``QgemmU8S8KernelAvx2.S``, ``QgemmU8S8KernelAvx512Core.S``)
MLAS_SATURATING = ("avx2", "avx512_core")


def mlas_u8s8_kernel(flags=None, machine=None):
    """Which of MLAS's u8 × s8 kernels ONNX Runtime's CPU provider runs on this CPU. 09_integer_kernels.

    From the CPU flags (``/proc/cpuinfo`` names, :func:`qatlab.deploy.cpu_flags`)
    and the architecture (``platform.machine()``), in MLAS's order of preference:

    - ``"avx512_vnni"``, ``"avx_vnni"``: ``vpdpbusd(s)`` adds four products into int32;
    - ``"avx512_core"`` (AVX-512 BW without VNNI) and ``"avx2"``: ``vpmaddubsw`` adds
      *pairs* of u8 × s8 products into a saturating int16, then ``vpmaddwd`` widens them;
    - ``"neon"`` (ARM64): the NEON GEMM kernel widens every product into an int32
      accumulator (``umlal``, or ``udot``); not checked against onnxruntime here;
    - ``"other"``: none of these (not reproduced here).

    Only the ``vpmaddubsw`` kernels can saturate (:data:`MLAS_SATURATING`).

    >>> mlas_u8s8_kernel({"avx2": True, "avx512bw": False, "avx512_vnni": False, "avx_vnni": False}, "x86_64")
    'avx2'
    >>> mlas_u8s8_kernel({"avx2": True, "avx512bw": True, "avx512_vnni": True, "avx_vnni": False}, "x86_64")
    'avx512_vnni'
    >>> mlas_u8s8_kernel({}, "aarch64")
    'neon'
    """
    import platform

    machine = platform.machine() if machine is None else machine
    if machine.lower() in ("aarch64", "arm64"):
        return "neon"
    if flags is None:
        from .deploy import cpu_flags

        flags = cpu_flags(("avx2", "avx512bw", "avx512_vnni", "avx_vnni"))
    for flag, kernel in (("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"),
                         ("avx512bw", "avx512_core"), ("avx2", "avx2")):
        if flags.get(flag):
            return kernel
    return "other"


def accumulate_conv2d_mlas(x_q, w_q, *, x_zero_point, stride=1, padding=0, dilation=1, saturate=None):
    """ONNX Runtime's int32 accumulator of a ``QLinearConv`` (u8 × s8), pair saturation included.

    Taught in 09_integer_kernels. MLAS multiplies the raw uint8 inputs (padding
    = ``z_x``) by the int8 weights in the same order as FBGEMM (``k = (i, j, c)``,
    :func:`im2col_fbgemm`; an odd ``K`` pairs its last term with a zero). With
    ``saturate=True`` (the ``vpmaddubsw`` kernels, :data:`MLAS_SATURATING`) every
    pair of adjacent terms is saturated to int16 first::

        acc = Σ_pairs sat16(x[2p]·w[2p] + x[2p+1]·w[2p+1]) − z_x · Σ w

    ``saturate=False`` is :func:`accumulate_conv2d`; ``None`` reads the CPU
    (:func:`mlas_u8s8_kernel`). Verified against onnxruntime's ``QLinearConv`` on
    x86, with symmetric int8 weights and ``groups=1`` (``tests/test_integer.py``).
    """
    acc = accumulate_conv2d(x_q, w_q, x_zero_point=x_zero_point, stride=stride, padding=padding,
                            dilation=dilation)
    if saturate is None:
        saturate = mlas_u8s8_kernel() in MLAS_SATURATING
    if not saturate:
        return acc
    o, _, kh, kw = w_q.shape
    rows = im2col_fbgemm(x_q, x_zero_point=x_zero_point, kernel_size=(kh, kw), stride=stride,
                         padding=padding, dilation=dilation)
    correction, _ = _saturation_correction(rows, weights_fbgemm(w_q))
    n, _, oh, ow = acc.shape
    return _to_int32(acc.to(torch.int64) + correction.reshape(n, oh, ow, o).permute(0, 3, 1, 2))


def accumulate_linear_mlas(x_q, w_q, *, x_zero_point, saturate=None):
    """ONNX Runtime's int32 accumulator of a ``QGemm`` (u8 × s8), pair saturation included.

    Taught in 09_integer_kernels. As :func:`accumulate_conv2d_mlas`, with the
    pairs ``(x[2p], x[2p+1])`` along the input features (the same pairs as
    FBGEMM's, :func:`accumulate_linear_fbgemm`).
    """
    acc = accumulate_linear(x_q, w_q, x_zero_point=x_zero_point)
    if saturate is None:
        saturate = mlas_u8s8_kernel() in MLAS_SATURATING
    if not saturate:
        return acc
    _check_int_tensor(x_q, "x_q", (torch.uint8,))
    correction, _ = _saturation_correction(x_q.unsqueeze(1), w_q, 1)
    return _to_int32(acc.to(torch.int64) + correction)


# ---------------------------------------------------------------- bias and requantization


def quantize_bias(bias, input_scale, weight_scale, divide=False):
    """int32 bias ``round(b / (s_x · s_w))``, computed as ExecuTorch's XNNPACK delegate does.

    Taught in 09_integer_kernels. Float32 throughout: ``s = s_w · s_x`` (one
    scale per output channel), then ``round(b · (1/s))`` half to even, saturated
    to the int32 range; equals ``torch.ops.quantized_decomposed.quantize_per_channel``
    (per-tensor: ``quantize_per_tensor``) with those scales and zero-point 0.
    In Jacob et al.'s scheme this integer is added to the int32 accumulator.

    A bias beyond the int32 range (a tiny weight scale, e.g. a channel of zeros
    whose scale sits at the observer's floor) saturates to ``2**31 - 1`` or
    ``-2**31``, as ``torch.quantize_per_tensor(..., torch.qint32)`` does. The
    decomposed op clamps in float32, where ``2**31 - 1`` rounds to ``2**31``, and
    converting that float to int32 is undefined in C++: on x86 it gives
    ``-2**31``, a positive bias turned negative.

    ``divide=True`` computes ``round(b / s)`` instead, as the ONNX
    ``QuantizeLinear`` specification reads and as ONNX Runtime's
    ``WeightBiasQuantization`` pass does (``Div``, ``Round``, ``Cast``; tested
    against onnxruntime). ``b · (1/s)``
    rounds twice, ``b / s`` once, so the two disagree by one step on the rare
    bias whose ``b / s`` lies within a rounding error of a half-integer.

    >>> quantize_bias(torch.tensor([0.5, -0.25]), 0.1, torch.tensor([0.02, 0.05]))
    tensor([250, -50], dtype=torch.int32)
    >>> b, s = torch.tensor([0.4353451728820801]), torch.tensor([0.00017852989549282938])
    >>> quantize_bias(b, 1.0, s), quantize_bias(b, 1.0, s, divide=True)  # b / s = 2438.50013
    (tensor([2438], dtype=torch.int32), tensor([2439], dtype=torch.int32))
    >>> quantize_bias(torch.tensor([1.0, -1.0]), 1e-3, 1e-8)     # b / s = ±1e11: saturates
    tensor([ 2147483647, -2147483648], dtype=torch.int32)
    """
    if not isinstance(divide, bool):
        raise TypeError(f"divide must be True or False, got {divide!r}")
    bias = _check_bias(bias)
    s_x = _check_scale(input_scale, "input_scale")
    if s_x.numel() != 1:
        raise ValueError("input_scale must be a single number (activations are per-tensor)")
    if isinstance(weight_scale, torch.Tensor):      # per channel: a float32 tensor times a Python float
        s_w = _per_channel(_check_scale(weight_scale, "weight_scale").to(_F32), bias.numel(),
                           "weight_scale")
        scale = s_w * float(s_x)
    else:                                           # per tensor: two Python floats
        scale = float(_check_scale(weight_scale, "weight_scale")) * float(s_x)
    if divide:
        scale = torch.as_tensor(scale, dtype=_F32)  # a float32 Div, as ORT's graph computes it
        q = torch.round(bias / scale)
    else:
        q = torch.round(bias * (1.0 / scale))
    return _saturate_int32(q)


def _saturate_int32(q):
    """Integer-valued floats → int32, saturating: the clamp runs in float64, where ``2**31 - 1`` is exact."""
    return q.to(torch.float64).clamp(_INT32_MIN, _INT32_MAX).to(torch.int32)


def _wrap_int32(t):
    """int64 → int32 modulo 2**32: what a SIMD int32 add (``paddd``, ``vaddq_s32``) does on overflow."""
    return (((t + 2**31) % 2**32) - 2**31).to(torch.int32)


def _check_bias(bias):
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 1:
        raise TypeError(f"bias must be a 1-d float tensor, got {bias!r:.60}")
    bias = bias.detach().to(_F32)
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"bias must be finite, got {bias[~torch.isfinite(bias)][:4].tolist()}")
    return bias


def _out_range(kernel, zero_point, relu):
    lo, hi = KERNEL_DTYPES[kernel][2]
    return (int(zero_point), hi) if relu else (lo, hi)


def requantize(acc, multiplier, zero_point, quant_min, quant_max):
    """The "fp32" requantization: ``clamp(nearbyint(float32(acc) · M) + z_y, lo, hi)``. 09_integer_kernels.

    ``acc`` is int32 (bias already added, as XNNPACK does), ``multiplier`` a
    float32 ``M`` per tensor or per channel (dim 1 of ``acc``). Rounding is
    half to even (x86 ``cvtps2dq`` in the default rounding mode); the
    zero-point is added after rounding; the clamp saturates.

    >>> requantize(torch.tensor([[5, 7, -3, 1000]], dtype=torch.int32), 0.5, 10, 0, 255)
    tensor([[ 12,  14,   8, 255]], dtype=torch.uint8)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    m = _check_scale(multiplier, "multiplier").to(_F32)
    if m.numel() > 1:
        m = _channel_view(_per_channel(m, acc.shape[1], "multiplier"), acc.dim())
    zp = int(_check_zero_point(zero_point, "zero_point", quant_min, quant_max))
    y = torch.round(acc.to(_F32) * m).to(torch.int64) + zp
    return y.clamp(quant_min, quant_max).to(torch.uint8 if quant_min >= 0 else torch.int8)


def requantize_fbgemm(acc, bias, *, input_scale, weight_scale, output_scale, output_zero_point,
                      relu=False):
    """FBGEMM's ``ReQuantizeOutput`` with a float bias, as torch's x86 kernels call it. 09_integer_kernels.

    From FBGEMM's ``requantizeOutputProcessingAvx2`` and torch's
    ``GetQuantizationParams`` (all float32)::

        a      = s_x · s_w                      act_times_w_scale (per channel)
        M      = a / s_y                        C_multiplier
        b'     = b / a                          per-channel weights: a division
               = b · float(1 / double(a))       per-tensor weights: a reciprocal
        y      = nearbyint((float(acc) + b') · M) + z_y
        y_q    = clamp(y, z_y if relu else 0, 255)          uint8

    The bias is **not** an int32 here: FBGEMM adds ``b'`` to the accumulator
    in float, a float step this function has to do too.

    >>> acc = torch.tensor([[100, -40]], dtype=torch.int32)
    >>> requantize_fbgemm(acc, torch.tensor([0.05, 0.0]), input_scale=0.02, weight_scale=0.01,
    ...                   output_scale=0.01, output_zero_point=64)    # (100 + 250)·0.02 = 7
    tensor([[71, 63]], dtype=torch.uint8)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    channels = acc.shape[1]
    s_x = _check_scale(input_scale, "input_scale").to(_F32)
    w_raw = _check_scale(weight_scale, "weight_scale")
    s_w = _per_channel(w_raw.to(_F32), channels, "weight_scale")
    s_y = _check_scale(output_scale, "output_scale").to(_F32)
    zp = int(_check_zero_point(output_zero_point, "output_zero_point", 0, 255))
    a = s_x * s_w
    m = a / s_y
    y = acc.to(_F32)
    if bias is not None:
        b = _per_channel(_check_bias(bias), channels, "bias")
        if w_raw.numel() == 1:      # FBGEMM multiplies by the reciprocal, computed in double
            b_acc = b * torch.tensor(1.0 / float(a[0]), dtype=torch.float64).to(_F32)
        else:
            b_acc = b / a
        y = y + _channel_view(b_acc, acc.dim())
    y = torch.round(y * _channel_view(m, acc.dim())).to(torch.int64) + zp
    return y.clamp(zp if relu else 0, 255).to(torch.uint8)


def _onednn_scale(scale):
    """The scale oneDNN receives from torch: ``1.0f / float(1.0 / scale)`` (reciprocal twice)."""
    inv = torch.tensor(1.0 / float(scale), dtype=torch.float64).to(_F32)
    return torch.tensor(1.0, dtype=_F32) / inv


def requantize_onednn(acc, bias, *, input_scale, weight_scale, output_scale, output_zero_point,
                      relu=False):
    """oneDNN's int8 convolution epilogue, as torch's ``x86``/``onednn`` engines call it. 09_integer_kernels.

    torch passes reciprocal scales that ideep inverts back (``s' =
    1.0f / float(1.0 / s)``); oneDNN then applies the source and weight scales
    one after the other, adds the float bias, applies the fused ReLU, and
    multiplies by the inverse destination scale (all float32)::

        t   = ((float(acc) · s'_x) · s_w + b)          ReLU here: max(t, 0)
        y   = nearbyint(t · (1 / s'_y) + z_y)          the zero-point is added in float, before rounding
        y_q = clamp(y, 0, 255)                         uint8

    >>> acc = torch.tensor([[100, -40]], dtype=torch.int32)
    >>> requantize_onednn(acc, torch.tensor([0.05, 0.0]), input_scale=0.02, weight_scale=0.01,
    ...                   output_scale=0.01, output_zero_point=64)
    tensor([[71, 63]], dtype=torch.uint8)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    channels = acc.shape[1]
    s_x = _onednn_scale(_check_scale(input_scale, "input_scale"))
    s_w = _per_channel(_check_scale(weight_scale, "weight_scale").to(_F32), channels, "weight_scale")
    inv_y = torch.tensor(1.0, dtype=_F32) / _onednn_scale(_check_scale(output_scale, "output_scale"))
    zp = int(_check_zero_point(output_zero_point, "output_zero_point", 0, 255))
    t = acc.to(_F32) * s_x * _channel_view(s_w, acc.dim())
    if bias is not None:
        t = t + _channel_view(_per_channel(_check_bias(bias), channels, "bias"), acc.dim())
    if relu:
        t = t.clamp_min(0)
    y = torch.round(t * inv_y + zp).to(torch.int64)        # the zero-point is added before rounding
    return y.clamp(0, 255).to(torch.uint8)


def requantize_qnnpack(acc, bias, *, input_scale, weight_scale, output_scale, output_zero_point,
                       relu=False):
    """torch's QNNPACK epilogue: int32 bias, float32 multiplier, round to nearest even. 09_integer_kernels.

    From torch's ``QuantizeBias`` (``quantize_per_tensor`` / ``_per_channel`` to
    ``qint32``) and ``generate_requantization_scales``::

        b_q = sat32(nearbyint(b · (1 / float(double(s_w) · double(s_x)))))   int32 bias
        M   = (s_w · s_x) · (1 / s_y)                                        float32
        y_q = clamp(nearbyint(float(acc + b_q) · M) + z_y, z_y if relu else 0, 255)

    The bias scale is the **double** product of the two scales as torch stores
    them (``q_scale()`` is a double), rounded once to float32; multiplying the
    float32-rounded scales instead moves ``b_q`` by one where ``b / (s_x·s_w)``
    sits at a half (with ``s_x = 0.1``, for one). ``sat32`` saturates to the int32
    range, and ``acc + b_q`` wraps around modulo 2**32 as QNNPACK's int32 SIMD
    adds do (only a saturated bias can get there).

    >>> acc = torch.tensor([[100, -40]], dtype=torch.int32)
    >>> requantize_qnnpack(acc, torch.tensor([0.05, 0.0]), input_scale=0.02, weight_scale=0.01,
    ...                    output_scale=0.01, output_zero_point=64)
    tensor([[71, 63]], dtype=torch.uint8)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    channels = acc.shape[1]
    s_x = _check_scale(input_scale, "input_scale")              # act.q_scale(): a double
    s_w = _per_channel(_check_scale(weight_scale, "weight_scale"), channels, "weight_scale")
    s_y = _check_scale(output_scale, "output_scale").to(_F32)
    zp = int(_check_zero_point(output_zero_point, "output_zero_point", 0, 255))
    if bias is not None:
        b = _per_channel(_check_bias(bias), channels, "bias")
        inv = torch.tensor(1.0, dtype=_F32) / (s_w * s_x).to(_F32)
        b_q = _saturate_int32(torch.round(b * inv)).to(torch.int64)
        acc = _wrap_int32(acc.to(torch.int64) + _channel_view(b_q, acc.dim()))
    m = (s_w.to(_F32) * s_x.to(_F32)) * (torch.tensor(1.0, dtype=_F32) / s_y)
    return requantize(acc, m, zp, zp if relu else 0, 255)


def xnnpack_multiplier(input_scale, weight_scale, output_scale):
    """XNNPACK's per-channel requantization scale ``s_x · s_w / s_y`` in float32. 09_integer_kernels.

    Computed in that order (``input_scale * kernel_scale[c] / output_scale``,
    XNNPACK's ``init_requantization_scale_qx8_qc8w``).

    >>> xnnpack_multiplier(0.5, torch.tensor([0.25, 1.0]), 2.0)
    tensor([0.0625, 0.2500])
    """
    s_x = _check_scale(input_scale, "input_scale").to(_F32)
    s_w = _check_scale(weight_scale, "weight_scale").to(_F32)
    s_y = _check_scale(output_scale, "output_scale").to(_F32)
    return s_x * s_w / s_y


def requantize_xnnpack(acc, bias_q, *, input_scale, weight_scale, output_scale, output_zero_point,
                       quant_min=-128, quant_max=127):
    """XNNPACK's qs8 "fp32" requantization: int32 bias, float32 scale, round to nearest even.

    Taught in 09_integer_kernels. From XNNPACK's ``qs8-qc8w-gemm`` /
    ``-igemm`` microkernels (``..._minmax_fp32_...``)::

        acc'  = acc + bias_q                          int32 (bias_q from quantize_bias)
        y     = nearbyint(min(float(acc') · M, quant_max − z_y)) + z_y    M = xnnpack_multiplier
        y_q   = clamp(y, quant_min, quant_max)        int8; a fused ReLU sets quant_min = z_y

    >>> acc = torch.tensor([[100, -40]], dtype=torch.int32)
    >>> requantize_xnnpack(acc, torch.tensor([250, 0], dtype=torch.int32), input_scale=0.02,
    ...                    weight_scale=0.01, output_scale=0.01, output_zero_point=-10)
    tensor([[ -3, -11]], dtype=torch.int8)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    if bias_q is not None:
        _check_int_tensor(bias_q, "bias_q", (torch.int32,))
        acc = (acc.to(torch.int64) + _channel_view(_per_channel(bias_q.to(torch.int64), acc.shape[1],
                                                                 "bias_q"), acc.dim()))
        acc = _to_int32(acc)
    m = xnnpack_multiplier(input_scale, weight_scale, output_scale)
    return requantize(acc, m, output_zero_point, quant_min, quant_max)


# ---------------------------------------------------------------- integer-only (fixed point)


def quantize_multiplier(multiplier):
    """``M ≈ M0 · 2^(−31 − shift)`` with an int32 ``M0`` in [2^30, 2^31) (Jacob et al., eq. 5-6).

    Taught in 09_integer_kernels. gemmlowp/TFLite's
    ``QuantizeMultiplierSmallerThanOne`` for ``0 < M < 1``: ``shift`` doublings
    bring M into [0.5, 1), then ``M0 = round(M · 2^31)``. Returns int64
    tensors ``(M0, shift)`` (per channel if ``multiplier`` has several values).

    >>> quantize_multiplier(0.25)
    (tensor([1073741824]), tensor([1]))
    """
    m = _check_scale(multiplier, "multiplier")
    if bool((m >= 1).any()):
        raise ValueError(f"multiplier must be < 1 (a requantization scale), got {multiplier!r}")
    mantissa, exponent = torch.frexp(m)              # m = mantissa · 2^exponent, mantissa in [0.5, 1)
    m0 = torch.round(mantissa * 2.0**31).to(torch.int64)
    shift = (-exponent).to(torch.int64)
    full = m0 == 2**31                                # rounding reached 1.0: halve, one doubling fewer
    m0 = torch.where(full, m0 // 2, m0)
    shift = torch.where(full, shift - 1, shift)
    return m0, shift


def requantize_fixed_point(acc, m0, shift, zero_point, quant_min, quant_max):
    """Integer-only requantization (Jacob et al.; gemmlowp's fixed-point arithmetic). 09_integer_kernels.

    ``y = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0), shift) + z``::

        high = (acc · M0 + nudge) / 2^31           truncated toward zero; nudge = ±2^30
        y    = (high >> shift) + (1 if the remainder > half (away from zero on ties) else 0)

    No float anywhere: ``acc`` int32 (bias included), ``m0``/``shift`` from
    :func:`quantize_multiplier`, per tensor or per channel (dim 1). It rounds
    twice (in the high multiply, then in the shift), so a value just above a
    half can round up twice: ``5 · 0.25 = 1.25`` becomes 2 below.

    >>> m0, shift = quantize_multiplier(0.25)
    >>> requantize_fixed_point(torch.tensor([[6, -6, 5, 1000]], dtype=torch.int32), m0, shift, 3, 0, 255)
    tensor([[  5,   1,   5, 253]], dtype=torch.uint8)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    m0 = torch.as_tensor(m0, dtype=torch.int64).reshape(-1)
    shift = torch.as_tensor(shift, dtype=torch.int64).reshape(-1)
    if bool(((m0 < 2**30) | (m0 >= 2**31)).any()) or bool(((shift < 0) | (shift > 31)).any()):
        raise ValueError("m0 must lie in [2^30, 2^31) and shift in [0, 31]: use quantize_multiplier")
    if m0.numel() > 1 or shift.numel() > 1:
        n = acc.shape[1]
        m0 = _channel_view(_per_channel(m0, n, "m0"), acc.dim())
        shift = _channel_view(_per_channel(shift, n, "shift"), acc.dim())
    zp = int(_check_zero_point(zero_point, "zero_point", quant_min, quant_max))
    a = acc.to(torch.int64)
    prod = a * m0                                                  # < 2^62: exact in int64
    nudge = torch.where(prod >= 0, torch.tensor(2**30), torch.tensor(1 - 2**30))
    high = torch.div(prod + nudge, 2**31, rounding_mode="trunc")   # SaturatingRoundingDoublingHighMul
    mask = (torch.ones_like(shift) << shift) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0).to(torch.int64)
    y = (high >> shift) + (remainder > threshold).to(torch.int64) + zp   # RoundingDivideByPOT
    return y.clamp(quant_min, quant_max).to(torch.uint8 if quant_min >= 0 else torch.int8)


# ---------------------------------------------------------------- whole layers


def conv2d_int8(x_q, w_q, bias, *, input_scale, input_zero_point, weight_scale, output_scale,
                output_zero_point, stride=1, padding=0, dilation=1, groups=1, relu=False,
                kernel="fbgemm", isa=None):
    """A quantized conv2d (+ fused ReLU) computed the way ``kernel`` computes it. 09_integer_kernels.

    ``fbgemm``/``onednn``/``qnnpack``: ``x_q`` uint8, ``w_q`` int8, float
    ``bias``, uint8 out (torch's ``quantized::conv2d`` / ``conv2d_relu``).
    Two schemes to compare them with: ``fixed_point`` (Jacob et al.'s
    integer-only arithmetic: int32 bias, :func:`requantize_fixed_point`) and
    ``reference`` (what fake quantization computes, :func:`reference_layer`);
    both keep the input's dtype. ``xnnpack``: ``x_q``
    int8, ``w_q`` int8 in [−127, 127], ``bias`` float (quantized to int32 with
    :func:`quantize_bias`) or already int32, int8 out. Weights are symmetric
    (zero-point 0), per tensor or per output channel (``weight_scale``).
    ``isa`` (FBGEMM only, default :func:`fbgemm_isa`) decides where int16
    pair sums saturate (:func:`accumulate_conv2d_fbgemm`).
    """
    _check_kernel(kernel)
    in_dtype, out_range = _io_dtypes(kernel, x_q)
    _check_int_tensor(x_q, "x_q", (in_dtype,))
    _check_int_tensor(w_q, "w_q", (torch.int8,))
    if kernel == "reference":
        lo, hi = (output_zero_point, out_range[1]) if relu else out_range
        return reference_layer(x_q, w_q, bias, input_scale=input_scale, input_zero_point=input_zero_point,
                               weight_scale=weight_scale, output_scale=output_scale,
                               output_zero_point=output_zero_point, quant_min=lo, quant_max=hi,
                               conv=dict(stride=_pair(stride, "stride"), padding=_pair(padding, "padding"),
                                         dilation=_pair(dilation, "dilation"), groups=groups))
    if kernel == "fbgemm":
        acc = accumulate_conv2d_fbgemm(x_q, w_q, x_zero_point=input_zero_point, stride=stride,
                                       padding=padding, dilation=dilation, groups=groups, isa=isa)
    else:   # oneDNN (chosen by torch only with VNNI), QNNPACK and XNNPACK accumulate exactly
        acc = accumulate_conv2d(x_q, w_q, x_zero_point=input_zero_point, stride=stride,
                                padding=padding, dilation=dilation, groups=groups)
    return _requantize_layer(acc, bias, kernel, input_scale, weight_scale, output_scale,
                             output_zero_point, relu, out_range)


def linear_int8(x_q, w_q, bias, *, input_scale, input_zero_point, weight_scale, output_scale,
                output_zero_point, relu=False, kernel="fbgemm", isa=None):
    """A quantized linear layer (+ fused ReLU) computed the way ``kernel`` does. 09_integer_kernels.

    Same conventions as :func:`conv2d_int8`; torch's x86 engine always runs
    ``quantized::linear`` on FBGEMM (``kernel="onednn"`` is the ``onednn``
    engine's matmul).
    """
    _check_kernel(kernel)
    in_dtype, out_range = _io_dtypes(kernel, x_q)
    _check_int_tensor(x_q, "x_q", (in_dtype,))
    _check_int_tensor(w_q, "w_q", (torch.int8,))
    if kernel == "reference":
        lo, hi = (output_zero_point, out_range[1]) if relu else out_range
        return reference_layer(x_q, w_q, bias, input_scale=input_scale, input_zero_point=input_zero_point,
                               weight_scale=weight_scale, output_scale=output_scale,
                               output_zero_point=output_zero_point, quant_min=lo, quant_max=hi)
    if kernel == "fbgemm":
        acc = accumulate_linear_fbgemm(x_q, w_q, x_zero_point=input_zero_point, isa=isa)
    else:
        acc = accumulate_linear(x_q, w_q, x_zero_point=input_zero_point)
    return _requantize_layer(acc, bias, kernel, input_scale, weight_scale, output_scale,
                             output_zero_point, relu, out_range)


def _requantize_layer(acc, bias, kernel, input_scale, weight_scale, output_scale, output_zero_point,
                      relu, out_range):
    kwargs = dict(input_scale=input_scale, weight_scale=weight_scale, output_scale=output_scale,
                  output_zero_point=output_zero_point)
    if kernel == "fbgemm":
        return requantize_fbgemm(acc, bias, relu=relu, **kwargs)
    if kernel == "onednn":
        return requantize_onednn(acc, bias, relu=relu, **kwargs)
    if kernel == "qnnpack":
        return requantize_qnnpack(acc, bias, relu=relu, **kwargs)
    lo, hi = (int(output_zero_point), out_range[1]) if relu else out_range
    if bias is not None and bias.dtype != torch.int32:
        bias = quantize_bias(bias, input_scale, weight_scale)
    if kernel == "xnnpack":
        return requantize_xnnpack(acc, bias, quant_min=lo, quant_max=hi, **kwargs)
    # "fixed_point": Jacob et al.'s integer-only scheme: int32 bias, M in fixed point
    if bias is not None:
        acc = _to_int32(acc.to(torch.int64) + _channel_view(_per_channel(bias.to(torch.int64), acc.shape[1],
                                                                        "bias"), acc.dim()))
    m = (_check_scale(input_scale, "input_scale") * _check_scale(weight_scale, "weight_scale")
         / _check_scale(output_scale, "output_scale"))
    m0, shift = quantize_multiplier(m)
    return requantize_fixed_point(acc, m0, shift, output_zero_point, lo, hi)


def adaptive_avg_pool2d_int8(x_q, output_size, *, input_scale, input_zero_point, output_scale,
                             output_zero_point, channels_last=True):
    """torch's quantized ``adaptive_avg_pool2d`` on uint8, both of its CPU paths. 09_integer_kernels.

    Windows: start = ⌊i·H/h⌋, end = ⌈(i+1)·H/h⌉, ``n`` inputs each. A
    channels-last input (what the int8 convolutions return) takes the NHWC
    kernel, which subtracts the zero-point and requantizes::

        acc = Σ (x_q − z_x)                                  int32
        m   = (s_x / s_y) / n                                float32
        y_q = clamp(nearbyint(float(acc) · (1 / (1 / m))) + z_y, 0, 255)

    (``quantize_val(1.0f / m, ...)`` multiplies by the reciprocal of its scale,
    so ``m`` is inverted twice in float32). A contiguous (NCHW) input takes
    the other kernel, which keeps the input's scale and zero-point and averages
    the stored integers: ``y_q = nearbyint(float(Σ x_q) · ((1 / kh) / kw))``.
    """
    _check_int_tensor(x_q, "x_q", (torch.uint8,))
    if x_q.dim() != 4:
        raise ValueError(f"x_q must be (N, C, H, W), got shape {tuple(x_q.shape)}")
    oh, ow = _pair(output_size, "output_size")
    s_x = _check_scale(input_scale, "input_scale").to(_F32)
    s_y = _check_scale(output_scale, "output_scale").to(_F32)
    zx = int(_check_zero_point(input_zero_point, "input_zero_point", 0, 255))
    zy = int(_check_zero_point(output_zero_point, "output_zero_point", 0, 255))
    if not channels_last and (float(s_x) != float(s_y) or zx != zy):
        raise ValueError("torch's NCHW kernel keeps the input's scale and zero-point: pass the same "
                         "input and output qparams")
    n, c, h, w = x_q.shape
    x = x_q.contiguous().to(torch.int32) - (zx if channels_last else 0)
    # window membership as a 0/1 matrix: one integer matmul sums every window
    member = torch.zeros(h * w, oh * ow, dtype=torch.int32)
    sizes = torch.zeros(oh, ow, 2, dtype=_F32)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            cell = torch.zeros(h, w, dtype=torch.int32)
            cell[h0:h1, w0:w1] = 1
            member[:, i * ow + j] = cell.reshape(-1)
            sizes[i, j] = torch.tensor([h1 - h0, w1 - w0], dtype=_F32)
    acc = (x.reshape(n * c, h * w) @ member).to(_F32)       # Σ per window, exact
    one = torch.tensor(1.0, dtype=_F32)
    kh, kw = sizes[..., 0].reshape(-1), sizes[..., 1].reshape(-1)
    if channels_last:
        m = (s_x / s_y) / (kh * kw)                          # float32, per window
        y = torch.round(acc * (one / (one / m))).to(torch.int64) + zy
    else:
        y = torch.round(acc * ((one / kh) / kw)).to(torch.int64)
    return y.reshape(n, c, oh, ow).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- which x86 kernel runs


def select_x86_conv_kernel(weight_zero_points, groups, *, has_avx512_vnni, linux=True,
                           output_padding_zero=True):
    """Which kernel torch's ``x86`` engine picks for a quantized conv: "onednn" or "fbgemm".

    Taught in 09_integer_kernels. torch's ``should_use_onednn_quant``
    (``aten/src/ATen/native/quantized/cpu/OnednnUtils.h``): oneDNN when the OS
    is Linux, the CPU has AVX-512 VNNI (``cpuinfo_has_x86_avx512vnni``), the
    weights are symmetric (all zero-points 0), ``groups <= 100`` and the
    output padding is zero; FBGEMM otherwise. Linear layers always run on FBGEMM.

    >>> select_x86_conv_kernel(torch.zeros(8), 1, has_avx512_vnni=True)
    'onednn'
    >>> select_x86_conv_kernel(torch.zeros(8), 1, has_avx512_vnni=False)
    'fbgemm'
    """
    symmetric = bool((torch.as_tensor(weight_zero_points) == 0).all())
    use_onednn = linux and bool(has_avx512_vnni) and groups <= 100 and symmetric and output_padding_zero
    return "onednn" if use_onednn else "fbgemm"


# ---------------------------------------------------------------- eager int8 modules


def eager_layer_params(module):
    """The integers and scales of a converted eager int8 conv/linear module. 09_integer_kernels.

    Returns a dict: ``w_q`` (int8), ``weight_scale`` and ``weight_zero_point``
    (per channel or per tensor), ``bias`` (float or None), ``output_scale``,
    ``output_zero_point``, ``relu``, and for convolutions ``stride``,
    ``padding``, ``dilation``, ``groups``.
    """
    from torch.ao.nn import quantized as nnq

    if not isinstance(module, nnq.Conv2d | nnq.Linear):
        raise TypeError(f"expected a converted int8 Conv2d/Linear module, got {type(module).__name__}")
    w = module.weight()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zp = w.q_per_channel_scales(), w.q_per_channel_zero_points()
    else:
        scale, zp = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
    b = module.bias()
    params = dict(w_q=w.int_repr(), weight_scale=scale, weight_zero_point=zp,
                  bias=None if b is None else b.detach(), output_scale=float(module.scale),
                  output_zero_point=int(module.zero_point), relu="ReLU" in module._get_name())
    if isinstance(module, nnq.Conv2d):
        params.update(stride=tuple(module.stride), padding=tuple(module.padding),
                      dilation=tuple(module.dilation), groups=module.groups)
    return params


def run_eager_layer(module, x, kernel):
    """Our integer version of one converted eager module on the quantized tensor ``x``.

    Taught in 09_integer_kernels. Returns a quantized tensor with the
    module's output scale and zero-point, so it can feed the next layer.
    """
    from torch.ao.nn import quantized as nnq

    if not (isinstance(x, torch.Tensor) and x.is_quantized and x.dtype == torch.quint8):
        raise TypeError("x must be a quint8 quantized tensor (the output of the layer before)")
    p = eager_layer_params(module)
    if bool((p["weight_zero_point"] != 0).any()):
        raise ValueError(f"{module._get_name()} has non-zero weight zero-points; only symmetric "
                         "weights are covered here")
    common = dict(input_scale=x.q_scale(), input_zero_point=x.q_zero_point(),
                  weight_scale=p["weight_scale"], output_scale=p["output_scale"],
                  output_zero_point=p["output_zero_point"], relu=p["relu"], kernel=kernel)
    if isinstance(module, nnq.Conv2d):
        y = conv2d_int8(x.int_repr(), p["w_q"], p["bias"], stride=p["stride"], padding=p["padding"],
                        dilation=p["dilation"], groups=p["groups"], **common)
        y = y.contiguous(memory_format=torch.channels_last)   # torch's int8 convs return NHWC
    else:
        y = linear_int8(x.int_repr(), p["w_q"], p["bias"], **common)
    return torch._make_per_tensor_quantized_tensor(y, p["output_scale"], p["output_zero_point"])


ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


def eager_kernel(module, engine, has_avx512_vnni=None):
    """The kernel torch's ``engine`` runs for a converted conv/linear module. 09_integer_kernels.

    ``x86``: linear layers on FBGEMM, convolutions by
    :func:`select_x86_conv_kernel` (``has_avx512_vnni`` defaults to this
    CPU's flag); ``fbgemm``/``onednn``/``qnnpack``: that library.
    """
    import sys

    from torch.ao.nn import quantized as nnq

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "x86":
        return engine
    if not isinstance(module, nnq.Conv2d):
        return "fbgemm"
    if has_avx512_vnni is None:
        from .deploy import cpu_flags

        has_avx512_vnni = cpu_flags(("avx512_vnni",))["avx512_vnni"]
    p = eager_layer_params(module)
    return select_x86_conv_kernel(p["weight_zero_point"], p["groups"], has_avx512_vnni=has_avx512_vnni,
                                  linux=sys.platform.startswith("linux"))


@contextlib.contextmanager
def integer_kernels(model, engine="x86", has_avx512_vnni=None, scheme=None):
    """Within the block, ``model`` (an eager int8 model) runs on this module's integer code.

    Taught in 09_integer_kernels. Every ``Quantize``, int8 ``Conv2d``/``Linear``
    (and their fused ReLU versions) and ``AdaptiveAvgPool2d`` is swapped for
    ours, each layer with the kernel torch's ``engine`` would pick
    (:func:`eager_kernel`), or with ``scheme`` ("fixed_point" or "reference",
    see :func:`conv2d_int8`) for every layer; the input is quantized with
    ``qatlab.quantize``.
    Other modules keep their own forward (``Flatten``, ``DeQuantize``); a leaf
    module that computes something we do not cover raises ``ValueError``.
    """
    from torch.ao.nn import quantized as nnq

    from .quant import quantize

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"scheme must be None or one of {SCHEMES}, got {scheme!r}")
    passthrough = (torch.nn.Flatten, torch.nn.Identity, torch.nn.Dropout, nnq.DeQuantize,
                   torch.nn.Sequential)

    def quantize_forward(self, x):
        q = quantize(x, float(self.scale), int(self.zero_point), 0, 255)
        return torch._make_per_tensor_quantized_tensor(q, float(self.scale), int(self.zero_point))

    def layer_forward(kernel):
        def forward(self, x):
            return run_eager_layer(self, x, kernel)
        return forward

    def pool_forward(self, x):
        y = adaptive_avg_pool2d_int8(x.int_repr(), self.output_size, input_scale=x.q_scale(),
                                     input_zero_point=x.q_zero_point(), output_scale=x.q_scale(),
                                     output_zero_point=x.q_zero_point(),
                                     channels_last=x.is_contiguous(memory_format=torch.channels_last))
        return torch._make_per_tensor_quantized_tensor(y, x.q_scale(), x.q_zero_point())

    swapped, inside = [], set()
    try:
        for name, m in model.named_modules():
            if any(name.startswith(p + ".") for p in inside):
                continue                        # the packed weights inside a layer we swapped
            if isinstance(m, nnq.Quantize):
                fn = quantize_forward
            elif isinstance(m, nnq.Conv2d | nnq.Linear):
                fn = layer_forward(scheme or eager_kernel(m, engine, has_avx512_vnni))
            elif isinstance(m, torch.nn.AdaptiveAvgPool2d):
                fn = pool_forward
            elif isinstance(m, passthrough) or m is model or list(m.children()):
                continue
            else:
                raise ValueError(f"no integer kernel here for module {name!r} ({type(m).__name__})")
            m.forward = types.MethodType(fn, m)
            swapped.append(m)
            inside.add(name)
        yield model
    finally:
        for m in swapped:
            del m.forward


# ---------------------------------------------------------------- PT2E (ExecuTorch / XNNPACK)


def pt2e_layers(converted):
    """The conv/linear layers of a ``convert_pt2e`` graph, with their integers and qparams.

    Taught in 09_integer_kernels. For each ``aten.conv2d`` / ``aten.linear``
    node fed by dequantize nodes (the QDQ pattern ExecuTorch's XNNPACK delegate
    lowers), returns a dict with ``name``, ``kind`` ("conv2d"/"linear"),
    ``w_q`` (int8), ``weight_scale``, ``bias`` (float), input and output
    ``*_scale``/``*_zero_point``, ``relu``, ``quant_min``/``quant_max`` and,
    for convolutions, ``stride``, ``padding``, ``dilation``, ``groups``.
    """
    ops = torch.ops
    q_ops = (ops.quantized_decomposed.quantize_per_tensor.default,)
    dq_ops = (ops.quantized_decomposed.dequantize_per_tensor.default,)
    dqc_ops = (ops.quantized_decomposed.dequantize_per_channel.default,
               ops.quantized_decomposed.dequantize_per_tensor.default)

    def constant(node):
        target = node.target
        try:
            return converted.get_parameter(target)
        except AttributeError:
            pass
        try:
            return converted.get_buffer(target)
        except AttributeError:
            return getattr(converted, target)

    layers = []
    for node in converted.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == ops.aten.conv2d.default:
            kind = "conv2d"
        elif node.target == ops.aten.linear.default:
            kind = "linear"
        else:
            continue
        x_dq, w_dq = node.args[0], node.args[1]
        if x_dq.target not in dq_ops or w_dq.target not in dqc_ops:
            raise ValueError(f"{node.name}: input and weight must come from dequantize nodes "
                             "(is this a convert_pt2e model?)")
        _, s_x, z_x, *_ = x_dq.args
        w_q = constant(w_dq.args[0])
        if w_dq.target == ops.quantized_decomposed.dequantize_per_channel.default:
            w_scale, w_zp = constant(w_dq.args[1]), constant(w_dq.args[2])
        else:
            w_scale, w_zp = float(w_dq.args[1]), int(w_dq.args[2])
        bias = node.args[2] if len(node.args) > 2 else None
        bias = None if bias is None else constant(bias).detach()
        out, relu = node, False
        users = list(node.users)
        if len(users) == 1 and users[0].target == ops.aten.relu.default:
            out, relu = users[0], True
        q_nodes = [u for u in out.users if u.target in q_ops]
        if len(q_nodes) != 1:
            raise ValueError(f"{node.name}: expected one quantize node after it, found {len(q_nodes)}")
        _, s_y, z_y, qmin, qmax, _ = q_nodes[0].args
        layer = dict(name=node.name, kind=kind, w_q=w_q, weight_scale=w_scale, weight_zero_point=w_zp,
                     bias=bias, input_scale=float(s_x), input_zero_point=int(z_x),
                     output_scale=float(s_y), output_zero_point=int(z_y), relu=relu,
                     quant_min=int(qmin), quant_max=int(qmax))
        if kind == "conv2d":
            stride, padding, dilation, groups = (list(node.args[3:]) + [1, 0, 1, 1][len(node.args[3:]):])
            layer.update(stride=_pair(stride, "stride"), padding=_pair(padding, "padding"),
                         dilation=_pair(dilation, "dilation"), groups=int(groups))
        layers.append(layer)
    return layers


def run_pt2e_layer(layer, x_q, kernel="xnnpack"):
    """One layer from :func:`pt2e_layers` on int8 ``x_q``, the way XNNPACK computes it.

    Taught in 09_integer_kernels. Returns int8 (``kernel="xnnpack"``).
    """
    if kernel != "xnnpack":
        raise ValueError(f"PT2E layers run here with kernel='xnnpack', got {kernel!r}")
    common = dict(input_scale=layer["input_scale"], input_zero_point=layer["input_zero_point"],
                  weight_scale=layer["weight_scale"], output_scale=layer["output_scale"],
                  output_zero_point=layer["output_zero_point"], relu=layer["relu"], kernel=kernel)
    if layer["kind"] == "conv2d":
        return conv2d_int8(x_q, layer["w_q"], layer["bias"], stride=layer["stride"],
                           padding=layer["padding"], dilation=layer["dilation"],
                           groups=layer["groups"], **common)
    return linear_int8(x_q, layer["w_q"], layer["bias"], **common)


# ---------------------------------------------------------------- references and differences


def reference_layer(x_q, w_q, bias, *, input_scale, input_zero_point, weight_scale, output_scale,
                    output_zero_point, quant_min, quant_max, relu=False, conv=None):
    """What fake quantization computes for the same integers: dequantize, float layer, quantize.

    Taught in 09_integer_kernels. ``y = quantize(layer(s_x(x_q − z_x),
    s_w·w_q) + b)`` with float32 accumulation (the QDQ reference graph;
    ``conv`` = dict(stride, padding, dilation, groups) for a conv2d, None for
    linear). It differs from the integer kernels only in where rounding happens.
    """
    from .quant import dequantize, quantize

    x = dequantize(x_q, float(input_scale), int(input_zero_point))
    s_w = torch.as_tensor(weight_scale, dtype=_F32).reshape(-1)
    w = w_q.to(_F32) * s_w.reshape((-1,) + (1,) * (w_q.dim() - 1))
    b = None if bias is None else bias.to(_F32)
    y = F.linear(x, w, b) if conv is None else F.conv2d(x, w, b, **conv)
    if relu:
        y = torch.relu(y)
    return quantize(y, float(output_scale), int(output_zero_point), quant_min, quant_max)


def step_differences(a, b):
    """``Counter`` of ``a − b`` over all elements (integer steps of the output scale). 09_integer_kernels.

    >>> step_differences(torch.tensor([3, 4, 5]), torch.tensor([3, 5, 5]))
    Counter({0: 2, -1: 1})
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a.to(torch.int64) - b.to(torch.int64)).reshape(-1)
    values, counts = torch.unique(d, return_counts=True)
    return Counter({int(v): int(c) for v, c in zip(values, counts)})


# ---------------------------------------------------------------- int16 saturation (AVX2 vs VNNI)


def vpmaddubsw(a_u8, b_s8):
    """x86 ``vpmaddubsw``: u8 × s8 products, adjacent pairs summed, **saturated** to int16.

    Taught in 09_integer_kernels. ``out[i] = sat16(a[2i]·b[2i] + a[2i+1]·b[2i+1])``
    along the last dimension (even length). This is how AVX2 (and AVX-512
    without VNNI) multiply int8: the int16 pair sum can overflow.

    >>> vpmaddubsw(torch.tensor([255, 255, 100, 2], dtype=torch.uint8),
    ...            torch.tensor([127, 127, -3, 7], dtype=torch.int8))
    tensor([32767,  -286], dtype=torch.int16)
    """
    _check_int_tensor(a_u8, "a_u8", (torch.uint8,))
    _check_int_tensor(b_s8, "b_s8", (torch.int8,))
    if a_u8.shape != b_s8.shape or a_u8.shape[-1] % 2:
        raise ValueError(f"a_u8 and b_s8 need one shape with an even last dimension, got "
                         f"{tuple(a_u8.shape)} and {tuple(b_s8.shape)}")
    p = a_u8.to(torch.int32) * b_s8.to(torch.int32)
    s = p[..., 0::2] + p[..., 1::2]
    return s.clamp(INT16_MIN, INT16_MAX).to(torch.int16)


def vpdpbusd(acc, a_u8, b_s8):
    """x86 VNNI ``vpdpbusd``: four u8 × s8 products added straight into an int32 accumulator.

    Taught in 09_integer_kernels. ``acc[i] += Σ_{j<4} a[4i+j]·b[4i+j]``, no
    int16 step, so nothing saturates (the int32 sum wraps only past ±2^31).

    >>> vpdpbusd(torch.zeros(1, dtype=torch.int32), torch.full((4,), 255, dtype=torch.uint8),
    ...          torch.full((4,), 127, dtype=torch.int8))
    tensor([129540], dtype=torch.int32)
    """
    _check_int_tensor(acc, "acc", (torch.int32,))
    _check_int_tensor(a_u8, "a_u8", (torch.uint8,))
    _check_int_tensor(b_s8, "b_s8", (torch.int8,))
    if a_u8.shape != b_s8.shape or a_u8.shape[-1] != 4 * acc.shape[-1]:
        raise ValueError(f"a_u8 and b_s8 need one shape whose last dimension is 4 x acc's, got "
                         f"{tuple(a_u8.shape)}, {tuple(b_s8.shape)} and acc {tuple(acc.shape)}")
    p = (a_u8.to(torch.int64) * b_s8.to(torch.int64)).reshape(*acc.shape, 4).sum(-1)
    return _to_int32(acc.to(torch.int64) + p)


def im2col_fbgemm(x_q, *, x_zero_point, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """Activation rows in FBGEMM's order: ``(N·L, groups, K)`` with ``k = (i, j, c)``, ``c`` fastest.

    Taught in 09_integer_kernels. FBGEMM runs a quantized conv as a GEMM on
    NHWC data: each output position ``L`` reads, per group, the ``kh·kw·C/g``
    raw uint8 inputs of its window, channel fastest; padding is filled with
    ``z_x``. Adjacent ``k`` are the pairs that ``vpmaddubsw`` adds.
    """
    _check_int_tensor(x_q, "x_q", (torch.uint8,))
    (kh, kw), (sh, sw) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    zx = int(_check_zero_point(x_zero_point, "x_zero_point", 0, 255))
    n, c, _, _ = x_q.shape
    if c % groups:
        raise ValueError(f"{c} input channels do not split into {groups} groups")
    x = F.pad(x_q.to(torch.int32), (pw, pw, ph, ph), value=zx)
    hp, wp = x.shape[2:]
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    taps = [x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            for i in range(kh) for j in range(kw)]
    cols = torch.stack(taps, dim=1)                          # (N, kh·kw, C, oh, ow)
    cols = cols.reshape(n, kh * kw, groups, c // groups, oh * ow)
    cols = cols.permute(0, 4, 2, 1, 3).reshape(n * oh * ow, groups, kh * kw * (c // groups))
    return cols.to(torch.uint8)


def weights_fbgemm(w_q, groups=1):
    """Conv weights ``(O, C/g, kh, kw)`` as FBGEMM's GEMM columns ``(O, K)``, ``k = (i, j, c)``.

    Taught in 09_integer_kernels. A linear weight ``(O, K)`` is returned as is.
    """
    _check_int_tensor(w_q, "w_q", (torch.int8,))
    if w_q.dim() == 2:
        return w_q
    o, cg, kh, kw = w_q.shape
    return w_q.permute(0, 2, 3, 1).reshape(o, kh * kw * cg)


def _saturation_correction(a_rows, w_cols, groups=1, chunk=8192):
    """``(Σ_pairs (sat16(s) − s)`` per (row, output), number of saturating pairs)`` of a u8 × s8 GEMM."""
    _check_int_tensor(a_rows, "a_rows", (torch.uint8,))
    _check_int_tensor(w_cols, "w_cols", (torch.int8,))
    if a_rows.dim() == 2:
        a_rows = a_rows.unsqueeze(1)
    m, g, k = a_rows.shape
    o = w_cols.shape[0]
    if g != groups or w_cols.shape[1] != k or o % groups:
        raise ValueError(f"a_rows {tuple(a_rows.shape)} and w_cols {tuple(w_cols.shape)} do not "
                         f"form a GEMM with groups={groups}")
    if k % 2:                                   # odd K: the last term pairs with a zero
        a_rows, w_cols, k = F.pad(a_rows, (0, 1)), F.pad(w_cols, (0, 1)), k + 1
    a_max = int(a_rows.max()) if a_rows.numel() else 0
    og = o // groups
    w = w_cols.to(torch.int32).reshape(groups, og, k // 2, 2)
    pos, neg = w.clamp_min(0).sum(-1), w.clamp_max(0).sum(-1)          # (groups, O/g, K/2)
    # only pairs whose worst case leaves int16 can saturate: skip the others
    risky = (a_max * pos > INT16_MAX) | (a_max * neg < INT16_MIN)
    correction = torch.zeros(m, o, dtype=torch.int64)
    saturating = 0
    for gi in range(groups):
        for p in torch.nonzero(risky[gi].any(0)).reshape(-1).tolist():
            chans = torch.nonzero(risky[gi, :, p]).reshape(-1)
            wp = w[gi, chans, p, :].T.to(_F32)                            # (2, C): exact in float32
            cols = gi * og + chans
            pair = a_rows[:, gi, 2 * p: 2 * p + 2].to(torch.int32)
            # |x0·w0 + x1·w1| <= 128·(x0 + x1): only rows with x0 + x1 >= 256 can leave int16
            rows = torch.nonzero(pair.sum(1) >= 256).reshape(-1)
            for start in range(0, len(rows), chunk):
                r = rows[start:start + chunk]
                s = (pair[r].to(_F32) @ wp).to(torch.int64)               # |s| <= 65280 < 2^24
                excess = s.clamp(INT16_MIN, INT16_MAX) - s
                saturating += int((excess != 0).sum())
                correction[r.unsqueeze(1), cols.unsqueeze(0)] += excess
    return correction, saturating


def count_saturating_pairs(a_rows, w_cols, groups=1):
    """How many ``vpmaddubsw`` pair sums saturate int16 in a u8 × s8 GEMM. 09_integer_kernels.

    ``a_rows``: ``(M, groups, K)`` raw uint8 (:func:`im2col_fbgemm`, or
    ``(M, K)`` for a linear layer); ``w_cols``: ``(O, K)`` int8
    (:func:`weights_fbgemm`), output channels split evenly over groups. Every
    output element sums ``⌈K/2⌉`` pairs ``a[2p]·w[2p] + a[2p+1]·w[2p+1]`` (an
    odd ``K`` is padded with a zero); this counts, exactly, those outside
    [−32768, 32767]. Returns ``(saturating_pairs, total_pairs)``.

    >>> a = torch.tensor([[255, 255, 10, 10]], dtype=torch.uint8)
    >>> w = torch.tensor([[127, 127, 1, 1], [-128, -128, 0, 0]], dtype=torch.int8)
    >>> count_saturating_pairs(a, w)
    (2, 4)
    """
    _, saturating = _saturation_correction(a_rows, w_cols, groups)
    m, k = a_rows.shape[0], a_rows.shape[-1]
    return saturating, m * w_cols.shape[0] * ((k + 1) // 2)


def pair_sum_range(w_cols, x_max):
    """Most negative and most positive pair sum ``x0·w0 + x1·w1`` for ``0 <= x <= x_max``.

    Taught in 09_integer_kernels (the exercise's reference). ``w_cols`` is
    ``(O, K)`` in GEMM order; pairs are adjacent ``k``. Each input can be 0 or
    ``x_max``, so the extremes take only the weights of one sign:
    ``hi = x_max · max(Σ positive weights of a pair)``, ``lo`` likewise with
    the negative ones. A layer can saturate ``vpmaddubsw`` iff
    ``hi > 32767`` or ``lo < −32768``.

    >>> pair_sum_range(torch.tensor([[127, 127, -128, 5]], dtype=torch.int8), 255)
    (-32640, 64770)
    """
    _check_int_tensor(w_cols, "w_cols", (torch.int8,))
    if isinstance(x_max, bool) or not isinstance(x_max, int) or not 0 <= x_max <= 255:
        raise ValueError(f"x_max must be an int in [0, 255], got {x_max!r}")
    w = w_cols.to(torch.int64)
    if w.shape[-1] % 2:
        w = F.pad(w, (0, 1))
    w = w.reshape(*w.shape[:-1], -1, 2)
    return int(x_max * w.clamp_max(0).sum(-1).min()), int(x_max * w.clamp_min(0).sum(-1).max())
