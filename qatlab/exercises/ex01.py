"""Checks for the exercises of 01_fake_quant_math.

Each ``check_*`` takes the learner's function, runs it on fixed inputs chosen to
expose the usual mistakes (ties at .5, values past the clamp edges, an odd
zero-point, all-positive data), compares with torch's answer and, when it
differs, names the element, the two values and the likely cause.
"""

import torch

from ._common import ExerciseError, passed


def _as_tensor(value, what):
    if not isinstance(value, torch.Tensor):
        raise ExerciseError(f"{what} should return a torch.Tensor, got {type(value).__name__}")
    return value.detach()


def _check_shape(got, want, what):
    if got.shape != want.shape:
        raise ExerciseError(f"{what} returned shape {tuple(got.shape)}, expected "
                            f"{tuple(want.shape)} (one value per input element)")


def _first_diff(got, want):
    diff = (got.double() != want.double()).reshape(-1).nonzero()
    return None if len(diff) == 0 else int(diff[0, 0])


def _same(a, b):
    return torch.equal(a.double(), b.double())


# ---------------------------------------------------------------------------
# exercise 1: quantize
# ---------------------------------------------------------------------------

def _quantize_cases():
    """(x, scale, zero_point, quant_min, quant_max) cases: ties, clamp edges, an odd zero-point."""
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 0.0, 0.5, 100.0, -100.0])
    return [
        (ties, 0.5, 0, -128, 127),          # x/scale = .5, 1.5, 2.5, ... : half to even
        (ties, 0.5, 3, -8, 7),              # odd zero-point: added after rounding; clamps at 7
        (torch.randn(64, generator=g) * 2, 0.05, 10, 0, 255),  # uint8, clamps at 0
    ]


def _quantize_reference(x, scale, zero_point, quant_min, quant_max):
    from ..quant import quantize

    return quantize(x, scale, zero_point, quant_min, quant_max).to(torch.int64)


def _quantize_diagnosis(x, scale, zp, qmin, qmax, got):
    """Which usual mistake reproduces ``got`` exactly? Returns a hint or ''."""
    v = x * (1.0 / torch.tensor(scale, dtype=torch.float32))
    clamp = lambda t: t.clamp(qmin, qmax)
    candidates = [
        (torch.round(v) + zp,
         "the result is not clamped to [quant_min, quant_max]: saturate with .clamp(quant_min, quant_max)"),
        (clamp(torch.floor(v + 0.5) + zp),
         "floor(x/scale + 0.5) rounds ties up; torch rounds half to even: use torch.round"),
        (clamp(torch.round(v + zp)),
         "the zero-point is added before rounding; torch rounds x/scale first and then adds "
         "the (integer) zero-point, which differs at ties when the zero-point is odd"),
        (clamp(torch.trunc(v) + zp),
         "truncating (int() / .to(int)) rounds toward zero; use torch.round"),
        (clamp(torch.round(v) - zp),
         "the zero-point is subtracted; quantize ADDS it: q = round(x/scale) + zero_point"),
        (clamp(torch.round(x * scale) + zp),
         "x is multiplied by scale; quantize DIVIDES by it: q = round(x/scale) + zero_point"),
        (clamp(torch.round(v) + zp).to(torch.uint8).double(),
         "the codes were cast to torch.uint8, which wraps negative codes around (-1 becomes 255): "
         "a signed range needs a signed dtype such as torch.int32"),
    ]
    for alt, hint in candidates:
        if _same(got, alt):
            return hint
    return ""


