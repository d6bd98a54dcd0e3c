"""Checks for the exercises of 09_integer_kernels.

``check_requantize`` runs the learner's FBGEMM requantization on cases built
to expose the usual slips (ties at .5, an odd zero-point, a fused ReLU with a
non-zero zero-point, a bias that does not round to an integer, values past
255) and names the first element that differs and the likely cause.
``check_pair_sum_range`` does the same for the worst-case ``vpmaddubsw`` pair
sum (weights of both signs, an odd reduction length, rows vs columns).
"""

import torch

from ._common import ExerciseError, passed

_F32 = torch.float32


# ---------------------------------------------------------------------------
# exercise 1: FBGEMM's requantization step
# ---------------------------------------------------------------------------

def _requantize_cases():
    """(name, acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu)."""
    ties = torch.tensor([[1, 3, 5, -1, -3, 0, 7, 9]], dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    acc = torch.randint(-400, 400, (6, 4), generator=g, dtype=torch.int32)
    acc[0, 0] = 4000                                          # far past 255
    return [
        # M = 0.5 exactly and no bias: every odd accumulator lands on a tie x.5
        ("ties", ties, torch.zeros(8), 0.5, torch.ones(8), 1.0, 0, False),
        # the same ties with an odd zero-point: rounding must come before adding it
        ("odd zero-point", ties, torch.zeros(8), 0.5, torch.ones(8), 1.0, 3, False),
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
    ]


def _fbgemm_reference(acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu):
    from ..integer import requantize_fbgemm

    return requantize_fbgemm(acc, bias, input_scale=input_scale, weight_scale=weight_scale,
                             output_scale=output_scale, output_zero_point=output_zero_point,
                             relu=relu).to(torch.int64)


def _requantize_alternatives(acc, bias, s_x, s_w, s_y, zp, relu):
    """Typical wrong answers, each with the hint it deserves."""
    a = torch.tensor(s_x, dtype=_F32) * s_w.to(_F32)
    m = a / torch.tensor(s_y, dtype=_F32)
    lo = zp if relu else 0
    t = (acc.to(_F32) + bias / a) * m

    def clamp(v, low=lo):
        return v.clamp(low, 255)

    return [
        (clamp(torch.floor(t + 0.5) + zp),
         "floor(x + 0.5) rounds ties up; FBGEMM's nearbyint rounds half to even: use torch.round"),
        (clamp(torch.round(t + zp)),
         "the zero-point is added before rounding; FBGEMM rounds first, then adds z_y "
         "(they differ on ties when z_y is odd)"),
        (clamp(torch.round((acc.to(_F32) + torch.round(bias / a)) * m) + zp),
         "you rounded the bias to an integer first (Jacob et al.'s int32 bias); FBGEMM adds the "
         "float b / (s_x·s_w) to float(acc) and rounds once, at the end"),
        (clamp(torch.round(t) + zp, 0),
         "with a fused ReLU the output floor is the zero-point z_y (real 0), not the integer 0"),
        (torch.round(t) + zp,
         "the result is not clamped: saturate to [z_y if relu else 0, 255]"),
        (clamp(torch.trunc(t) + zp),
         "truncating (.to(int)) rounds toward zero; use torch.round (nearbyint)"),
        (clamp(torch.round((acc.to(_F32) * m + bias)) + zp),
         "the bias was added after scaling, in real units; FBGEMM adds b / (s_x·s_w) in "
         "accumulator units, before multiplying by M"),
        (clamp(torch.round(acc.to(_F32) * m) + zp),
         "the bias is missing: add b / (s_x·s_w) to float(acc) before multiplying by M"),
    ]


def check_requantize(fn):
    """Check ``fn(acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu)``.

    ``acc`` is an int32 ``(N, C)`` accumulator, ``bias`` a float ``(C,)``,
    ``weight_scale`` a float ``(C,)`` tensor; the answer must equal FBGEMM's
    requantization (:func:`qatlab.integer.requantize_fbgemm`, itself checked
    bit for bit against torch's x86 kernels) as uint8 values.
    """
    for name, acc, bias, s_x, s_w, s_y, zp, relu in _requantize_cases():
        got = fn(acc.clone(), bias.clone(), s_x, s_w.clone(), s_y, zp, relu)
        if not isinstance(got, torch.Tensor):
            raise ExerciseError(f"your function returned {type(got).__name__}; return a tensor of "
                                "uint8 values")
        got = got.detach()
        want = _fbgemm_reference(acc, bias, s_x, s_w, s_y, zp, relu)
        if got.shape != want.shape:
            raise ExerciseError(f"case '{name}': shape {tuple(got.shape)}, expected "
                                f"{tuple(want.shape)} (one output per accumulator)")
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
        for alt, hint in _requantize_alternatives(acc, bias, s_x, s_w, s_y, zp, relu):
            if torch.equal(got, alt.to(torch.int64)):
                raise ExerciseError(f"{head}: {hint}")
        raise ExerciseError(head)
    return passed("requantize")


# ---------------------------------------------------------------------------
# exercise 2: can a layer saturate vpmaddubsw?
# ---------------------------------------------------------------------------

def _pair_cases():
    g = torch.Generator().manual_seed(4)
    return [
        # weights of opposite signs in a pair: |w0| + |w1| is not reachable with x >= 0
        ("opposite signs", torch.tensor([[127, -128, 100, 100]], dtype=torch.int8), 255),
        # the same weights read as rows vs columns give different pairs
        ("pairs along k", torch.tensor([[120, 0, 5, 5], [120, 0, 5, 5]], dtype=torch.int8), 255),
        # odd K: the last weight pairs with a zero
        ("odd K", torch.tensor([[3, 4, 127], [-2, 1, -128]], dtype=torch.int8), 127),
        ("random layer", torch.randint(-128, 128, (16, 27), generator=g, dtype=torch.int8), 255),
    ]


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

    for name, w, x_max in _pair_cases():
        try:
            got = fn(w.clone(), x_max)
        except RuntimeError as e:
            if w.shape[1] % 2:
                raise ExerciseError(f"case '{name}': your function failed on K={w.shape[1]} ({e}); "
                                    "with an odd K the last weight pairs with a zero (pad it)") from e
            raise
        if not (isinstance(got, tuple | list) and len(got) == 2):
            raise ExerciseError(f"case '{name}': return a pair (lo, hi), got {got!r}")
        got = (int(got[0]), int(got[1]))
        want = pair_sum_range(w, x_max)
        if got == want:
            continue
        head = (f"case '{name}' (w = {w.tolist() if w.numel() <= 12 else tuple(w.shape)}, "
                f"x_max={x_max}): (lo, hi) = {got} but should be {want}")
        for alt, hint in _pair_alternatives(w, x_max):
            if got == alt:
                raise ExerciseError(f"{head}: {hint}")
        raise ExerciseError(head)
    return passed("pair_sum_range")
