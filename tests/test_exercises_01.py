"""The checks of notebook 01 pass right answers and name the mistake in wrong ones."""

import pytest
import torch

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
    scale = (hi - lo) / (quant_max - quant_min)
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
    with pytest.raises(ExerciseError, match="pair"):
        check_choose_qparams(lambda *a: 0.1)
