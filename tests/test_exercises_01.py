"""The checks of notebook 01 pass right answers and name the mistake in wrong ones."""

import pytest
import torch
from notebook_solutions import solution

from qatlab.exercises import ExerciseError, check_choose_qparams, check_quantize, check_ste_grad

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- quantize ---------------------------------------------------------------

def quantize_right(x, scale, zero_point, quant_min, quant_max):
    return (torch.round(x / scale) + zero_point).clamp(quant_min, quant_max).to(torch.int32)


def test_check_quantize_passes(capsys):
    assert check_quantize(quantize_right) is True
    assert "quantize: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, s, z, lo, hi: torch.round(x / s) + z, "not clamped"),
    (lambda x, s, z, lo, hi: (torch.floor(x / s + 0.5) + z).clamp(lo, hi), "half to even"),
    (lambda x, s, z, lo, hi: torch.round(x / s + z).clamp(lo, hi), "added before rounding"),
    (lambda x, s, z, lo, hi: (torch.round(x / s) - z).clamp(lo, hi), "subtracted"),
    (lambda x, s, z, lo, hi: (x / s + z).clamp(lo, hi), "forget to round"),
])
def test_check_quantize_hints(wrong, hint):
    with pytest.raises(ExerciseError, match=hint) as err:
        check_quantize(wrong)
    assert "element [" in str(err.value) and "should be" in str(err.value)


def test_check_quantize_rejects_float_codes():
    # right values, wrong type: the exercise asks for integer codes
    float_codes = lambda x, s, z, lo, hi: (torch.round(x / s) + z).clamp(lo, hi)
    with pytest.raises(ExerciseError, match=r"values are right, but your quantize returns dtype "
                                            r"torch.float32: .*integer tensor"):
        check_quantize(float_codes)


def test_check_quantize_uint8_codes_wrap_negative_values():
    wrapped = lambda x, s, z, lo, hi: (torch.round(x / s) + z).clamp(lo, hi).to(torch.uint8)
    with pytest.raises(ExerciseError, match=r"cast to torch.uint8, which wraps negative codes"):
        check_quantize(wrapped)


def test_check_quantize_tie_hint_names_the_element():
    wrong = lambda x, s, z, lo, hi: (torch.floor(x / s + 0.5) + z).clamp(lo, hi)
    # the first tie: x = 0.25, x/scale = 0.5 -> half to even gives 0, floor(+0.5) gives 1
    with pytest.raises(ExerciseError, match=r"element \[0\] \(x=0.25, x/scale=0.5\) is 1 but "
                                            r"should be 0"):
        check_quantize(wrong)


# --- choose_qparams ---------------------------------------------------------

def qparams_right(x, quant_min, quant_max):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = max((hi - lo) / (quant_max - quant_min), torch.finfo(torch.float32).eps)
    zero_point = quant_min - round(lo / scale)
    return scale, max(quant_min, min(quant_max, zero_point))


def test_check_choose_qparams_passes():
    assert check_choose_qparams(qparams_right) is True


def without_zero(x, quant_min, quant_max):
    lo, hi = x.min().item(), x.max().item()
    scale = (hi - lo) / (quant_max - quant_min)
    return scale, quant_min - round(lo / scale)


def levels_not_steps(x, quant_min, quant_max):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (quant_max - quant_min + 1)
    return scale, quant_min - round(lo / scale)


def unrounded_zero_point(x, quant_min, quant_max):
    scale, _ = qparams_right(x, quant_min, quant_max)
    return scale, quant_min - min(x.min().item(), 0.0) / scale


def wrong_sign(x, quant_min, quant_max):
    scale, _ = qparams_right(x, quant_min, quant_max)
    return scale, quant_min + round(min(x.min().item(), 0.0) / scale)


def forgets_quant_min(x, quant_min, quant_max):
    scale, _ = qparams_right(x, quant_min, quant_max)
    return scale, -round(min(x.min().item(), 0.0) / scale)


def forgets_quant_min_then_clamps(x, quant_min, quant_max):
    scale, zero_point = forgets_quant_min(x, quant_min, quant_max)
    return scale, max(quant_min, min(quant_max, zero_point))


def test_forgetting_quant_min_is_named_not_clamped():
    # all-negative int8 data: -round(lo/scale) = 255, outside the range; the hint must not say "clamp"
    with pytest.raises(ExerciseError, match=r"all negative, signed range .* zero_point is 255 but "
                                            r"should be 127: quant_min is missing") as err:
        check_choose_qparams(forgets_quant_min)
    assert "clamp it" not in str(err.value)


def test_clamping_does_not_hide_a_missing_quant_min():
    # clamping 255 to 127 happens to be right on all-negative data; mixed-sign int8 data exposes it
    with pytest.raises(ExerciseError, match=r"mixed signs, signed range .* zero_point is 85 but "
                                            r"should be -43: quant_min is missing.* = -43"):
        check_choose_qparams(forgets_quant_min_then_clamps)


