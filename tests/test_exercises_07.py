"""The 07_qat_transformers exercise checks pass right answers and explain wrong ones."""

import pytest
import torch
from notebook_solutions import solution

from qatlab.exercises import ExerciseError, check_bits_per_weight, check_group_scales

EPS = torch.finfo(torch.float32).smallest_normal


def _scales(divisor=lambda qmin, qmax: (qmax - qmin) / 2, reduce=lambda g: g.abs().amax(-1), eps=EPS,
            keepdim=False):
    def group_scales(w, bits, group_size):
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        groups = w.reshape(w.shape[0], w.shape[1] // group_size, group_size)
        scale = reduce(groups) / divisor(qmin, qmax)
        scale = scale if eps is None else torch.clamp(scale, min=eps)
        return scale.unsqueeze(-1) if keepdim else scale
    return group_scales


def test_group_scales_right():
    assert check_group_scales(_scales()) is True


def test_group_scales_divided_by_qmax():
    with pytest.raises(ExerciseError, match=r"ratio 1.071.*divided amax by 7 = qmax.*amax / 7.5"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: qmax))


def test_group_scales_floored_divisor():
    # (qmax - qmin) // 2 = 7: the same numbers as dividing by qmax, and the hint names both
    with pytest.raises(ExerciseError, match=r"ratio 1.071.*\(qmax - qmin\) // 2, which floors 7.5 to 7"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: (qmax - qmin) // 2))


def test_group_scales_divided_by_two_to_the_bits_minus_one():
    with pytest.raises(ExerciseError, match=r"ratio 0.9375.*divided amax by 8 = 2\*\*\(bits - 1\)"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: 2 ** 3))


def test_group_scales_rounded_divisor():
    # round(7.5) = 8 (half to even): the same numbers as 2**(bits - 1), and the hint names both
    with pytest.raises(ExerciseError, match=r"ratio 0.9375.*rounded \(qmax - qmin\) / 2 = 7.5 to 8"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: round((qmax - qmin) / 2)))


def test_group_scales_divided_by_full_range():
    with pytest.raises(ExerciseError, match=r"ratio 0.5\b.*divided amax by qmax - qmin = 15"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: qmax - qmin))


def test_group_scales_divided_by_the_number_of_levels():
    with pytest.raises(ExerciseError, match=r"ratio 0.468.*number of levels, 2\*\*bits = 16"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: qmax - qmin + 1))


def test_group_scales_max_not_magnitude():
    with pytest.raises(ExerciseError, match="group's maximum, not its largest magnitude"):
        check_group_scales(_scales(reduce=lambda g: g.amax(-1).clamp(min=0)))


def test_group_scales_mean_magnitude():
    with pytest.raises(ExerciseError, match="mean magnitude"):
        check_group_scales(_scales(reduce=lambda g: g.abs().mean(-1)))


def test_group_scales_asymmetric_rule():
    def asym(w, bits, group_size):
        g = w.reshape(w.shape[0], -1, group_size)
        return torch.clamp((g.amax(-1) - g.amin(-1)) / (2 ** bits - 1), min=EPS)

    with pytest.raises(ExerciseError, match=r"asymmetric rule, \(max - min\) / \(qmax - qmin\)"):
        check_group_scales(asym)


def test_group_scales_without_eps_floor():
    with pytest.raises(ExerciseError, match=r"scale\[1, 1\] is 0.0.*smallest_normal"):
        check_group_scales(_scales(eps=None))


def test_group_scales_with_torch_observer_eps():
    with pytest.raises(ExerciseError, match=r"finfo\(torch.float32\).eps \(torch's observers' floor\)"):
        check_group_scales(_scales(eps=torch.finfo(torch.float32).eps))


def test_group_scales_keepdim():
    with pytest.raises(ExerciseError, match=r"returned shape \(4, 2, 1\), expected \(4, 2\).*extra dimension "
                                            r"of size 1.*keepdim=True.*The values are right"):
        check_group_scales(_scales(keepdim=True))


def test_group_scales_keepdim_and_a_wrong_divisor():
    with pytest.raises(ExerciseError, match=r"extra dimension of size 1.*ratio 1.071.*= qmax"):
        check_group_scales(_scales(keepdim=True, divisor=lambda qmin, qmax: qmax))


def test_group_scales_per_channel_squeezed():
    def squeezed(w, bits, group_size):
        return _scales()(w, bits, group_size).squeeze(-1)

    with pytest.raises(ExerciseError, match=r"shape \(3,\), expected \(3, 1\).*size-1 dimension is missing"):
        check_group_scales(squeezed)


