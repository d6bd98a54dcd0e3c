"""Checks for the exercises of 09_integer_kernels.

``check_requantize`` runs the learner's FBGEMM requantization on cases built
to expose the usual slips (ties at .5, an odd zero-point, a fused ReLU with a
non-zero zero-point, a bias that does not round to an integer, values past
255, and four channels where an algebraically equal order of operations
rounds differently in float32) and names the first element that differs and
the likely cause: the rounding mode, where the zero-point and the bias enter,
the clamp (missing, int8's range, a wrapping uint8 cast), M computed as
``s_w·(s_x/s_y)``, ``acc·M + b/s_y``, ``acc·M + (b/a)·M``, float64.
``check_pair_sum_range`` does the same for the worst-case ``vpmaddubsw`` pair
sum (weights of both signs, an odd reduction length, rows vs columns, both
inputs at ``x_max``, int8 products that wrap)."""

import torch

from ._common import (
    ExerciseError,
    as_int,
    as_sequence,
    as_tensor_result,
    call,
    passed,
    require_callable,
)

_F32 = torch.float32


# ---------------------------------------------------------------------------
# exercise 1: FBGEMM's requantization step
# ---------------------------------------------------------------------------

def _requantize_cases():
    """(name, acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu)."""
    ties = torch.tensor([[1, 3, 5, -1, -3, 0, 7, 9, 601]], dtype=torch.int32)     # 601·0.5 > 255
    g = torch.Generator().manual_seed(9)
    acc = torch.randint(-400, 400, (6, 4), generator=g, dtype=torch.int32)
    acc[0, 0] = 4000                                          # far past 255
    return [
        # M = 0.5 exactly and no bias: every odd accumulator lands on a tie x.5
        ("ties", ties, torch.zeros(9), 0.5, torch.ones(9), 1.0, 0, False),
        # the same ties with an odd zero-point: rounding must come before adding it
        ("odd zero-point", ties, torch.zeros(9), 0.5, torch.ones(9), 1.0, 3, False),
        # b / (s_x s_w) = 2.6 is not an integer: FBGEMM adds it in float
        ("float bias", torch.zeros(1, 8, dtype=torch.int32), torch.full((8,), 1.3), 0.5, torch.ones(8),
         1.0, 10, False),
        # M = 2 and b / (s_x s_w) = 6: the bias is worth 12 output steps, not 3
        ("bias units", torch.tensor([[-20, -3, 0, 4, 30]], dtype=torch.int32), torch.full((5,), 3.0),
         0.5, torch.ones(5), 0.25, 50, False),
        # a fused ReLU with a zero-point of 20: the floor is 20, not 0
        ("relu", torch.tensor([[-90, -50, -10, 10, 50, 90]], dtype=torch.int32), torch.zeros(6), 0.02,
         torch.full((6,), 0.5), 0.01, 20, True),
        # per-channel scales, a bias, and one value past 255
        ("per-channel", acc, torch.tensor([0.1, -0.2, 0.05, 0.0]), 0.03,
         torch.tensor([0.01, 0.02, 0.005, 0.015]), 0.004, 128, False),
        # four channels found by a search over random layers: in each, exactly one algebraically
        # equal rewrite rounds to another integer than FBGEMM's order (column 0: float64;
        # 1: acc·M + b/s_y; 2: acc·M + (b/a)·M; 3: M = s_w·(s_x/s_y))
        ("order of operations", torch.tensor([[-906, -938, 897, 653]], dtype=torch.int32),
         torch.tensor([0.2648378610610962, 0.19730542600154877, -0.27544039487838745, 0.08514860272407532]),
         0.03, torch.tensor([0.01923612505197525, 0.011347031220793724, 0.014174671843647957,
                             0.010661122389137745]), 0.004, 128, False),
    ]


def _fbgemm_reference(acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu):
    from ..integer import requantize_fbgemm

    return requantize_fbgemm(acc, bias, input_scale=input_scale, weight_scale=weight_scale,
                             output_scale=output_scale, output_zero_point=output_zero_point,
                             relu=relu).to(torch.int64)