def no_eps_floor(x, quant_min, quant_max):
    # right everywhere except on an all-zero tensor: scale 0, then 0/0 (ZeroDivisionError)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (quant_max - quant_min)
    zero_point = quant_min - round(lo / scale)
    return scale, max(quant_min, min(quant_max, zero_point))


def no_eps_floor_tensors(x, quant_min, quant_max):
    # the same slip in tensors: no exception, scale 0 and a zero-point cast from NaN
    lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = (hi - lo) / (quant_max - quant_min)
    return scale, (quant_min - torch.round(lo / scale)).to(torch.int32)


def tiny_floor(x, quant_min, quant_max):
    # a floor, but not torch's: only the all-zero case sees it
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = max((hi - lo) / (quant_max - quant_min), 1e-8)
    return scale, max(quant_min, min(quant_max, quant_min - round(min(x.min().item(), 0.0) / scale)))


@pytest.mark.parametrize("wrong", [no_eps_floor, no_eps_floor_tensors, tiny_floor])
def test_missing_eps_floor_is_caught_on_all_zeros(wrong):
    with pytest.raises(ExerciseError, match=r"all zeros \(a dead ReLU channel\).*"
                                            r"floor the scale at eps.*torch\.finfo\(torch\.float32\)\.eps"):
        check_choose_qparams(wrong)


@pytest.mark.parametrize("wrong, hint", [
    (without_zero, "must include 0"),
    (levels_not_steps, "number of levels"),
    (unrounded_zero_point, "not an integer"),
    (wrong_sign, "check the sign"),
])
def test_check_choose_qparams_hints(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_choose_qparams(wrong)


# --- ste_grad ---------------------------------------------------------------

def ste_right(x, scale, zero_point, quant_min, quant_max, grad_output):
    q = torch.round(x / scale) + zero_point
    return grad_output * ((q >= quant_min) & (q <= quant_max))


def test_check_ste_grad_passes():
    assert check_ste_grad(ste_right) is True


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, s, z, lo, hi, g: g.clone(), "passes everywhere"),
    (lambda x, s, z, lo, hi, g: torch.zeros_like(g), "round's true derivative"),
    (lambda x, s, z, lo, hi, g: g * ((x / s + z >= lo) & (x / s + z <= hi)), "ROUNDED"),
    (lambda x, s, z, lo, hi, g: g * ((torch.round(x / s) + z > lo) & (torch.round(x / s) + z < hi)),
     "use <= and >="),
    (lambda x, s, z, lo, hi, g: g * ((torch.round(x / s + z) >= lo) & (torch.round(x / s + z) <= hi)),
     "then add the zero-point"),
])
def test_check_ste_grad_hints(wrong, hint):
    with pytest.raises(ExerciseError, match=hint) as err:
        check_ste_grad(wrong)
    assert "should be" in str(err.value)


def test_checks_reject_non_tensors():
    with pytest.raises(ExerciseError, match="torch.Tensor"):
        check_quantize(lambda *a: [0])
    with pytest.raises(ExerciseError, match=r"should return \(scale, zero_point\), got float 0.1"):
        check_choose_qparams(lambda *a: 0.1)


# --- the notebook's own solutions ---------------------------------------------

@pytest.mark.parametrize("grade_id, name, check", [
    ("ex01_quantize", "my_quantize", check_quantize),
    ("ex01_choose_qparams", "my_choose_qparams", check_choose_qparams),
    ("ex01_ste_grad", "my_ste_grad", check_ste_grad),
])
def test_notebook_solutions_pass(grade_id, name, check):
    assert check(solution("01_fake_quant_math", grade_id)[name]) is True


# --- right answers in other styles and types --------------------------------

def quantize_per_element(x, scale, zero_point, quant_min, quant_max):
    codes = [min(max(round(v / scale) + zero_point, quant_min), quant_max) for v in x.reshape(-1).tolist()]
    return torch.tensor(codes, dtype=torch.int64).reshape(x.shape)


def quantize_reciprocal(x, scale, zero_point, quant_min, quant_max):
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, quant_min, quant_max).long()


def qparams_tensors(x, quant_min, quant_max):
    lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = torch.clamp((hi - lo) / (quant_max - quant_min), min=torch.finfo(torch.float32).eps)
    return scale, (quant_min - torch.round(lo / scale)).to(torch.int32)


def qparams_numpy(x, quant_min, quant_max):
    import numpy as np

    a = x.numpy().astype(np.float32)
    lo, hi = np.minimum(a.min(), np.float32(0)), np.maximum(a.max(), np.float32(0))
    scale = np.maximum((hi - lo) / np.float32(quant_max - quant_min), np.finfo(np.float32).eps)
    return np.array([scale, quant_min - np.round(lo / scale)])


