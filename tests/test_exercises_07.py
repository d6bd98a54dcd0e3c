"""The 07_qat_transformers exercise checks pass right answers and explain wrong ones."""

import pytest
import torch

from qatlab.exercises import ExerciseError, check_bits_per_weight, check_group_scales

EPS = torch.finfo(torch.float32).smallest_normal


def _scales(divisor=lambda qmin, qmax: (qmax - qmin) / 2, reduce=lambda g: g.abs().amax(-1), eps=EPS):
    def group_scales(w, bits, group_size):
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        groups = w.reshape(w.shape[0], w.shape[1] // group_size, group_size)
        scale = reduce(groups) / divisor(qmin, qmax)
        return scale if eps is None else torch.clamp(scale, min=eps)
    return group_scales


def test_group_scales_right():
    assert check_group_scales(_scales()) is True


def test_group_scales_divided_by_qmax():
    with pytest.raises(ExerciseError, match=r"ratio 1.071.*divided amax by qmax = 7.*amax / 7.5"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: qmax))


def test_group_scales_divided_by_full_range():
    with pytest.raises(ExerciseError, match=r"ratio 0.5\b.*divided amax by qmax - qmin = 15"):
        check_group_scales(_scales(divisor=lambda qmin, qmax: qmax - qmin))


def test_group_scales_max_not_magnitude():
    with pytest.raises(ExerciseError, match="group's maximum, not its largest magnitude"):
        check_group_scales(_scales(reduce=lambda g: g.amax(-1).clamp(min=0)))


def test_group_scales_without_eps_floor():
    with pytest.raises(ExerciseError, match=r"scale\[1, 1\] is 0.0.*smallest_normal"):
        check_group_scales(_scales(eps=None))


def test_group_scales_with_torch_observer_eps():
    with pytest.raises(ExerciseError, match=r"finfo\(torch.float32\).eps \(torch's observers' floor\)"):
        check_group_scales(_scales(eps=torch.finfo(torch.float32).eps))


def test_group_scales_one_per_row():
    def per_row(w, bits, group_size):
        return torch.clamp(w.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2), min=EPS)

    with pytest.raises(ExerciseError, match=r"returned shape \(4, 1\).*one scale per row"):
        check_group_scales(per_row)


def test_group_scales_groups_along_the_wrong_dimension():
    def wrong_axis(w, bits, group_size):
        t = w.t()  # groups of consecutive rows (output channels) instead of columns
        return _scales()(t.reshape(t.shape[0], -1).contiguous(), bits, group_size).t() \
            if t.shape[1] % group_size == 0 else torch.ones(1)

    with pytest.raises(ExerciseError, match="groups run along the input dimension"):
        check_group_scales(wrong_axis)


def test_group_scales_not_a_tensor():
    with pytest.raises(ExerciseError, match="should return a torch.Tensor, got list"):
        check_group_scales(lambda w, bits, group_size: [1.0])


def _bpw(fn):
    return lambda bits, group_size, in_features, scale_bits=32: fn(
        bits, in_features if group_size is None else group_size, in_features, scale_bits)


def test_bits_per_weight_right():
    assert check_bits_per_weight(_bpw(lambda b, g, n, s: b + s / g)) is True


def test_bits_per_weight_forgets_the_scales():
    with pytest.raises(ExerciseError, match="returned 4, expected 5.*scales are missing"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b))


def test_bits_per_weight_counts_bytes():
    with pytest.raises(ExerciseError, match="returned 4.125, expected 5.*counted in bytes"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + s / 8 / g))


def test_bits_per_weight_divides_by_the_number_of_groups():
    with pytest.raises(ExerciseError, match="returned 20, expected 5.*number of groups per row"):
        check_bits_per_weight(_bpw(lambda b, g, n, s: b + s / (n // g)))


def test_bits_per_weight_per_channel_costs_nothing():
    def free_per_channel(bits, group_size, in_features, scale_bits=32):
        return bits if group_size is None else bits + scale_bits / group_size

    with pytest.raises(ExerciseError, match="group_size=None.*returned 4, expected 4.5.*Per-channel"):
        check_bits_per_weight(free_per_channel)


def test_bits_per_weight_crashes_on_per_channel():
    with pytest.raises(ExerciseError, match="raised TypeError.*per-channel"):
        check_bits_per_weight(lambda bits, group_size, in_features, scale_bits=32: bits + scale_bits / group_size)


def test_bits_per_weight_not_a_number():
    with pytest.raises(ExerciseError, match="should return a number, got str"):
        check_bits_per_weight(lambda *a: "5")