def _requantize_alternatives(acc, bias, s_x, s_w, s_y, zp, relu):
    """Typical wrong answers, each as ``(outputs, hint)``; several ways to write one slip share a hint."""
    x, y = torch.tensor(s_x, dtype=_F32), torch.tensor(s_y, dtype=_F32)
    a = x * s_w.to(_F32)
    m = a / y
    lo = zp if relu else 0
    acc_f = acc.to(_F32)
    b = bias / a
    t = (acc_f + b) * m

    def clamp(v, low=lo):
        return v.clamp(low, 255)

    order = ("FBGEMM computes a = s_x·s_w, M = a / s_y and b' = b / a in float32, adds b' to float(acc) "
             "and multiplies once: round((float(acc) + b')·M)")
    f64 = torch.float64
    a64 = s_x * s_w.to(f64)
    return [
        (clamp(torch.floor(t + 0.5) + zp),
         "floor(x + 0.5) rounds ties up; FBGEMM's nearbyint rounds half to even: use torch.round"),
        (clamp(torch.round(t + zp)),
         "the zero-point is added before rounding; FBGEMM rounds first, then adds z_y "
         "(they differ on ties when z_y is odd)"),
        (clamp(torch.round((acc_f + torch.round(b)) * m) + zp),
         "you rounded the bias to an integer first (Jacob et al.'s int32 bias); FBGEMM adds the "
         "float b / (s_x·s_w) to float(acc) and rounds once, at the end"),
        (clamp(torch.round(t) + zp, 0),
         "with a fused ReLU the output floor is the zero-point z_y (real 0), not the integer 0"),
        ((torch.round(t) + zp).clamp(zp if relu else -128, 127),
         "you clamped to int8's [-128, 127]; the outputs are uint8: clamp to "
         "[z_y if relu else 0, 255]"),
        ((torch.round(t) + zp).clamp(-128, 127),
         "you clamped to int8's [-128, 127]; the outputs are uint8: clamp to "
         "[z_y if relu else 0, 255]"),
        (torch.round(t) + zp,
         "the result is not clamped: saturate to [z_y if relu else 0, 255]"),
        (clamp(torch.trunc(t) + zp),
         "truncating (.to(int)) rounds toward zero; use torch.round (nearbyint)"),
        (clamp(torch.round((acc_f * m + bias)) + zp),
         "the bias was added after scaling, in real units; FBGEMM adds b / (s_x·s_w) in "
         "accumulator units, before multiplying by M"),
        (clamp(torch.round(acc_f * m) + zp),
         "the bias is missing: add b / (s_x·s_w) to float(acc) before multiplying by M"),
        # algebraically equal rewrites that round differently in float32
        (clamp(torch.round((acc_f + b) * (s_w.to(_F32) * (x / y))) + zp),
         "you computed M = s_w·(s_x/s_y); in float32 the order of the two operations changes M's "
         "last bits, enough to move an output across a rounding boundary. " + order),
        (clamp(torch.round((acc_f + b) * (s_w.to(_F32) * (s_x / s_y))) + zp),
         "you computed M = s_w·(s_x/s_y); in float32 the order of the two operations changes M's "
         "last bits, enough to move an output across a rounding boundary. " + order),
        (clamp(torch.round(acc_f * m + bias / y) + zp),
         "you added the bias after scaling, as b / s_y: equal on paper, but acc·M + b/s_y rounds "
         "differently in float32. " + order),
        (clamp(torch.round(acc_f * m + b * m) + zp),
         "you distributed M: acc·M + (b/a)·M makes two products and one more rounding in float32. "
         + order),
        (clamp(torch.round((acc.to(f64) + bias.to(f64) / a64) * (a64 / s_y)) + zp),
         "you computed in float64; FBGEMM works in float32 (a = s_x·s_w, M and b' are float32 "
         "values), and the extra precision moves an output across a rounding boundary"),
    ]


def _wraps(got, acc, bias, s_x, s_w, s_y, zp):
    """Whether ``got`` is FBGEMM's unclamped result wrapped modulo 256 (a uint8 cast without a clamp)."""
    a = torch.tensor(s_x, dtype=_F32) * s_w.to(_F32)
    unclamped = (torch.round((acc.to(_F32) + bias / a) * (a / torch.tensor(s_y, dtype=_F32))) + zp).to(torch.int64)
    return bool(((got - unclamped) % 256 == 0).all())


