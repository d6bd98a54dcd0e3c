"""Checks for the exercises of 01_fake_quant_math.

Each ``check_*`` takes the learner's function, runs it on fixed inputs chosen to
expose the usual mistakes (ties at .5, values past the clamp edges, an odd
zero-point, all-positive data), compares with torch's answer and, when it
differs, names the element, the two values and the likely cause.
"""

import math

import torch

from ._common import (
    ExerciseError,
    as_number,
    as_sequence,
    as_tensor_result,
    call,
    passed,
    require_callable,
)


def _as_tensor(value, what):
    return as_tensor_result(value, what)


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
    cases = [
        (ties, 0.5, 0, -128, 127),          # x/scale = .5, 1.5, 2.5, ... : half to even
        (ties, 0.5, 3, -8, 7),              # odd zero-point: added after rounding; clamps at 7
        (torch.randn(64, generator=g) * 2, 0.05, 10, 0, 255),  # uint8, clamps at 0
        # codes exactly on the limits and one step past them; a 2-D tensor of 3 x 5 values
        (torch.tensor([[-64.0, -63.0, -65.0, 63.5, 64.0], [0.0, -0.0, 1.0, -1.0, 62.0],
                       [-64.5, 63.0, 2.5, -2.5, 3.5]]) * 0.5, 0.5, 0, -128, 127),
        (torch.tensor([-3.0, 0.0, 252.0, 253.0, 254.0, -4.0, 1.5]), 1.0, 3, 0, 255),
    ]
    # random cases: power-of-two scales (x / scale and x * (1 / scale) are then the same float),
    # odd and even zero-points, signed and unsigned ranges, lengths that are not multiples of 8
    for i, (bits, signed) in enumerate([(8, True), (8, False), (4, True), (4, False), (2, True), (3, False)]):
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        scale = 2.0 ** -(i % 4 + 1)
        zp = int(torch.randint(qmin, qmax + 1, (1,), generator=g))
        codes = torch.randint(qmin - zp - 3, qmax - zp + 4, (37 + 10 * i,), generator=g).float()
        frac = torch.tensor([0.0, 0.5, -0.5, 0.25, -0.25, 0.75])[torch.randint(0, 6, codes.shape, generator=g)]
        cases.append(((codes + frac) * scale, scale, zp, qmin, qmax))
    return cases


def _quantize_reference(x, scale, zero_point, quant_min, quant_max):
    from ..quant import quantize

    return quantize(x, scale, zero_point, quant_min, quant_max).to(torch.int64)


def _quantize_diagnosis(x, scale, zp, qmin, qmax, got, fn=None):
    """Which usual mistake reproduces ``got`` exactly? Returns a hint or ''.

    With ``fn``, a mistake that also reproduces ``fn``'s answers on every other case is
    preferred, so that two slips that agree on this case (ceil and floor(v + 0.5) on ties)
    are told apart."""
    matches = [hint for alt, hint in _quantize_candidates(x, scale, zp, qmin, qmax) if _same(got, alt)]
    if fn is None or len(matches) <= 1:
        return matches[0] if matches else ""
    answers = []
    for case in _quantize_cases():
        try:
            answers.append((case, torch.as_tensor(fn(case[0].clone(), *case[1:])).double()))
        except Exception:  # noqa: BLE001 - a crash elsewhere only makes that case unusable
            continue
    for hint in matches:
        if all(any(h == hint and _same(a, alt) for alt, h in _quantize_candidates(*case))
               or _same(a, _quantize_reference(*case)) for case, a in answers):
            return hint
    return matches[0]