def check_quantize(fn):
    """Check ``fn(x, scale, zero_point, quant_min, quant_max) -> integer tensor``.

    Passes when it equals ``qatlab.quantize`` (i.e. torch's
    ``quantize_per_tensor(...).int_repr()``) on cases with ties and clamping.
    """
    wrong_dtype = None
    for x, scale, zp, qmin, qmax in _quantize_cases():
        got = _as_tensor(fn(x.clone(), scale, zp, qmin, qmax), "your quantize")
        want = _quantize_reference(x, scale, zp, qmin, qmax)
        _check_shape(got, want, "your quantize")
        if got.is_floating_point() and not _same(got, torch.round(got)):
            i = _first_diff(got, torch.round(got))
            raise ExerciseError(f"element [{i}] (x={x.reshape(-1)[i].item():g}) is "
                                f"{got.reshape(-1)[i].item():g} but should be the integer "
                                f"{want.reshape(-1)[i].item()}: did you forget to round?")
        i = _first_diff(got, want)
        if i is None:
            if got.is_floating_point() or got.dtype == torch.bool:
                wrong_dtype = got.dtype
            continue
        xi = x.reshape(-1)[i].item()
        head = (f"with scale={scale}, zero_point={zp}, range [{qmin}, {qmax}]: element [{i}] "
                f"(x={xi:g}, x/scale={xi / scale:g}) is {got.reshape(-1)[i].item():g} but should "
                f"be {want.reshape(-1)[i].item()}")
        hint = _quantize_diagnosis(x, scale, zp, qmin, qmax, got.double())
        raise ExerciseError(head + (f": {hint}" if hint else ""))
    if wrong_dtype is not None:  # every value right, but not integer codes
        raise ExerciseError(
            f"the values are right, but your quantize returns dtype {wrong_dtype}: the codes "
            f"are integers, and an int8 kernel reads them as integers. Return an integer "
            f"tensor, e.g. .to(torch.int32) after clamping")
    return passed("quantize")


# ---------------------------------------------------------------------------
# exercise 2: choose qparams by hand
# ---------------------------------------------------------------------------

def _qparams_cases():
    g = torch.Generator().manual_seed(1)
    return [
        ("mixed signs", torch.randn(200, generator=g) * 1.5 + 0.3, 0, 255),
        ("all positive (like ReLU outputs)", torch.rand(200, generator=g) * 4 + 1, 0, 255),
        ("all negative, signed range", -torch.rand(200, generator=g) * 3 - 0.5, -128, 127),
        # lo / scale = -85 here: torch's zero-point is -128 + 85 = -43; forgetting quant_min gives 85
        ("mixed signs, signed range", torch.linspace(-1.0, 2.0, 200), -128, 127),
    ]


def check_choose_qparams(fn):
    """Check ``fn(x, quant_min, quant_max) -> (scale, zero_point)`` (affine, min/max of ``x``).

    Passes when ``scale`` is within 1e-5 (relative) of torch's ``MinMaxObserver``
    and ``zero_point`` equals it exactly.
    """
    from torch.ao.quantization import MinMaxObserver

    for name, x, qmin, qmax in _qparams_cases():
        out = fn(x.clone(), qmin, qmax)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ExerciseError(f"return a pair (scale, zero_point), got {type(out).__name__}")
        scale, zp = (float(torch.as_tensor(v).reshape(-1)[0]) for v in out)
        observer = MinMaxObserver(dtype=torch.quint8 if qmin == 0 else torch.qint8,
                                  quant_min=qmin, quant_max=qmax)
        observer(x)
        ref_scale, ref_zp = (float(v[0]) for v in observer.calculate_qparams())
        lo, hi = float(x.min()), float(x.max())
        where = f"for {name} data in [{lo:.3f}, {hi:.3f}] and range [{qmin}, {qmax}]"
        if abs(scale - ref_scale) > 1e-5 * ref_scale:
            ratio = scale / ref_scale
            if abs(scale - (hi - lo) / (qmax - qmin)) <= 1e-5 * ref_scale:
                why = ("the range must include 0 (so that 0 is exactly representable): "
                       "use min(x.min(), 0) and max(x.max(), 0)")
            elif abs(ratio - (qmax - qmin) / (qmax - qmin + 1)) < 1e-4:
                why = (f"you divided by the number of levels ({qmax - qmin + 1}); divide by the "
                       f"number of steps between them, quant_max - quant_min = {qmax - qmin}")
            else:
                why = "scale = (max(x.max(), 0) - min(x.min(), 0)) / (quant_max - quant_min)"
            raise ExerciseError(f"{where}: scale is {scale:.6g} but should be {ref_scale:.6g} "
                                f"({ratio:.4g}x): {why}")
        if zp != round(zp):
            raise ExerciseError(f"{where}: zero_point is {zp:.6g}, which is not an integer: "
                                f"round it, so that the real value 0 maps to an exact integer")
        if zp != ref_zp:
            lo0 = min(lo, 0.0)
            unclamped = qmin - round(lo0 / ref_scale)
            no_qmin = -round(lo0 / ref_scale)
            if zp in (no_qmin, min(max(no_qmin, qmin), qmax)) and qmin != 0:
                why = (f"quant_min is missing: -round(min / scale) = {no_qmin} is right only for a "
                       f"range that starts at 0. The zero-point is the code that 0.0 maps to, "
                       f"counted from quant_min: zero_point = quant_min - round(min(x.min(), 0) / "
                       f"scale) = {qmin} - ({round(lo0 / ref_scale)}) = {unclamped}")
            elif zp == qmin + round(lo / ref_scale) or zp == -(qmin - round(lo0 / ref_scale)):
                why = "check the sign: zero_point = quant_min - round(min(x.min(), 0) / scale)"
            elif (zp < qmin or zp > qmax) and zp == unclamped:
                why = f"it is outside [{qmin}, {qmax}]: clamp it"
            else:
                why = "zero_point = quant_min - round(min(x.min(), 0) / scale)"
            raise ExerciseError(f"{where}: zero_point is {zp:g} but should be {ref_zp:g}: {why}")
    return passed("choose_qparams")


