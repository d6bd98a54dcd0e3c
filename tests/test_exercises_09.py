"""The 09_integer_kernels exercise checks pass right answers and explain the typical wrong ones."""

import pytest
import torch
from notebook_solutions import solution

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
    (dict(clamp=False), r"case 'ties'.*: the result is not clamped"),
    (dict(round_fn=torch.trunc), r"truncating"),
    (dict(with_bias=False), r"the bias is missing"),
    (dict(bias_after_scale=True), r"case 'bias units'.*added after scaling"),
])
def test_requantize_typical_slips_get_their_hint(slip, pattern):
    with pytest.raises(ExerciseError, match=pattern):
        check_requantize(requantize_with(**slip))


def test_requantize_with_python_scalars_passes():
    def fn(acc, bias, s_x, s_w, s_y, zp, relu):          # scales as Python floats, like the kernel's float32
        a = s_x * s_w
        y = torch.round((acc.to(F32) + bias / a) * (a / s_y)) + zp
        return y.clamp(zp if relu else 0, 255).to(torch.uint8)

    assert check_requantize(fn) is True


def order_slip(kind):
    """FBGEMM's requantization rewritten in an algebraically equal order that rounds differently."""
    def fn(acc, bias, s_x, s_w, s_y, zp, relu):
        a = s_x * s_w
        m = a / s_y
        if kind == "m_swapped_f32":
            t = (acc.to(F32) + bias / a) * (s_w * (torch.tensor(s_x, dtype=F32) / torch.tensor(s_y, dtype=F32)))
        elif kind == "m_swapped_python":
            t = (acc.to(F32) + bias / a) * (s_w * (s_x / s_y))
        elif kind == "bias_over_sy":
            t = acc.to(F32) * m + bias / s_y
        elif kind == "distributed":
            t = acc.to(F32) * m + (bias / a) * m
        else:                                            # float64 throughout
            a64 = s_x * s_w.double()
            t = (acc.double() + bias.double() / a64) * (a64 / s_y)
        return (torch.round(t) + zp).clamp(zp if relu else 0, 255).to(torch.uint8)
    return fn


@pytest.mark.parametrize("kind, pattern", [
    ("m_swapped_f32", r"case 'order of operations'.*M = s_w·\(s_x/s_y\)"),
    ("m_swapped_python", r"case 'order of operations'.*M = s_w·\(s_x/s_y\)"),
    ("bias_over_sy", r"case 'order of operations'.*as b / s_y"),
    ("distributed", r"case 'order of operations'.*distributed M"),
    ("float64", r"case 'order of operations'.*computed in float64"),
])
def test_requantize_order_of_operations_is_rejected_with_its_hint(kind, pattern):
    with pytest.raises(ExerciseError, match=pattern):
        check_requantize(order_slip(kind))


def test_requantize_order_case_separates_each_rewrite():
    """Each rewrite differs from FBGEMM in its own column of the 'order of operations' case."""
    from qatlab.exercises.ex09 import _fbgemm_reference, _requantize_cases

    case = next(c for c in _requantize_cases() if c[0] == "order of operations")
    want = _fbgemm_reference(*case[1:])
    columns = {"float64": 0, "bias_over_sy": 1, "distributed": 2, "m_swapped_f32": 3, "m_swapped_python": 3}
    for kind, column in columns.items():
        args = [c.clone() if isinstance(c, torch.Tensor) else c for c in case[1:]]
        differs = (order_slip(kind)(*args).to(torch.int64) != want).reshape(-1)
        assert differs.tolist() == [i == column for i in range(4)], kind


def test_requantize_int8_clamp_gets_its_hint():
    def fn(acc, bias, s_x, s_w, s_y, zp, relu):
        a = torch.tensor(s_x, dtype=F32) * s_w
        y = torch.round((acc.to(F32) + bias / a) * (a / torch.tensor(s_y, dtype=F32))) + zp
        return y.clamp(-128, 127)

    with pytest.raises(ExerciseError, match=r"case 'ties'.*: you clamped to int8's \[-128, 127\].*uint8"):
        check_requantize(fn)


def test_requantize_int8_dtype_gets_its_hint():
    right = requantize_with()
    with pytest.raises(ExerciseError, match=r"you returned int8"):
        check_requantize(lambda *a: right(*a).clamp(0, 255).to(torch.int8))


def test_requantize_wrapping_uint8_cast_gets_its_hint():
    def fn(acc, bias, s_x, s_w, s_y, zp, relu):
        a = torch.tensor(s_x, dtype=F32) * s_w
        y = torch.round((acc.to(F32) + bias / a) * (a / torch.tensor(s_y, dtype=F32))) + zp
        return y.to(torch.int64).to(torch.uint8)          # no clamp: 4000 wraps to 160

    with pytest.raises(ExerciseError, match=r"case 'ties'.*: casting to uint8 wraps around instead of saturating"):
        check_requantize(fn)


def test_requantize_fractional_output_is_caught():
    right = requantize_with()
    with pytest.raises(ExerciseError, match="has fractions"):
        check_requantize(lambda *a: right(*a).to(F32) + 0.25)


def test_requantize_wrong_type_is_caught():
    with pytest.raises(ExerciseError, match="should return a torch.Tensor, got list"):
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


def test_pair_sum_range_without_widening_gets_the_wrap_hint():
    def fn(w, x_max):                                     # int8 · int: every product wraps in int8
        w = torch.nn.functional.pad(w, (0, w.shape[1] % 2))
        p = (x_max * w).reshape(w.shape[0], -1, 2)
        return int(p.clamp_max(0).sum(-1).min()), int(p.clamp_min(0).sum(-1).max())

    with pytest.raises(ExerciseError, match=r"case 'opposite signs'.*wrapped around.*w_cols.to\(torch.int64\)"):
        check_pair_sum_range(fn)


