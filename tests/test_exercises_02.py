"""Exercise checks of 02_observers: a right answer passes, typical wrong ones get specific hints."""

import pytest
import torch

from qatlab import observers as obs
from qatlab.exercises import ExerciseError, check_choose_observer, check_minmax_observer


class Right(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant_min, self.quant_max = 0, 255
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x):
        lo, hi = torch.aminmax(x.detach())
        self.min_val.copy_(torch.min(self.min_val, lo))
        self.max_val.copy_(torch.max(self.max_val, hi))
        return x

    def calculate_qparams(self):
        lo, hi = torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=torch.finfo(torch.float32).eps)
        zp = torch.clamp(-torch.round(lo / scale), 0, 255).to(torch.int32)
        return scale.reshape(1), zp.reshape(1)


class NoReturn(Right):
    def forward(self, x):
        super().forward(x)


class BatchOnly(Right):  # forgets earlier batches
    def forward(self, x):
        lo, hi = torch.aminmax(x.detach())
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        return x


class NoZero(Right):  # range does not include 0
    def calculate_qparams(self):
        scale = (self.max_val - self.min_val) / 255.0
        zp = torch.clamp(-torch.round(self.min_val / scale), 0, 255).to(torch.int32)
        return scale.reshape(1), zp.reshape(1)


class WrongSign(Right):
    def calculate_qparams(self):
        scale, _ = super().calculate_qparams()
        lo = torch.clamp(self.min_val, max=0.0)
        return scale, torch.round(lo / scale).to(torch.int32).reshape(1)


class Divide256(Right):
    def calculate_qparams(self):
        lo, hi = torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0)
        scale = (hi - lo) / 256.0
        return scale.reshape(1), torch.clamp(-torch.round(lo / scale), 0, 255).to(torch.int32).reshape(1)


def test_minmax_observer_right_answers_pass():
    assert check_minmax_observer(Right)
    assert check_minmax_observer(lambda: obs.MinMaxObserver())  # the library's own


@pytest.mark.parametrize("cls, hint", [
    (NoReturn, "forward returned None"),
    (BatchOnly, r"min_val after mixed-sign batches batch 2 is -3 .*|max_val after .* batch 2 is"),
    (NoZero, "the range must include 0"),
    (WrongSign, "mind the sign"),
    (Divide256, "not 256"),
])
def test_minmax_observer_wrong_answers_get_hints(cls, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_minmax_observer(cls)


def test_batch_only_hint_names_the_running_max():
    with pytest.raises(ExerciseError, match=r"max_val after mixed-sign batches batch 2 is 0.25 but "
                                            r"should be 2: that is this batch's own max"):
        check_minmax_observer(BatchOnly)


@pytest.fixture(scope="module")
def spiky():
    g = torch.Generator().manual_seed(0)
    x_eval = torch.relu(torch.randn(20_000, generator=g))
    x_calib = torch.relu(torch.randn(20_000, generator=g))
    x_calib[:3] = 20 * float(x_calib.max())
    return x_calib, x_eval


def _measure(x_calib, x_eval):
    return {n: obs.measure_quantization_error(obs.calibrate(obs.make_observer(n), x_calib),
                                              x_eval)["sqnr_db"]
            for n in ("minmax", "histogram", "percentile")}


def test_choose_observer_right_answer_passes(spiky):
    sqnrs = _measure(*spiky)
    best = max(sqnrs, key=sqnrs.get)
    assert best != "minmax"  # the spikes make MinMax the worst choice here
    assert check_choose_observer(best, sqnrs, *spiky)


def test_choose_observer_wrong_choice(spiky):
    sqnrs = _measure(*spiky)
    with pytest.raises(ExerciseError, match=r"you chose 'minmax' \(.* dB\), but your own numbers "
                                            r"say '(histogram|percentile)' is .* dB better"):
        check_choose_observer("minmax", sqnrs, *spiky)


def test_choose_observer_swapped_calibration_and_evaluation(spiky):
    x_calib, x_eval = spiky
    sqnrs = _measure(x_eval, x_calib)  # calibrated on the clean data, measured on the spiky one
    with pytest.raises(ExerciseError, match="you swapped them"):
        check_choose_observer("percentile", sqnrs, x_calib, x_eval)


def test_choose_observer_missing_and_wrong_numbers(spiky):
    sqnrs = _measure(*spiky)
    with pytest.raises(ExerciseError, match=r"no entry for \['histogram'\]"):
        check_choose_observer("percentile", {k: v for k, v in sqnrs.items() if k != "histogram"},
                              *spiky)
    wrong = dict(sqnrs, minmax=sqnrs["minmax"] + 3.0)
    with pytest.raises(ExerciseError, match=r"sqnrs\['minmax'\] is .* dB but should be .* dB"):
        check_choose_observer("percentile", wrong, *spiky)