def check_requantize(fn):
    """Check ``fn(acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu)``.

    ``acc`` is an int32 ``(N, C)`` accumulator, ``bias`` a float ``(C,)``,
    ``weight_scale`` a float ``(C,)`` tensor; the answer must equal FBGEMM's
    requantization (:func:`qatlab.integer.requantize_fbgemm`, itself checked
    bit for bit against torch's x86 kernels) as uint8 values.
    """
    require_callable(fn, "requantize")

    def on_error(e):
        if isinstance(e, RuntimeError) and "size" in str(e):
            return ("weight_scale and bias hold one value per output channel, the LAST dimension "
                    "of acc (N, C): they broadcast as they are, without reshaping to (C, 1)")
        return None

    for name, acc, bias, s_x, s_w, s_y, zp, relu in _requantize_cases():
        what = f"requantize on case '{name}'"
        got = call(fn, what, acc.clone(), bias.clone(), s_x, s_w.clone(), s_y, zp, relu,
                   on_error=on_error)
        got = as_tensor_result(got, f"{what} (a tensor of uint8 values)")
        if got.dtype == torch.bool or got.is_complex():
            raise ExerciseError(f"{what} returned dtype {got.dtype}; return uint8 codes")
        raw_dtype = got.dtype
        want = _fbgemm_reference(acc, bias, s_x, s_w, s_y, zp, relu)
        if got.shape != want.shape:
            hint = ""
            if got.dim() == 2 and got.shape[-1] == want.shape[-1] and got.shape[0] == want.shape[-1]:
                hint = (": a per-channel tensor was made a column (C, 1) and broadcast against acc; "
                        "weight_scale and bias hold one value per output channel, the LAST dimension "
                        "of acc (N, C), and broadcast as they are")
            raise ExerciseError(f"case '{name}': shape {tuple(got.shape)}, expected "
                                f"{tuple(want.shape)} (one output per accumulator){hint}")
        if got.is_floating_point():
            if not torch.equal(got, torch.round(got)):
                raise ExerciseError(f"case '{name}': the result has fractions; round it "
                                    "(torch.round) and return integers")
        got = got.to(torch.int64)
        if torch.equal(got, want):
            continue
        diff = (got != want).reshape(-1).nonzero()
        i = int(diff[0, 0])
        head = (f"case '{name}' (relu={relu}, z_y={zp}): element {i} (acc={acc.reshape(-1)[i].item()}) "
                f"is {got.reshape(-1)[i].item()} but FBGEMM gives {want.reshape(-1)[i].item()} "
                f"({len(diff)} of {want.numel()} elements differ)")
        if raw_dtype == torch.int8:
            raise ExerciseError(f"{head}: you returned int8, which holds -128..127; FBGEMM's outputs "
                                "are uint8 (0..255): clamp, then .to(torch.uint8)")
        hints = []
        for alt, hint in _requantize_alternatives(acc, bias, s_x, s_w, s_y, zp, relu):
            if torch.equal(got, alt.to(torch.int64)) and hint not in hints:
                hints.append(hint)
        if len(hints) == 1:
            raise ExerciseError(f"{head}: {hints[0]}")
        if hints:       # this case cannot tell the slips apart (e.g. no clamp vs int8's clamp)
            raise ExerciseError(f"{head}: one of these: " + "; or ".join(hints))
        if _wraps(got, acc, bias, s_x, s_w, s_y, zp):
            raise ExerciseError(f"{head}: casting to uint8 wraps around instead of saturating "
                                "(300 becomes 44, -3 becomes 253): clamp to [z_y if relu else 0, 255] "
                                "before .to(torch.uint8)")
        raise ExerciseError(head)
    return passed("requantize")


# ---------------------------------------------------------------------------
# exercise 2: can a layer saturate vpmaddubsw?
# ---------------------------------------------------------------------------

def _pair_cases():
    g = torch.Generator().manual_seed(4)
    cases = [
        # weights of opposite signs in a pair: |w0| + |w1| is not reachable with x >= 0
        ("opposite signs", torch.tensor([[127, -128, 100, 100]], dtype=torch.int8), 255),
        # the same weights read as rows vs columns give different pairs
        ("pairs along k", torch.tensor([[120, 0, 5, 5], [120, 0, 5, 5]], dtype=torch.int8), 255),
        # odd K: the last weight pairs with a zero
        ("odd K", torch.tensor([[3, 4, 127], [-2, 1, -128]], dtype=torch.int8), 127),
        ("random layer", torch.randint(-128, 128, (16, 27), generator=g, dtype=torch.int8), 255),
        # the extremes of int8 on every weight, K = 1, all weights of one sign, all zero
        ("the int8 limits", torch.tensor([[-128, -128, 127, 127], [127, -128, -128, 127]], dtype=torch.int8), 255),
        ("K = 1", torch.tensor([[-5], [7], [0]], dtype=torch.int8), 255),
        ("all positive", torch.randint(1, 128, (4, 6), generator=g, dtype=torch.int8), 200),
        ("all zero", torch.zeros(2, 4, dtype=torch.int8), 255),
    ]
    # random layers: odd and even K, small and large, inputs that reach only part of uint8
    for rows, k, x_max in [(3, 5, 1), (8, 64, 255), (5, 33, 100), (1, 2, 255), (7, 9, 37)]:
        w = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
        cases.append((f"random {rows} x {k}, x_max={x_max}", w, x_max))
    return cases


_WRAP_HINT = ("your products wrapped around: x_max times an int8 tensor stays int8 (255·127 "
              "becomes -127), the overflow this exercise is about. Widen first: w_cols.to(torch.int64)")