def test_group_scales_strided_groups():
    def strided(w, bits, group_size):
        return torch.clamp(w.reshape(w.shape[0], group_size, -1).abs().amax(1) / ((2 ** bits - 1) / 2), min=EPS)

    with pytest.raises(ExerciseError, match=r"scale\[.*ratio.*groups are strided.*j, j \+ in // group_size"):
        check_group_scales(strided)


def test_group_scales_swapped_group_count_and_size():
    def swapped(w, bits, group_size):
        return torch.clamp(w.reshape(w.shape[0], group_size, -1).abs().amax(-1) / ((2 ** bits - 1) / 2), min=EPS)

    with pytest.raises(ExerciseError, match=r"returned shape \(4, 4\), expected \(4, 2\).*two sizes swapped"):
        check_group_scales(swapped)


def test_group_scales_row_scale_for_every_group():
    def per_row_expanded(w, bits, group_size):
        s = torch.clamp(w.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2), min=EPS)
        return s.expand(w.shape[0], w.shape[1] // group_size)

    with pytest.raises(ExerciseError, match="got the row's scale"):
        check_group_scales(per_row_expanded)


def test_group_scales_one_per_row():
    def per_row(w, bits, group_size):
        return torch.clamp(w.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2), min=EPS)

    with pytest.raises(ExerciseError, match=r"returned shape \(4, 1\).*one scale per row"):
        check_group_scales(per_row)


def test_group_scales_groups_along_the_wrong_dimension():
    def transposed(w, bits, group_size):
        return _scales()(w, bits, group_size).t()

    with pytest.raises(ExerciseError, match=r"shape \(2, 4\).*groups run along the input dimension"):
        check_group_scales(transposed)


def test_group_scales_not_a_tensor():
    with pytest.raises(ExerciseError, match="should return a torch.Tensor, got list"):
        check_group_scales(lambda w, bits, group_size: [1.0])


# ---------------------------------------------------------------------------
# bits per weight: one test per known wrong answer; every hint must be the right one
# ---------------------------------------------------------------------------

def _bpw(fn):
    return lambda bits, group_size, in_features, scale_bits=32: fn(
        bits, in_features if group_size is None else group_size, in_features, scale_bits)


def test_bits_per_weight_right():
    assert check_bits_per_weight(_bpw(lambda b, g, n, s: b + s / g)) is True


def test_bits_per_weight_integer_division():
    # 32 // 64 = 0 on the per-channel case: the answer equals "no scale" there, the hint must not say so
    with pytest.raises(ExerciseError, match=r"group_size=None.*returned 4, expected 4.5.*integer \(floor\) "
                                            r"division: 32 // 64 = 0"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + s // g))


def test_bits_per_weight_ignores_scale_bits():
    # 2 + 32 / 16 = 4 is also 2 + 16 / (64 // 16 groups): the hint must be about scale_bits
    with pytest.raises(ExerciseError, match=r"scale_bits=16\) returned 4, expected 3.*ignores scale_bits"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + 32 / g))


def test_bits_per_weight_forgets_the_scales():
    with pytest.raises(ExerciseError, match="returned 4, expected 5.*scales are missing"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b))


def test_bits_per_weight_counts_bytes():
    with pytest.raises(ExerciseError, match="returned 4.125, expected 5.*counted in bytes"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + s / 8 / g))


def test_bits_per_weight_divides_by_the_number_of_groups():
    with pytest.raises(ExerciseError, match=r"returned 20, expected 5.*number of groups per row \(2\)"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + s / (n // g)))


def test_bits_per_weight_one_scale_per_weight():
    with pytest.raises(ExerciseError, match="returned 36, expected 5.*one scale per weight"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + s))


def test_bits_per_weight_counts_a_zero_point():
    with pytest.raises(ExerciseError, match="returned 5.25, expected 5.*int8 zero-point.*no zero-point needs"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + (s + 8) / g))


def test_bits_per_weight_one_scale_per_row_with_groups():
    def per_row(bits, group_size, in_features, scale_bits=32):
        return bits + scale_bits / in_features

    with pytest.raises(ExerciseError, match="returned 4.5, expected 5.*one scale per row"):
        check_bits_per_weight(per_row)


def test_bits_per_weight_per_channel_costs_nothing():
    def free_per_channel(bits, group_size, in_features, scale_bits=32):
        return bits if group_size is None else bits + scale_bits / group_size

    with pytest.raises(ExerciseError, match="group_size=None.*returned 4, expected 4.5.*Per-channel"):
        check_bits_per_weight(free_per_channel)


