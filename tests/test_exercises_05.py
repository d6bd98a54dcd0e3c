"""Exercise 05: derive the int8/fp32 byte ratio of a layer and decide when it is near 1/4."""

import pytest
from notebook_solutions import solution

from qatlab.exercises import ExerciseError, check_int8_size_ratio


def right(k):
    return (k + 12) / (4 * k + 4)


def test_right_answer_passes():
    assert check_int8_size_ratio(right, 109) is True


@pytest.mark.parametrize("wrong, hint", [
    (lambda k: 0.25, "ratio of the weights alone"),
    (lambda k: (k + 8) / (4 * k + 4), "three 4-byte numbers per output channel"),
    (lambda k: (k + 4) / (4 * k + 4), "kept only the int32 bias"),
    (lambda k: (k + 12) / (4 * k), "denominator is 4k \\+ 4"),
    (lambda k: (k + 9) / (4 * k + 4), "bias stays 32-bit"),
    (lambda k: (4 * k + 4) / (k + 12), "fp32 over int8"),
    (lambda k: k / (4 * k + 12), "count the bytes per output channel"),
])
def test_wrong_formulas_get_specific_hints(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_int8_size_ratio(wrong, 109)


def test_wrong_decisions_are_caught():
    with pytest.raises(ExerciseError, match=r"at k=100 the ratio is 0.2772 > 0.275"):
        check_int8_size_ratio(right, 100)
    with pytest.raises(ExerciseError, match=r"k=200 qualifies.*smaller k does too"):
        check_int8_size_ratio(right, 200)
    with pytest.raises(ExerciseError, match=r"108.04 is not a whole number.*round up"):
        check_int8_size_ratio(right, 108.04)
    with pytest.raises(ExerciseError, match=r"at k=108 the ratio is 0.2752 > 0.275"):
        check_int8_size_ratio(right, 108)  # the bound 108.04 rounded down
    with pytest.raises(ExerciseError, match=r"k_within_10pct is not set yet"):
        check_int8_size_ratio(right, None)


def test_right_answers_of_other_numeric_types_pass():
    from fractions import Fraction

    import numpy as np
    import torch

    for k in (109.0, np.int64(109), torch.tensor(109), np.float32(109)):
        assert check_int8_size_ratio(right, k) is True
    assert check_int8_size_ratio(lambda k: Fraction(k + 12, 4 * k + 4), 109) is True
    assert check_int8_size_ratio(lambda k: np.float32((k + 12) / (4 * k + 4)), 109) is True
    assert check_int8_size_ratio(lambda k: torch.tensor((k + 12) / (4 * k + 4)), 109) is True


def test_notebook_solution_passes():
    ns = solution("05_deployment", "ex05_int8_size_ratio")
    assert check_int8_size_ratio(ns["int8_over_fp32"], ns["k_within_10pct"]) is True


def test_crash_gets_a_hint():
    with pytest.raises(ExerciseError, match=r"int8_over_fp32\(1\) raised ZeroDivisionError"):
        check_int8_size_ratio(lambda k: (k + 12) / (4 * k - 4), 109)


def test_not_a_number_or_not_a_function():
    with pytest.raises(ExerciseError, match=r"int8_over_fp32\(1\) \(a ratio of bytes\) should be a number, got str"):
        check_int8_size_ratio(lambda k: "a quarter", 109)
    with pytest.raises(ExerciseError, match="pass your function itself, int8_over_fp32"):
        check_int8_size_ratio(0.25, 109)