def _pair_alternatives(w, x_max):
    """Typical wrong answers for (lo, hi), each with its hint."""
    ww = w.to(torch.int64)
    odd = ww.shape[1] % 2
    wp = torch.nn.functional.pad(ww, (0, odd)).reshape(ww.shape[0], -1, 2)
    blind = int(x_max * wp.abs().sum(-1).max())
    alts = [
        ((-blind, blind),
         "inputs are >= 0 (uint8), so a pair only adds up weights of the same sign: take "
         "x_max·Σ(positive weights of the pair) for hi and x_max·Σ(negative ones) for lo"),
        ((int(x_max * wp.clamp_max(0).sum(-1).min()), -int(x_max * wp.clamp_max(0).sum(-1).min())),
         "hi is not −lo: the positive and negative extremes come from different weights"),
        ((-int(x_max * wp.clamp_min(0).sum(-1).max()), int(x_max * wp.clamp_min(0).sum(-1).max())),
         "lo is not −hi: the positive and negative extremes come from different weights"),
    ]
    alts.append(((int(x_max * ww.clamp_max(0).min()), int(x_max * ww.clamp_min(0).max())),
                 "each weight was taken alone (or paired across rows): vpmaddubsw adds "
                 "x[2p]·w[o, 2p] + x[2p+1]·w[o, 2p+1], adjacent k along a row of w_cols"))
    if ww.shape[0] % 2 == 0:                       # pairs of rows (output channels) instead of k
        wr = ww.T.reshape(ww.shape[1], -1, 2)
        alts.append(((int(x_max * wr.clamp_max(0).sum(-1).min()), int(x_max * wr.clamp_min(0).sum(-1).max())),
                     "you paired output channels (rows); vpmaddubsw pairs adjacent k along a row"))
    alts.append(((int(x_max * wp.sum(-1).min()), int(x_max * wp.sum(-1).max())),
                 "x_max·(w0 + w1) sets both inputs of a pair to x_max, but x0 and x1 vary "
                 "independently in [0, x_max]: the extremes put x_max on the weights of one sign and "
                 "0 on the others"))
    # int8 weights times x_max without widening: every product wraps around in int8
    wrapped = (x_max * torch.nn.functional.pad(w, (0, odd))).reshape(ww.shape[0], -1, 2)
    alts.append(((int(wrapped.clamp_max(0).to(torch.int64).sum(-1).min()),
                  int(wrapped.clamp_min(0).to(torch.int64).sum(-1).max())), _WRAP_HINT))
    if odd:
        wt = ww[:, :-1].reshape(ww.shape[0], -1, 2)
        alts.append(((int(x_max * wt.clamp_max(0).sum(-1).min()), int(x_max * wt.clamp_min(0).sum(-1).max())),
                     "with an odd K the last weight still counts: it pairs with a zero"))
    return alts


def check_pair_sum_range(fn):
    """Check ``fn(w_cols, x_max) -> (lo, hi)``: the extreme ``vpmaddubsw`` pair sums.

    ``w_cols`` is int8 ``(O, K)`` in GEMM order, inputs are uint8 in
    ``[0, x_max]``; the answer must equal :func:`qatlab.integer.pair_sum_range`.
    """
    from ..integer import pair_sum_range

    require_callable(fn, "pair_sum_range")
    for name, w, x_max in _pair_cases():
        what = f"pair_sum_range on case '{name}' (w of shape {tuple(w.shape)}, x_max={x_max})"

        def on_error(e, w=w):
            if isinstance(e, RuntimeError) and w.shape[1] % 2:
                return (f"with an odd K (here {w.shape[1]}) the last weight pairs with a zero: "
                        f"pad w_cols with one zero column")
            return None

        got = as_sequence(call(fn, what, w.clone(), x_max, on_error=on_error), 2, what, names=("lo", "hi"))
        got = (as_int(got[0], f"{what}: lo"), as_int(got[1], f"{what}: hi"))
        want = pair_sum_range(w, x_max)
        if got == want:
            continue
        head = (f"case '{name}' (w = {w.tolist() if w.numel() <= 12 else tuple(w.shape)}, "
                f"x_max={x_max}): (lo, hi) = {got} but should be {want}")
        for alt, hint in _pair_alternatives(w, x_max):
            if got == alt:
                raise ExerciseError(f"{head}: {hint}")
        if max(abs(v) for v in got) <= 2 * 128 < max(abs(v) for v in want):
            raise ExerciseError(f"{head}: {_WRAP_HINT}")     # wrapped in some other order
        raise ExerciseError(head)
    return passed("pair_sum_range")
