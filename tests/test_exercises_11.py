"""Notebook 11's exercise checks accept the right answer and reject each usual mistake with its hint."""

import pytest
import torch

from qatlab.exercises._common import ExerciseError
from qatlab.exercises.ex11 import check_rectified_sigmoid, check_rounding_regularizer


def right_h(v, zeta=1.1, gamma=-0.1):
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def right_reg(h, beta):
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def test_right_answers_pass():
    assert check_rectified_sigmoid(right_h)
    assert check_rounding_regularizer(right_reg)


@pytest.mark.parametrize("wrong,hint", [
    (lambda v: torch.sigmoid(v), "plain sigmoid"),
    (lambda v: torch.sigmoid(v) * 1.2 - 0.1, "not clipped"),
    (lambda v: torch.clamp(torch.sigmoid(v) * (-1.2) + 1.1, 0, 1), "swapped"),
    (lambda v: torch.clamp(torch.sigmoid(v) * 1.1 - 0.1, 0, 1), "1.2"),
    (lambda v: (v >= 0).float(), "rounds h to 0 or 1"),
    (lambda v: v, "compute clamp"),
])
def test_rectified_sigmoid_mistakes(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_rectified_sigmoid(wrong)


@pytest.mark.parametrize("wrong,hint", [
    (lambda h, b: (2 * h - 1).abs().pow(b).sum(), "push h to 1/2"),
    (lambda h, b: (1 - (2 * h - 1).abs().pow(b)).mean(), "mean"),
    (lambda h, b: (1 - (h - 0.5).abs().pow(b)).sum(), r"\|2h - 1\|"),
    (lambda h, b: (1 - (2 * h - 1).abs() ** (1 / b)).sum(), "exponent"),
    (lambda h, b: h.sum(), "compute"),
])
def test_rounding_regularizer_mistakes(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_rounding_regularizer(wrong)


def test_slips():
    with pytest.raises(ExerciseError, match="pass your function"):
        check_rectified_sigmoid(0.5)
    with pytest.raises(ExerciseError, match="returned None"):
        check_rounding_regularizer(lambda h, b: None)
    with pytest.raises(ExerciseError, match="torch.Tensor"):
        check_rectified_sigmoid(lambda v: v.tolist())