# ---------------------------------------------------------------------------
# exercise 3: predict the STE gradient
# ---------------------------------------------------------------------------

def _ste_case():
    # q = round(x/scale) + zp with scale 0.5, zp 1, range [-4, 3]; x chosen around both edges:
    # x = 1.1  -> x/scale = 2.2 rounds to 2, q = 3: inside, although 2.2 + 1 > quant_max
    # x = 1.25 -> x/scale = 2.5 rounds to 2 (half to even), q = 3: inside
    #             (adding the zero-point first would give round(3.5) = 4: outside)
    # x = 1.75 -> 3.5 rounds to 4, q = 5: outside
    # x = 1.0  -> q = 3 exactly quant_max: inside;  x = -2.5 -> q = -4 = quant_min: inside
    # x = -2.7 -> -5.4 rounds to -5, q = -4: inside;  x = -2.8 -> -5.6 rounds to -6: outside
    x = torch.tensor([0.0, 0.3, -1.0, 1.0, 1.1, 1.25, 1.75, 2.0, -2.5, -2.7, -2.8, -4.0, 0.74])
    grad = torch.linspace(0.5, 1.7, len(x))
    return x, 0.5, 1, -4, 3, grad


def check_ste_grad(fn):
    """Check ``fn(x, scale, zero_point, quant_min, quant_max, grad_output) -> grad_input``.

    Passes when it equals the gradient torch's ``fake_quantize_per_tensor_affine``
    gives in ``backward`` (the straight-through estimator with its clamp mask).
    """
    x, scale, zp, qmin, qmax, grad = _ste_case()
    got = _as_tensor(fn(x.clone(), scale, zp, qmin, qmax, grad.clone()), "your gradient")
    xr = x.clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(xr, scale, zp, qmin, qmax).backward(grad)
    want = xr.grad
    _check_shape(got, want, "your gradient")
    i = _first_diff(got, want)
    if i is None:
        return passed("ste_grad")
    v = x * (1.0 / torch.tensor(scale))
    q = torch.round(v) + zp
    head = (f"element [{i}] (x={x[i].item():g}, round(x/scale) + zero_point = {q[i].item():g}, "
            f"range [{qmin}, {qmax}]) is {got[i].item():g} but should be {want[i].item():g}")
    inside = lambda t, lo, hi: grad * ((t >= lo) & (t <= hi))
    candidates = [
        (torch.zeros_like(grad),
         "all zeros is round's true derivative; the STE pretends round is the identity and "
         "passes grad_output straight through inside the range"),
        (grad,
         "the gradient passes everywhere; where the quantizer clamps (rounded value outside "
         "the range) the output is constant, so the gradient is 0 there"),
        (inside(v + zp, qmin, qmax),
         "the mask must test the ROUNDED value round(x/scale) + zero_point, not x/scale + zero_point"),
        (inside(torch.round(v + zp), qmin, qmax),
         "round x/scale first, then add the zero-point (torch rounds half to even, so "
         "round(2.5) + 1 = 3 but round(3.5) = 4)"),
        (grad * ((q > qmin) & (q < qmax)),
         "a value exactly on a range edge is still inside: use <= and >="),
        (inside(q, qmin, qmax) * scale,
         "inside the range the STE gradient is grad_output unchanged, not scaled"),
    ]
    for alt, why in candidates:
        if _same(got, alt):
            raise ExerciseError(f"{head}: {why}")
    raise ExerciseError(f"{head}: grad_input = grad_output * (quant_min <= q <= quant_max)")
