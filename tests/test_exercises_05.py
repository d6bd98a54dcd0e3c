"""Exercise 05: the expected int8 size, with a right answer and typical wrong ones."""

import pytest
from torch import nn

from qatlab.exercises import ExerciseError, check_expected_int8_bytes


def convs_and_linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def right(model):
    return sum(m.weight.numel() + 8 * m.weight.shape[0] for m in convs_and_linears(model))


def test_right_answer_passes():
    assert check_expected_int8_bytes(right) is True


def test_fp32_size_is_caught():
    with pytest.raises(ExerciseError, match="fp32 size: int8 weights take 1 byte"):
        check_expected_int8_bytes(lambda m: 4 * sum(p.numel() for p in m.parameters()))


def test_counting_batchnorm_is_caught():
    def with_bn(model):
        bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                 for p in m.parameters())
        return right(model) + 4 * bn

    with pytest.raises(ExerciseError, match=r"SmallCNN\(\).*off by \+896.*224 BatchNorm"):
        check_expected_int8_bytes(with_bn)


def test_forgetting_bias_and_scale_is_caught():
    with pytest.raises(ExerciseError, match="left out the 122 output channels"):
        check_expected_int8_bytes(lambda m: sum(x.weight.numel() for x in convs_and_linears(m)))


def test_only_bias_is_caught():
    def only_bias(model):
        return sum(m.weight.numel() + 4 * m.weight.shape[0] for m in convs_and_linears(model))

    with pytest.raises(ExerciseError, match="counted only one of them"):
        check_expected_int8_bytes(only_bias)


def test_hard_coded_answer_fails_on_second_model():
    with pytest.raises(ExerciseError, match="Sequential"):
        check_expected_int8_bytes(lambda m: 34400)
