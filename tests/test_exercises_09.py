"""The 09_integer_kernels exercise checks pass right answers and explain the typical wrong ones."""

import pytest
import torch

from qatlab.exercises import ExerciseError, check_pair_sum_range, check_requantize

F32 = torch.float32


def requantize_with(round_fn=torch.round, zp_before=False, int_bias=False, relu_floor_zero=False,
                    clamp=True, with_bias=True, bias_after_scale=False):
    """An FBGEMM-style requantization with one switchable slip."""
    def fn(acc, bias, s_x, s_w, s_y, zp, relu):
        a = torch.tensor(s_x, dtype=F32) * s_w.to(F32)
        m = a / torch.tensor(s_y, dtype=F32)
        b = torch.round(bias / a) if int_bias else bias / a
        if not with_bias:
            t = acc.to(F32) * m
        elif bias_after_scale:
            t = acc.to(F32) * m + bias
        else:
            t = (acc.to(F32) + b) * m
        y = round_fn(t + zp) if zp_before else round_fn(t) + zp
        if clamp:
            y = y.clamp(0 if (relu_floor_zero or not relu) else zp, 255)
        return y.to(torch.int64)
    return fn


def test_requantize_right_answer_passes():
    assert check_requantize(requantize_with()) is True


def test_requantize_uint8_output_passes():
    right = requantize_with()
    assert check_requantize(lambda *a: right(*a).to(torch.uint8)) is True


@pytest.mark.parametrize("slip, pattern", [
    (dict(round_fn=lambda t: torch.floor(t + 0.5)), r"case 'ties'.*floor\(x \+ 0.5\) rounds ties up"),
    (dict(zp_before=True), r"case 'odd zero-point'.*zero-point is added before rounding"),
    (dict(int_bias=True), r"case 'float bias'.*rounded the bias to an integer first"),
    (dict(relu_floor_zero=True), r"case 'relu'.*floor is the zero-point"),
    (dict(clamp=False), r"not clamped"),
    (dict(round_fn=torch.trunc), r"truncating"),
    (dict(with_bias=False), r"the bias is missing"),
    (dict(bias_after_scale=True), r"case 'bias units'.*added after scaling"),
])
def test_requantize_typical_slips_get_their_hint(slip, pattern):
    with pytest.raises(ExerciseError, match=pattern):
        check_requantize(requantize_with(**slip))


def test_requantize_fractional_output_is_caught():
    right = requantize_with()
    with pytest.raises(ExerciseError, match="has fractions"):
        check_requantize(lambda *a: right(*a).to(F32) + 0.25)


def test_requantize_wrong_type_is_caught():
    with pytest.raises(ExerciseError, match="return a tensor"):
        check_requantize(lambda *a: [1, 2])


def pair_range(sign_aware=True, pair_rows=False, drop_odd=False, symmetric=None):
    def fn(w, x_max):
        w = w.to(torch.int64)
        if pair_rows:
            w = w.T
        if w.shape[1] % 2:
            w = w[:, :-1] if drop_odd else torch.nn.functional.pad(w, (0, 1))
        p = w.reshape(w.shape[0], -1, 2)
        if not sign_aware:
            hi = int(x_max * p.abs().sum(-1).max())
            return -hi, hi
        lo = int(x_max * p.clamp_max(0).sum(-1).min())
        hi = int(x_max * p.clamp_min(0).sum(-1).max())
        if symmetric == "from_lo":
            return lo, -lo
        if symmetric == "from_hi":
            return -hi, hi
        return lo, hi
    return fn


def test_pair_sum_range_right_answer_passes():
    assert check_pair_sum_range(pair_range()) is True


@pytest.mark.parametrize("slip, pattern", [
    (dict(sign_aware=False), r"inputs are >= 0"),
    (dict(pair_rows=True), r"paired output channels|paired across rows"),
    (dict(drop_odd=True), r"case 'odd K'.*last weight still counts"),
    (dict(symmetric="from_hi"), r"lo is not −hi"),
    (dict(symmetric="from_lo"), r"hi is not −lo"),
])
def test_pair_sum_range_typical_slips_get_their_hint(slip, pattern):
    with pytest.raises(ExerciseError, match=pattern):
        check_pair_sum_range(pair_range(**slip))


def test_pair_sum_range_crash_on_odd_k_gets_a_hint():
    def reshape_only(w, x_max):
        p = w.to(torch.int64).reshape(w.shape[0], -1, 2)
        return int(x_max * p.clamp_max(0).sum(-1).min()), int(x_max * p.clamp_min(0).sum(-1).max())

    with pytest.raises(ExerciseError, match="odd K.*pairs with a zero"):
        check_pair_sum_range(reshape_only)


def test_pair_sum_range_hard_coded_answer_fails():
    with pytest.raises(ExerciseError, match="should be"):
        check_pair_sum_range(lambda w, x_max: (-32640, 64770))