def test_bits_per_weight_crashes_on_per_channel():
    with pytest.raises(ExerciseError, match="raised TypeError.*per-channel"):
        check_bits_per_weight(lambda bits, group_size, in_features, scale_bits=32: bits + scale_bits / group_size)


def test_bits_per_weight_unknown_mistake_gets_the_numbers_only():
    with pytest.raises(ExerciseError, match=r"returned 4.1, expected 5\.$"):
        check_bits_per_weight(lambda *a: 4.1)


def test_bits_per_weight_not_a_number():
    with pytest.raises(ExerciseError, match=r"\(bits per weight\) should be a number, got str"):
        check_bits_per_weight(lambda *a: "5")


@pytest.mark.parametrize("grade_id, name, check", [
    ("ex07_group_scales", "group_scales", check_group_scales),
    ("ex07_bits_per_weight", "bits_per_weight", check_bits_per_weight),
])
def test_notebook_solutions_pass(grade_id, name, check):
    assert check(solution("07_qat_transformers", grade_id)[name]) is True


def _right_scales(w, bits, group_size, floor=None):
    floor = torch.finfo(torch.float32).smallest_normal if floor is None else floor
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = w.reshape(w.shape[0], -1, group_size).abs().amax(-1)
    return torch.clamp(amax / ((qmax - qmin) / 2), min=floor)


def test_group_scales_other_styles_pass():
    def with_torchao_floor(w, bits, group_size):  # finfo(...).tiny is smallest_normal
        return _right_scales(w, bits, group_size, floor=torch.finfo(w.dtype).tiny)

    def in_float64(w, bits, group_size):
        return _right_scales(w.double(), bits, group_size)

    def by_loops(w, bits, group_size):
        out = torch.empty(w.shape[0], w.shape[1] // group_size)
        for r in range(w.shape[0]):
            for j in range(out.shape[1]):
                amax = float(w[r, j * group_size:(j + 1) * group_size].abs().max())
                out[r, j] = max(amax / ((2 ** bits - 1) / 2), torch.finfo(torch.float32).smallest_normal)
        return out

    for answer in (with_torchao_floor, in_float64, by_loops):
        assert check_group_scales(answer) is True, answer.__name__


def test_group_scales_wrong_answers_get_hints():
    def in_place(w, bits, group_size):
        w.abs_()
        return _right_scales(w, bits, group_size)

    with pytest.raises(ExerciseError, match=r"changed its input \(argument 1\) in place"):
        check_group_scales(in_place)
    with pytest.raises(ExerciseError, match=r"floored amax before dividing"):
        check_group_scales(lambda w, b, g: torch.clamp(
            w.reshape(w.shape[0], -1, g).abs().amax(-1), min=torch.finfo(torch.float32).smallest_normal)
            / ((2 ** b - 1) / 2))
    with pytest.raises(ExerciseError, match=r"not a round number such as 1e-12"):
        check_group_scales(lambda w, b, g: _right_scales(w, b, g, floor=1e-12))
    with pytest.raises(ExerciseError, match=r"returned dtype torch.int64; .*integer"):
        check_group_scales(lambda w, b, g: _right_scales(w, b, g).long())
    with pytest.raises(ExerciseError, match=r"should return a torch.Tensor, got ndarray \(torch.from_numpy"):
        check_group_scales(lambda w, b, g: _right_scales(w, b, g).numpy())
    with pytest.raises(ExerciseError, match=r"raised RuntimeError"):
        check_group_scales(lambda w, b, g: w.reshape(w.shape[0], g, g).abs().amax(-1))


def test_bits_per_weight_numeric_types_pass():
    from fractions import Fraction

    import numpy as np

    def ref(bits, group_size, in_features, scale_bits=32):
        return bits + scale_bits / (in_features if group_size is None else group_size)

    assert check_bits_per_weight(lambda *a: np.float32(ref(*a))) is True
    assert check_bits_per_weight(lambda *a: torch.tensor(ref(*a))) is True
    assert check_bits_per_weight(
        lambda b, g, n, s=32: b + Fraction(s, n if g is None else g)) is True


def test_bits_per_weight_crash_on_none_names_per_channel():
    with pytest.raises(ExerciseError, match=r"group_size=None.* raised TypeError.*group_size=None means per-channel"):
        check_bits_per_weight(lambda b, g, n, s=32: b + s / g)
