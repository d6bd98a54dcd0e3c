"""Exercise 05: derive the int8/fp32 byte ratio of a layer and decide when it is near 1/4."""

import pytest

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
    with pytest.raises(ExerciseError, match="must be an int"):
        check_int8_size_ratio(right, 109.0)


def test_not_a_number_or_not_a_function():
    with pytest.raises(ExerciseError, match="return a number"):
        check_int8_size_ratio(lambda k: "a quarter", 109)
    with pytest.raises(ExerciseError, match="pass the function itself"):
        check_int8_size_ratio(0.25, 109)
