"""The 04_qat_training exercise checks pass right answers and explain wrong ones."""

import warnings

import pytest
from notebook_solutions import solution
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_fake_quant, disable_observer

from qatlab.exercises import ExerciseError, check_freeze_callback, check_scale_gradient


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _freeze(obs_cmp, bn_cmp, swap=False):
    def make(freeze_observers_at, freeze_bn_at):
        if swap:
            freeze_observers_at, freeze_bn_at = freeze_bn_at, freeze_observers_at

        def callback(t, model):
            if freeze_observers_at is not None and obs_cmp(t, freeze_observers_at):
                model.apply(disable_observer)
            if freeze_bn_at is not None and bn_cmp(t, freeze_bn_at):
                model.apply(freeze_bn_stats)
        return callback
    return make


ge = lambda t, at: t >= at
gt = lambda t, at: t > at


def test_freeze_callback_right():
    assert check_freeze_callback(_freeze(ge, ge)) is True


def test_freeze_callback_off_by_one():
    with pytest.raises(ExerciseError, match=r"observers should be off.*Use >="):
        check_freeze_callback(_freeze(gt, ge))


def test_freeze_callback_swapped_thresholds():
    with pytest.raises(ExerciseError, match=r"t=1: observers should still observe"):
        check_freeze_callback(_freeze(ge, ge, swap=True))


def test_freeze_callback_forgets_bn():
    def make(freeze_observers_at, freeze_bn_at):
        def callback(t, model):
            if freeze_observers_at is not None and t >= freeze_observers_at:
                model.apply(disable_observer)
        return callback

    with pytest.raises(ExerciseError, match=r"BN statistics should be frozen in 'block.0'"):
        check_freeze_callback(make)


def test_freeze_callback_equality_instead_of_ge():
    """``t == step`` passes a step-by-step run (freezing is sticky) but not a resumed one."""
    eq = lambda t, at: t == at  # noqa: E731
    with pytest.raises(ExerciseError, match=r"first called at t=3 \(training resumed.*not only at t =="):
        check_freeze_callback(_freeze(eq, eq))
    with pytest.raises(ExerciseError, match=r"freeze_bn_at=1: a callback first called at t=3"):
        check_freeze_callback(_freeze(ge, eq))


def test_freeze_callback_not_handling_none():
    def make(freeze_observers_at, freeze_bn_at):
        def callback(t, model):
            if t >= freeze_observers_at:
                model.apply(disable_observer)
            if t >= freeze_bn_at:
                model.apply(freeze_bn_stats)
        return callback

    with pytest.raises(ExerciseError, match=r"freeze_observers_at=None, freeze_bn_at=0 raised TypeError.*"
                                            r"test `freeze_observers_at is not None`"):
        check_freeze_callback(make)


def test_freeze_callback_not_returning_a_function():
    with pytest.raises(ExerciseError, match=r"make_freeze_callback\(2, 1\) returned None: did you forget"):
        check_freeze_callback(lambda a, b: None)
    with pytest.raises(ExerciseError, match=r"returned int, not a function callback"):
        check_freeze_callback(lambda a, b: 3)


def test_scale_gradient_right():
    assert check_scale_gradient(lambda x, g: (x - x * g).detach() + x * g) is True


def test_scale_gradient_multiplies_forward():
    with pytest.raises(ExerciseError, match=r"element \[0\] is 0.0625.*did you return x \* g"):
        check_scale_gradient(lambda x, g: x * g)


def test_scale_gradient_identity():
    with pytest.raises(ExerciseError, match=r"should be \[0.125, 0.25, -0.375\].*unscaled"):
        check_scale_gradient(lambda x, g: x)


def test_scale_gradient_detached():
    with pytest.raises(ExerciseError, match="whole expression is detached"):
        check_scale_gradient(lambda x, g: x.detach())


def test_scale_gradient_hook_compounds_over_calls():
    def with_hook(x, g):
        x.register_hook(lambda grad: grad * g)
        return x

    with pytest.raises(ExerciseError, match=r"call 2.*scaled by g\*\*2.*register_hook"):
        check_scale_gradient(with_hook)


def test_scale_gradient_check_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ExerciseError, match="did you return x \\* g"):
            check_scale_gradient(lambda x, g: x * g)
        assert check_scale_gradient(lambda x, g: (x - x * g).detach() + x * g) is True


def test_scale_gradient_divides():
    with pytest.raises(ExerciseError, match="divided by g"):
        check_scale_gradient(lambda x, g: (x - x / g).detach() + x / g)


@pytest.mark.parametrize("grade_id, name, check", [
    ("ex04_freeze_schedule", "make_freeze_callback", check_freeze_callback),
    ("ex04_scale_gradient", "scale_gradient", check_scale_gradient),
])
def test_notebook_solutions_pass(grade_id, name, check):
    assert check(solution("04_qat_training", grade_id)[name]) is True


def test_freeze_callback_that_also_turns_fake_quant_off():
    """Freezing the observers is not switching fake quantization off; the old cases let it pass."""
    def make(freeze_observers_at, freeze_bn_at):
        def callback(t, model):
            if freeze_observers_at is not None and t >= freeze_observers_at:
                model.apply(disable_observer)
                model.apply(disable_fake_quant)
            if freeze_bn_at is not None and t >= freeze_bn_at:
                model.apply(freeze_bn_stats)
        return callback

    with pytest.raises(ExerciseError, match=r"fake quantization is off in .* it does not turn fake "
                                            r"quantization off"):
        check_freeze_callback(make)


def test_freeze_callback_other_styles_pass():
    def make(freeze_observers_at, freeze_bn_at):  # flags set by hand, no model.apply
        def callback(t, model):
            for m in model.modules():
                if freeze_observers_at is not None and t >= freeze_observers_at and hasattr(m, "observer_enabled"):
                    m.observer_enabled[0] = 0
                if freeze_bn_at is not None and t >= freeze_bn_at and hasattr(m, "freeze_bn_stats"):
                    m.freeze_bn_stats()
        return callback

    assert check_freeze_callback(make) is True


def test_scale_gradient_other_styles_pass():
    assert check_scale_gradient(lambda x, g: x.detach() + g * (x - x.detach())) is True
    assert check_scale_gradient(lambda x, g: x * g + (x * (1 - g)).detach()) is True


def test_scale_gradient_slips_get_hints():
    with pytest.raises(ExerciseError, match=r"pass your function itself, scale_gradient"):
        check_scale_gradient(0.5)
    with pytest.raises(ExerciseError, match=r"scale_gradient\(x of shape \(3,\), g=0.125\) raised RuntimeError"):
        check_scale_gradient(lambda x, g: x.mul_(g))
    with pytest.raises(ExerciseError, match=r"returned None"):
        check_scale_gradient(lambda x, g: None)
    # a scalar step size (0-d), as LSQ has: a shape-(1,) result is not x's shape
    with pytest.raises(ExerciseError, match=r"x of shape \(\).*return a tensor shaped like x \(\), got \(1,\)"):
        check_scale_gradient(lambda x, g: ((x - x * g).detach() + x * g).reshape(-1))