def _quantize_candidates(x, scale, zp, qmin, qmax):
    """``[(codes, hint)]``: what each usual mistake returns on one case."""
    v = x * (1.0 / torch.tensor(scale, dtype=torch.float32))
    clamp = lambda t: t.clamp(qmin, qmax)
    candidates = [
        (torch.round(v) + zp,
         "the result is not clamped to [quant_min, quant_max]: saturate with .clamp(quant_min, quant_max)"),
        (clamp(torch.floor(v + 0.5) + zp),
         "floor(x/scale + 0.5) rounds ties up; torch rounds half to even: use torch.round"),
        (clamp(torch.sign(v) * torch.floor(v.abs() + 0.5) + zp),
         "ties are rounded away from zero (as C's round() or numpy's int(x + 0.5) on positives); "
         "torch rounds half to even (2.5 -> 2, 3.5 -> 4): use torch.round"),
        (clamp(torch.ceil(v) + zp), "ceil rounds up; use torch.round (nearest, ties to even)"),
        (clamp(torch.floor(v) + zp), "floor rounds down; use torch.round (nearest, ties to even)"),
        (torch.round(v).clamp(qmin, qmax) + zp,
         "you clamped before adding the zero-point; clamp the final code, round(x/scale) + "
         "zero_point, to [quant_min, quant_max]"),
        ((torch.round(v) + zp).clamp(qmin + 1, qmax - 1),
         "the limits are codes too: clamp to [quant_min, quant_max] inclusive, not one step inside"),
        ((torch.round(v) + zp).clamp(qmin, qmax - 1),
         "quant_max is a valid code: clamp to [quant_min, quant_max] inclusive (off by one at the top)"),
        ((torch.round(v) + zp).clamp(qmin + 1, qmax),
         "quant_min is a valid code: clamp to [quant_min, quant_max] inclusive (off by one at the bottom)"),
        (clamp(torch.round(v)), "the zero-point is missing: q = round(x/scale) + zero_point"),
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
        (clamp(torch.round(v) + zp).to(torch.int8).double(),
         "the codes were cast to torch.int8, which wraps codes above 127 around (200 becomes -56): "
         "an unsigned range up to 255 needs torch.uint8 or a wider dtype such as torch.int32"),
    ]
    return candidates


def check_quantize(fn):
    """Check ``fn(x, scale, zero_point, quant_min, quant_max) -> integer tensor``.

    Passes when it equals ``qatlab.quantize`` (i.e. torch's
    ``quantize_per_tensor(...).int_repr()``) on cases with ties and clamping.
    """
    require_callable(fn, "my_quantize")
    wrong_dtype = None
    for x, scale, zp, qmin, qmax in _quantize_cases():
        what = f"your quantize(x of shape {tuple(x.shape)}, {scale}, {zp}, {qmin}, {qmax})"
        got = _as_tensor(call(fn, what, x.clone(), scale, zp, qmin, qmax), "your quantize")
        if got.dtype == torch.bool or got.is_complex():
            raise ExerciseError(f"{what} returned dtype {got.dtype}; return the integer codes")
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
        hint = _quantize_diagnosis(x, scale, zp, qmin, qmax, got.double(), fn)
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

ALL_ZEROS = "all zeros (a dead ReLU channel)"
_EPS_HINT = ("the range is empty (max = min = 0), so (hi - lo) / (quant_max - quant_min) is 0 and "
             "min / scale is 0/0: floor the scale at eps as torch does, scale = max((hi - lo) / "
             "(quant_max - quant_min), torch.finfo(torch.float32).eps)")


def _qparams_cases():
    g = torch.Generator().manual_seed(1)
    return [
        ("mixed signs", torch.randn(200, generator=g) * 1.5 + 0.3, 0, 255),
        ("all positive (like ReLU outputs)", torch.rand(200, generator=g) * 4 + 1, 0, 255),
        ("all negative, signed range", -torch.rand(200, generator=g) * 3 - 0.5, -128, 127),
        # lo / scale = -85 here: torch's zero-point is -128 + 85 = -43; forgetting quant_min gives 85
        ("mixed signs, signed range", torch.linspace(-1.0, 2.0, 200), -128, 127),
        # scale = 2 exactly and min / scale = -2.5, then -3.5: ties, which torch rounds half to even
        ("a tie at min / scale = -2.5", torch.tensor([[-5.0, 505.0], [0.0, 3.0]]), 0, 255),
        ("a tie at min / scale = -3.5", torch.tensor([-7.0, 503.0, 1.0]), 0, 255),
        # a 4-bit signed range: quant_max - quant_min = 15 steps
        ("mixed signs, 4-bit signed range", torch.tensor([-0.3, 1.2, 0.7, -0.1, 0.0]), -8, 7),
        # max = min = 0: (hi - lo) / (quant_max - quant_min) is 0, and lo / scale is 0/0;
        # torch floors scale at torch.finfo(torch.float32).eps
        (ALL_ZEROS, torch.zeros(5), 0, 255),
    ]