def test_pair_sum_range_wrapping_in_another_order_gets_the_wrap_hint():
    def fn(w, x_max):                                     # wraps, then sums the two largest
        prods = (w * x_max).to(torch.int64)
        return int(prods.min()) * 2, int(prods.max()) * 2

    with pytest.raises(ExerciseError, match=r"wrapped around"):
        check_pair_sum_range(fn)


def test_pair_sum_range_both_inputs_at_x_max_gets_its_hint():
    def fn(w, x_max):
        w = torch.nn.functional.pad(w.to(torch.int64), (0, w.shape[1] % 2))
        s = w.reshape(w.shape[0], -1, 2).sum(-1)
        return int(x_max * s.min()), int(x_max * s.max())

    with pytest.raises(ExerciseError, match=r"case 'opposite signs'.*vary independently"):
        check_pair_sum_range(fn)


def test_pair_sum_range_crash_on_odd_k_gets_a_hint():
    def reshape_only(w, x_max):
        p = w.to(torch.int64).reshape(w.shape[0], -1, 2)
        return int(x_max * p.clamp_max(0).sum(-1).min()), int(x_max * p.clamp_min(0).sum(-1).max())

    with pytest.raises(ExerciseError, match="odd K.*pairs with a zero"):
        check_pair_sum_range(reshape_only)


def test_pair_sum_range_hard_coded_answer_fails():
    with pytest.raises(ExerciseError, match="should be"):
        check_pair_sum_range(lambda w, x_max: (-32640, 64770))


@pytest.mark.parametrize("grade_id, name, check", [
    ("ex09_requantize", "requantize", check_requantize),
    ("ex09_pair_sum_range", "pair_sum_range", check_pair_sum_range),
])
def test_notebook_solutions_pass(grade_id, name, check):
    assert check(solution("09_integer_kernels", grade_id)[name]) is True


def _pairs(w_cols):
    w = torch.nn.functional.pad(w_cols.to(torch.int64), (0, w_cols.shape[1] % 2))
    return w.reshape(w.shape[0], -1, 2)


def test_pair_sum_range_other_types_pass():
    import numpy as np

    def as_tensor(w_cols, x_max):
        p = _pairs(w_cols)
        return torch.stack([x_max * p.clamp_max(0).sum(-1).min(), x_max * p.clamp_min(0).sum(-1).max()])

    def as_numpy(w_cols, x_max):
        p = _pairs(w_cols).numpy()
        return np.int64(x_max * np.minimum(p, 0).sum(-1).min()), np.int64(x_max * np.maximum(p, 0).sum(-1).max())

    assert check_pair_sum_range(as_tensor) is True
    assert check_pair_sum_range(as_numpy) is True


def unpadded(w_cols, x_max):  # right for an even K only
    p = w_cols.to(torch.int64).reshape(w_cols.shape[0], -1, 2)
    return int(x_max * p.clamp_max(0).sum(-1).min()), int(x_max * p.clamp_min(0).sum(-1).max())


def test_pair_sum_range_slips_the_first_cases_let_through():
    def pad_in_front(w_cols, x_max):  # odd K: the zero goes before the first weight
        w = torch.nn.functional.pad(w_cols.to(torch.int64), (w_cols.shape[1] % 2, 0))
        p = w.reshape(w.shape[0], -1, 2)
        return int(x_max * p.clamp_max(0).sum(-1).min()), int(x_max * p.clamp_min(0).sum(-1).max())

    with pytest.raises(ExerciseError, match=r"should be"):
        check_pair_sum_range(pad_in_front)
    with pytest.raises(ExerciseError, match=r"raised RuntimeError.*odd K .* pad w_cols with one zero column"):
        check_pair_sum_range(unpadded)
    with pytest.raises(ExerciseError, match=r"lo should be a whole number"):
        check_pair_sum_range(lambda w, x: (0.5, 1))


def requantize_right(acc, bias, input_scale, weight_scale, output_scale, output_zero_point, relu):
    a = torch.tensor(input_scale, dtype=torch.float32) * weight_scale.to(torch.float32)
    m = a / torch.tensor(output_scale, dtype=torch.float32)
    y = torch.round((acc.to(torch.float32) + bias / a) * m) + output_zero_point
    return y.clamp(output_zero_point if relu else 0, 255).to(torch.uint8)


def test_requantize_slips_get_hints():
    def wrong_axis(acc, bias, input_scale, weight_scale, *rest):  # one scale per row of acc
        return requantize_right(acc, bias, input_scale, weight_scale[:, None], *rest)

    with pytest.raises(ExerciseError, match=r"shape \(9, 9\), expected \(1, 9\).*made a column .*LAST dimension"):
        check_requantize(wrong_axis)

    def in_place(acc, bias, *rest):
        bias /= 1.0
        acc.clamp_(-300, 300)
        return requantize_right(acc, bias, *rest)

    with pytest.raises(ExerciseError, match=r"changed its input \(argument 1\) in place"):
        check_requantize(in_place)

    def per_tensor(acc, bias, input_scale, weight_scale, *rest):  # the first channel's scale for all
        return requantize_right(acc, bias, input_scale, weight_scale[:1].expand_as(weight_scale), *rest)

    with pytest.raises(ExerciseError, match=r"case 'per-channel'"):
        check_requantize(per_tensor)
    with pytest.raises(ExerciseError, match=r"pass your function itself, requantize"):
        check_requantize(None)