def ste_where(x, scale, zero_point, quant_min, quant_max, grad_output):
    q = (x / scale).round() + zero_point
    return torch.where((q < quant_min) | (q > quant_max), torch.zeros_like(grad_output), grad_output)


@pytest.mark.parametrize("check, answer", [
    (check_quantize, quantize_per_element), (check_quantize, quantize_reciprocal),
    (check_choose_qparams, qparams_tensors), (check_choose_qparams, qparams_numpy),
    (check_ste_grad, ste_where),
])
def test_right_answers_in_other_styles_pass(check, answer):
    assert check(answer) is True


# --- wrong answers that the hand-made cases alone let through -----------------

def half_away(v):
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


@pytest.mark.parametrize("wrong, hint", [
    # rounds ties away from zero: on the hand-made ties only via the zero-point case
    (lambda x, s, z, lo, hi: (half_away(x / s) + z).clamp(lo, hi).int(), "away from zero"),
    (lambda x, s, z, lo, hi: (torch.round(x / s) + z).clamp(lo, hi - 1).int(), "off by one at the top"),
    (lambda x, s, z, lo, hi: (torch.round(x / s) + z).clamp(lo + 1, hi).int(), "off by one at the bottom"),
    (lambda x, s, z, lo, hi: (torch.round(x / s).clamp(lo, hi) + z).int(), "clamped before adding"),
    (lambda x, s, z, lo, hi: torch.round(x / s).clamp(lo, hi).int(), "zero-point is missing"),
    (lambda x, s, z, lo, hi: (torch.round(x / s) + z).clamp(lo, hi).to(torch.int8), "cast to torch.int8"),
    (lambda x, s, z, lo, hi: (torch.ceil(x / s) + z).clamp(lo, hi).int(), "ceil rounds up"),
])
def test_check_quantize_catches_more_slips(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_quantize(wrong)


def test_check_quantize_in_place_and_crash_get_hints():
    def in_place(x, scale, zero_point, quant_min, quant_max):
        x /= scale
        return (torch.round(x) + zero_point).clamp(quant_min, quant_max).int()

    with pytest.raises(ExerciseError, match=r"changed its input \(argument 1\) in place"):
        check_quantize(in_place)
    with pytest.raises(ExerciseError, match=r"raised TypeError"):
        check_quantize(lambda x, s, z, lo, hi: torch.round(x / s, z))
    with pytest.raises(ExerciseError, match=r"returned None: did you forget the `return`"):
        check_quantize(lambda *a: None)
    with pytest.raises(ExerciseError, match="pass your function itself, my_quantize"):
        check_quantize(torch.tensor([1, 2]))


def qparams_floor_half(x, quant_min, quant_max):
    import math

    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (quant_max - quant_min)
    return scale, quant_min - math.floor(lo / scale + 0.5)


def qparams_half_away(x, quant_min, quant_max):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (quant_max - quant_min)
    return scale, quant_min - int(half_away(torch.tensor(lo / scale, dtype=torch.float64)))


def qparams_trunc(x, quant_min, quant_max):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (quant_max - quant_min)
    return scale, quant_min - int(lo / scale)


@pytest.mark.parametrize("wrong, hint", [
    (qparams_floor_half, r"a tie at min / scale = -3.5 .* rounds it up; torch rounds half to even"),
    (qparams_half_away, r"a tie at min / scale = -2.5 .* rounded away from zero"),
    (qparams_trunc, r"NEAREST integer"),
])
def test_check_choose_qparams_catches_rounding_slips(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_choose_qparams(wrong)


def test_check_choose_qparams_type_hints():
    with pytest.raises(ExerciseError, match=r"zero_point should be a number, got str"):
        check_choose_qparams(lambda x, lo, hi: (0.1, "0"))
    with pytest.raises(ExerciseError, match=r"should return \(scale, zero_point\): 2 values, got 3"):
        check_choose_qparams(lambda x, lo, hi: (0.1, 0, 1))


@pytest.mark.parametrize("wrong, hint", [
    # the x-domain bounds agree with the rounded code on the hand-made case; random edges expose them
    (lambda x, s, z, lo, hi, g: g * ((x >= (lo - z - 0.5) * s) & (x <= (hi - z + 0.5) * s)),
     r"element \[\d+\] .* is|compared x with"),
    (lambda x, s, z, lo, hi, g: g * ((torch.floor(x / s + 0.5) + z >= lo) & (torch.floor(x / s + 0.5) + z <= hi)),
     "rounds ties up"),
    (lambda x, s, z, lo, hi, g: g * ((torch.round(x / s) >= lo) & (torch.round(x / s) <= hi)),
     "zero-point is missing"),
    (lambda x, s, z, lo, hi, g: ((torch.round(x / s) + z >= lo) & (torch.round(x / s) + z <= hi)).float(),
     "the mask alone"),
])
def test_check_ste_grad_catches_more_slips(wrong, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_ste_grad(wrong)