def check_choose_qparams(fn):
    """Check ``fn(x, quant_min, quant_max) -> (scale, zero_point)`` (affine, min/max of ``x``).

    Passes when ``scale`` is within 1e-5 (relative) of torch's ``MinMaxObserver``
    and ``zero_point`` equals it exactly, also on an all-zero tensor, where torch floors
    ``scale`` at ``torch.finfo(torch.float32).eps``.
    """
    from torch.ao.quantization import MinMaxObserver

    require_callable(fn, "my_choose_qparams")
    for name, x, qmin, qmax in _qparams_cases():
        what = f"your choose_qparams on {name} data (range [{qmin}, {qmax}])"
        empty = name == ALL_ZEROS
        crash_hint = _EPS_HINT[0].upper() + _EPS_HINT[1:] if empty else None
        out = call(fn, what, x.clone(), qmin, qmax, on_error=lambda e, hint=crash_hint: hint)
        scale, zp = as_sequence(out, 2, what, names=("scale", "zero_point"))
        scale, zp = as_number(scale, f"{what}: scale"), as_number(zp, f"{what}: zero_point")
        observer = MinMaxObserver(dtype=torch.quint8 if qmin >= 0 else torch.qint8,
                                  quant_min=qmin, quant_max=qmax)
        observer(x)
        ref_scale, ref_zp = (float(v[0]) for v in observer.calculate_qparams())
        lo, hi = float(x.min()), float(x.max())
        where = f"for {name} data in [{lo:.3f}, {hi:.3f}] and range [{qmin}, {qmax}]"
        if not abs(scale - ref_scale) <= 1e-5 * ref_scale:  # `not <=` also catches a NaN scale
            ratio = scale / ref_scale
            if empty:
                why = _EPS_HINT
            elif abs(scale - (hi - lo) / (qmax - qmin)) <= 1e-5 * ref_scale:
                why = ("the range must include 0 (so that 0 is exactly representable): "
                       "use min(x.min(), 0) and max(x.max(), 0)")
            elif abs(ratio - (qmax - qmin) / (qmax - qmin + 1)) < 1e-4:
                why = (f"you divided by the number of levels ({qmax - qmin + 1}); divide by the "
                       f"number of steps between them, quant_max - quant_min = {qmax - qmin}")
            else:
                why = "scale = (max(x.max(), 0) - min(x.min(), 0)) / (quant_max - quant_min)"
            raise ExerciseError(f"{where}: scale is {scale:.6g} but should be {ref_scale:.6g} "
                                f"({ratio:.4g}x): {why}")
        if not math.isfinite(zp):
            raise ExerciseError(f"{where}: zero_point is {zp:g}: " + (
                _EPS_HINT if empty else "zero_point = quant_min - round(min(x.min(), 0) / scale)"))
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
            elif lo0 / ref_scale % 1 == 0.5 and zp == qmin - math.floor(lo0 / ref_scale + 0.5):
                why = (f"min / scale = {lo0 / ref_scale:g} is a tie, and floor(v + 0.5) (or int(v + 0.5)) "
                       f"rounds it up; torch rounds half to even, like Python's round(): use round()")
            elif lo0 / ref_scale % 1 == 0.5 and zp == qmin - math.copysign(math.floor(abs(lo0 / ref_scale) + 0.5),
                                                                       lo0 / ref_scale):
                why = (f"min / scale = {lo0 / ref_scale:g} is a tie, which you rounded away from zero; "
                       f"torch rounds half to even, like Python's round() and torch.round")
            elif zp in (qmin - math.trunc(lo0 / ref_scale), qmin - math.floor(lo0 / ref_scale),
                        qmin - math.ceil(lo0 / ref_scale)):
                why = (f"round min / scale = {lo0 / ref_scale:.4g} to the NEAREST integer (round()), "
                       f"not toward zero (int()), down (floor) or up (ceil)")
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


def _ste_cases():
    """The hand-made case above, then random ones: power-of-two scales, codes around both edges
    (ties included), odd and even zero-points, signed and unsigned ranges, a 2-D tensor."""
    cases = [_ste_case()]
    g = torch.Generator().manual_seed(11)
    for i, (qmin, qmax) in enumerate([(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1)]):
        scale = 2.0 ** -(i % 3)
        zp = int(torch.randint(qmin, qmax + 1, (1,), generator=g))
        edges = torch.tensor([qmin - zp, qmax - zp], dtype=torch.float32)
        steps = edges[torch.randint(0, 2, (41 + 6 * i,), generator=g)] + \
            torch.tensor([-1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5])[
                torch.randint(0, 9, (41 + 6 * i,), generator=g)]
        x = steps * scale
        if i == 2:
            x = x[:40].reshape(5, 8)
        grad = torch.rand(x.shape, generator=g) + 0.5
        cases.append((x, scale, zp, qmin, qmax, grad))
    return cases


