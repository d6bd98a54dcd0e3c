"""The 12_qat_language_model exercise check passes the right answer and names each usual mistake."""

import math

import pytest
import torch
import torch.nn.functional as F

from qatlab.exercises import ExerciseError
from qatlab.exercises.ex12 import check_bits_per_byte


def _ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_right_answer():
    assert check_bits_per_byte(lambda lg, ids: _ce(lg[:, :-1], ids[:, 1:]) / math.log(2)) is True


def test_right_answer_as_float_with_log2_softmax():
    def bpb(lg, ids):
        logp = torch.log2(torch.softmax(lg[:, :-1].double(), -1))
        return float(-logp.gather(-1, ids[:, 1:, None]).mean())

    assert check_bits_per_byte(bpb) is True


def test_nats():
    with pytest.raises(ExerciseError, match=r"in nats.*divide by ln 2"):
        check_bits_per_byte(lambda lg, ids: _ce(lg[:, :-1], ids[:, 1:]))


def test_log10():
    with pytest.raises(ExerciseError, match="base-10"):
        check_bits_per_byte(lambda lg, ids: _ce(lg[:, :-1], ids[:, 1:]) / math.log(10))


def test_no_shift():
    with pytest.raises(ExerciseError, match=r"No shift.*ids\[:, t \+ 1\]"):
        check_bits_per_byte(lambda lg, ids: _ce(lg, ids) / math.log(2))


def test_shift_the_wrong_way():
    with pytest.raises(ExerciseError, match="Shifted the wrong way"):
        check_bits_per_byte(lambda lg, ids: _ce(lg[:, 1:], ids[:, :-1]) / math.log(2))


def test_sum_not_mean():
    with pytest.raises(ExerciseError, match=r"sum over all 16 predicted bytes"):
        check_bits_per_byte(lambda lg, ids: F.cross_entropy(lg[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1),
                                                            reduction="sum") / math.log(2))


def test_perplexity_base2():
    with pytest.raises(ExerciseError, match=r"perplexity per byte, 2 \*\* bpb"):
        check_bits_per_byte(lambda lg, ids: 2 ** (_ce(lg[:, :-1], ids[:, 1:]) / math.log(2)))


def test_perplexity_exp():
    # exp(nats) is the same number as 2 ** bits: the first matching hint (2 ** bpb) names it
    with pytest.raises(ExerciseError, match="perplexity per byte"):
        check_bits_per_byte(lambda lg, ids: torch.exp(_ce(lg[:, :-1], ids[:, 1:])))


def test_raw_logits():
    with pytest.raises(ExerciseError, match="raw logit.*log_softmax"):
        check_bits_per_byte(lambda lg, ids: -lg[:, :-1].gather(-1, ids[:, 1:, None]).mean() / math.log(2))


def test_entropy():
    def entropy(lg, ids):
        logp = F.log_softmax(lg[:, :-1], -1)
        return -(logp.exp() * logp).sum(-1).mean() / math.log(2)

    with pytest.raises(ExerciseError, match="entropy of the model's predictions"):
        check_bits_per_byte(entropy)


def test_per_position_tensor():
    with pytest.raises(ExerciseError, match=r"has shape \(2, 8\).*return one number"):
        check_bits_per_byte(lambda lg, ids: F.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:],
                                                            reduction="none") / math.log(2))


def test_unknown_mistake_gets_numbers_only():
    with pytest.raises(ExerciseError, match=r"returned 1.0000 bits per byte, expected \d+\.\d{4}\.$"):
        check_bits_per_byte(lambda lg, ids: 1.0)


def test_not_a_number():
    with pytest.raises(ExerciseError, match="should return a number, got str"):
        check_bits_per_byte(lambda lg, ids: "3")


def test_not_callable():
    with pytest.raises(ExerciseError, match="pass the function itself"):
        check_bits_per_byte(3.0)
