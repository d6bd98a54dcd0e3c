"""Exercise checks for 05_deployment: how much smaller an int8 layer is, derived and decided."""

import math
from fractions import Fraction

from ._common import ExerciseError, as_int, as_number, call, passed, require_callable

TARGET = Fraction(11, 40)  # "within 10 % of the ideal 1/4": a ratio of at most 0.275


def reference_int8_over_fp32(k):
    """Bytes of an XNNPACK int8 layer over its fp32 bytes, for ``k`` weights per output channel.

    Per output channel the int8 program stores ``k`` int8 weights (1 byte
    each), the bias as int32 (4 bytes) with its fp32 scale ``s_in * s_w[c]``
    (4 bytes), and the weight's fp32 per-channel scale (4 bytes); the fp32
    program stores ``k`` fp32 weights and an fp32 bias (BatchNorm already
    folded into both)::

        ratio(k) = (k + 12) / (4 k + 4)

    Measured on .pte files in 05_deployment.

    >>> reference_int8_over_fp32(9), reference_int8_over_fp32(288)
    (Fraction(21, 40), Fraction(75, 289))
    """
    return Fraction(k + 12, 4 * k + 4)


def reference_k_within_10pct():
    """Smallest ``k`` with ``ratio(k) <= 0.275``: ``40 (k + 12) <= 11 (4 k + 4)``, so ``k >= 109``.

    >>> reference_k_within_10pct()
    109
    """
    k = 1
    while reference_int8_over_fp32(k) > TARGET:
        k += 1
    return k


# typical wrong formulas -> the hint that names what is missing or extra
_WRONG = (
    (lambda k: Fraction(1, 4), "that is the ratio of the weights alone (1 byte vs 4): the per-channel "
                               "numbers (bias, scales) do not shrink with int8"),
    (lambda k: Fraction(k + 8, 4 * k + 4), "you stored 8 extra bytes per channel in int8; XNNPACK keeps "
                                           "three 4-byte numbers per output channel: the int32 bias, "
                                           "the bias's scale and the weight's scale"),
    (lambda k: Fraction(k + 4, 4 * k + 4), "you kept only the int32 bias per channel; the weight's "
                                           "per-channel scale and the bias's scale are 4 bytes each too"),
    (lambda k: Fraction(k + 12, 4 * k), "the fp32 program stores a 4-byte fp32 bias per channel too "
                                        "(BatchNorm is folded into it): the denominator is 4k + 4"),
    (lambda k: Fraction(k + 9, 4 * k + 4), "the bias stays 32-bit in int8 (int32: it is added to the "
                                           "int32 accumulator), not 1 byte"),
    (lambda k: Fraction(4 * k + 4, k + 12), "that is fp32 over int8 (how many times smaller); the "
                                            "exercise asks int8 bytes over fp32 bytes"),
)
_PROBES = (1, 2, 9, 27, 64, 108, 109, 288, 1152)


def check_int8_size_ratio(int8_over_fp32, k_within_10pct):
    """``int8_over_fp32(k)`` (the byte ratio of a layer) and ``k_within_10pct`` (the decision).

    Taught in 05_deployment. The ratio is checked at several ``k`` against
    :func:`reference_int8_over_fp32`; typical wrong formulas get a hint that
    names the missing or extra bytes. ``k_within_10pct`` must be the smallest
    ``k`` whose ratio is at most 0.275.
    """
    require_callable(int8_over_fp32, "int8_over_fp32")
    answers = {}
    for k in _PROBES:
        got = call(int8_over_fp32, f"int8_over_fp32({k})", k)
        answers[k] = got = as_number(got, f"int8_over_fp32({k}) (a ratio of bytes)")
        want = reference_int8_over_fp32(k)
        if abs(got - float(want)) <= 1e-6 * max(1.0, float(want)):
            continue
        hint = "count the bytes per output channel in each program"
        for p in _PROBES:  # the mistake is matched on every probe, not on this k alone
            if p not in answers:
                try:
                    answers[p] = as_number(int8_over_fp32(p), "")
                except Exception:  # noqa: BLE001 - an unusable probe only narrows the match
                    answers[p] = None
        for wrong, why in _WRONG:
            if all(a is None or abs(a - float(wrong(p))) <= 1e-6 * max(1.0, float(wrong(p)))
                   for p, a in answers.items()):
                hint = why
                break
        raise ExerciseError(f"int8_over_fp32({k}) = {float(got):.4f} but should be {float(want):.4f}: {hint}")
    want_k = reference_k_within_10pct()
    if k_within_10pct is None or k_within_10pct is Ellipsis:
        raise ExerciseError("k_within_10pct is not set yet: assign it the smallest k (weights per "
                            "output channel) whose ratio is at most 0.275")
    number = as_number(k_within_10pct, "k_within_10pct (a number of weights per channel)")
    if not math.isfinite(number) or number != int(number):
        raise ExerciseError(f"k_within_10pct = {number:g} is not a whole number: k counts weights, so "
                            f"take the smallest INTEGER k whose ratio is at most 0.275 (round up)")
    k_within_10pct = as_int(number, "k_within_10pct")
    if k_within_10pct != want_k:
        r = reference_int8_over_fp32(k_within_10pct) if k_within_10pct > 0 else None
        if r is not None and r > TARGET:
            detail = f"at k={k_within_10pct} the ratio is {float(r):.4f} > 0.275"
        elif r is not None:
            detail = (f"k={k_within_10pct} qualifies ({float(r):.4f} <= 0.275) but a smaller k does too: "
                      f"solve (k + 12) / (4k + 4) <= 0.275 for the smallest integer k")
        else:
            detail = "k counts weights, so it is at least 1"
        raise ExerciseError(f"k_within_10pct = {k_within_10pct} is not the smallest k: {detail}")
    return passed("int8 size ratio")