def check_ste_grad(fn):
    """Check ``fn(x, scale, zero_point, quant_min, quant_max, grad_output) -> grad_input``.

    Passes when it equals the gradient torch's ``fake_quantize_per_tensor_affine``
    gives in ``backward`` (the straight-through estimator with its clamp mask), on a
    hand-made case around both edges and on random cases with ties at the edges.
    """
    require_callable(fn, "my_ste_grad")
    cases = _ste_cases()
    for case in cases:
        _check_one_ste(fn, *case, cases=cases)
    return passed("ste_grad")


def _ste_reference(x, scale, zp, qmin, qmax, grad):
    xr = x.clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(xr, scale, zp, qmin, qmax).backward(grad)
    return xr.grad


def _check_one_ste(fn, x, scale, zp, qmin, qmax, grad, cases=()):
    what = f"your gradient (scale={scale}, zero_point={zp}, range [{qmin}, {qmax}])"
    got = _as_tensor(call(fn, what, x.clone(), scale, zp, qmin, qmax, grad.clone()), what)
    want = _ste_reference(x, scale, zp, qmin, qmax, grad)
    _check_shape(got, want, "your gradient")
    i = _first_diff(got, want)
    if i is None:
        return
    matches = [why for alt, why in _ste_candidates(x, scale, zp, qmin, qmax, grad) if _same(got, alt)]
    if len(matches) > 1:  # prefer the slip that also reproduces the answers on the other cases
        answers = []
        for case in cases:
            try:
                answers.append((case, torch.as_tensor(fn(case[0].clone(), *case[1:-1], case[-1].clone())).double()))
            except Exception:  # noqa: BLE001 - a crash elsewhere only makes that case unusable
                continue
        consistent = [why for why in matches
                      if all(_same(a, _ste_reference(*case)) or
                             any(w == why and _same(a, alt) for alt, w in _ste_candidates(*case))
                             for case, a in answers)]
        matches = consistent or matches[:1]
    x, got, want = x.reshape(-1), got.reshape(-1), want.reshape(-1)
    v = x * (1.0 / torch.tensor(scale))
    q = torch.round(v) + zp
    head = (f"element [{i}] (x={x[i].item():g}, scale={scale}, round(x/scale) + zero_point = "
            f"{q[i].item():g}, range [{qmin}, {qmax}]) is {got[i].item():g} but should be "
            f"{want[i].item():g}")
    if len(matches) > 1:  # slips that give the same answer on every case
        raise ExerciseError(f"{head}: one of these: " + "; or ".join(matches))
    if matches:
        raise ExerciseError(f"{head}: {matches[0]}")
    raise ExerciseError(f"{head}: grad_input = grad_output * (quant_min <= q <= quant_max)")


def _ste_candidates(x, scale, zp, qmin, qmax, grad):
    """``[(grad_input, hint)]``: what each usual mistake returns on one case."""
    x, grad = x.reshape(-1), grad.reshape(-1)
    v = x * (1.0 / torch.tensor(scale))
    q = torch.round(v) + zp
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
        (inside(torch.floor(v + 0.5) + zp, qmin, qmax),
         "floor(x/scale + 0.5) rounds ties up; torch rounds half to even (torch.round), and at a "
         "range edge that decides whether the gradient passes"),
        (grad * ((q > qmin) & (q < qmax)),
         "a value exactly on a range edge is still inside: use <= and >="),
        (inside(torch.round(v), qmin, qmax),
         "the zero-point is missing: the code is round(x/scale) + zero_point"),
        (inside(torch.round(v) - zp, qmin, qmax),
         "the zero-point is subtracted; the code is round(x/scale) + zero_point"),
        (inside(x, (qmin - zp) * scale, (qmax - zp) * scale),
         "you compared x with (quant_min - zero_point)·scale and (quant_max - zero_point)·scale; "
         "what decides is the rounded code, and values up to half a step past those bounds "
         "still round inside"),
        (inside(q, qmin, qmax) * scale,
         "inside the range the STE gradient is grad_output unchanged, not scaled"),
        (((q >= qmin) & (q <= qmax)).to(grad.dtype),
         "that is the mask alone; multiply it by grad_output"),
    ]
    return candidates
