"""Exercise checks of 02_observers: a right answer passes, typical wrong ones get specific hints."""

import pytest
import torch

from qatlab import observers as obs
from qatlab.exercises import ExerciseError, check_choose_observer, check_minmax_observer, ex02


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


class NoDetach(Right):  # buffers computed from x itself: they record autograd history
    def forward(self, x):
        self.min_val = torch.min(self.min_val, x.min())
        self.max_val = torch.max(self.max_val, x.max())
        return x


class ReturnsDetached(Right):  # cuts the gradient that QAT needs to flow through
    def forward(self, x):
        super().forward(x)
        return x.detach()


class NoEpsFloor(Right):
    def calculate_qparams(self):
        lo, hi = torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0)
        scale = (hi - lo) / 255.0
        zp = torch.clamp(-torch.round(lo / scale), 0, 255).to(torch.int32)
        return scale.reshape(1), zp.reshape(1)


class ZeroDim(Right):  # scalars instead of torch's shape-(1,) tensors
    def calculate_qparams(self):
        scale, zp = super().calculate_qparams()
        return scale.reshape(()), zp.reshape(())


class FloatZeroPoint(Right):
    def calculate_qparams(self):
        scale, zp = super().calculate_qparams()
        return scale, zp.float()


@pytest.mark.parametrize("cls, hint", [
    (NoDetach, r"min_val carries autograd history \(requires_grad=True\).*observe x.detach\(\)"),
    (ReturnsDetached, r"return x itself, not x.detach\(\)"),
    (NoEpsFloor, r"scale on all-zero batches \(a dead ReLU channel\) is 0: .*zero-point becomes "
                 r"-2147483648. Floor the scale at torch.finfo\(torch.float32\).eps"),
    (ZeroDim, r"tensors of shape \(1,\).*scale is \(\): use .reshape\(1\)"),
    (FloatZeroPoint, r"zero_point on mixed-sign batches has dtype torch.float32"),
])
def test_minmax_observer_leaks_are_closed(cls, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_minmax_observer(cls)


# --- choose_observer: a rule that decides from calibration data alone -------------------

def _acts(g, n=50_000):
    """ReLU-like activations with a long (log-normal) tail."""
    return torch.relu(torch.randn(n, generator=g)) * torch.exp(0.5 * torch.randn(n, generator=g))


@pytest.fixture(scope="module")
def cases():
    g = torch.Generator().manual_seed(0)
    clean_calib, clean_eval = _acts(g), _acts(g)
    spiky_calib, spiky_eval = _acts(g), _acts(g)
    spiky_calib[:2] = 20 * float(spiky_calib.max())  # 2 corrupted values in 50,000
    return {"clean": (clean_calib, clean_eval), "two spikes": (spiky_calib, spiky_eval)}


def rule_right(x_calib):
    """Percentile when the max sits far above the bulk of the values, else MinMax."""
    top = torch.quantile(x_calib.reshape(-1).float(), 0.999)
    return "percentile" if x_calib.max() > 3 * top else "minmax"


def rule_by_calibration_sqnr(x_calib):
    """The transcription answer: score each observer on the calibration tensor itself."""
    sq = {n: obs.measure_quantization_error(obs.calibrate(obs.make_observer(n), x_calib),
                                            x_calib)["sqnr_db"]
          for n in ("minmax", "histogram", "percentile")}
    return max(sq, key=sq.get)


def test_choose_observer_cases_separate_the_observers(cases):
    """The cases are only a test if no single observer is right on both."""
    best = {label: max(s := ex02.reference_sqnrs(*xs), key=s.get) for label, xs in cases.items()}
    assert best == {"clean": "minmax", "two spikes": "percentile"}


def test_choose_observer_right_rule_passes(cases):
    assert check_choose_observer(rule_right, cases)


@pytest.mark.parametrize("rule, hint", [
    (lambda x: "percentile", r"on clean: you chose 'percentile', .* nothing here looks like an "
                             r"outlier .* clips real values"),
    (lambda x: "minmax", r"on two spikes: you chose 'minmax', which reaches .* dB on the held-out "
                         r"batch, but 'percentile' reaches .* the calibration max is \d+x the "
                         r"99.9th percentile"),
    (lambda x: "histogram", r"on two spikes: you chose 'histogram'"),
    (rule_by_calibration_sqnr, r"Scoring the observers on the calibration tensor itself does "
                               r"not work"),
    (lambda x: "moving_average", r"on clean: choose_observer returned 'moving_average'; return "
                                 r"one of \['minmax', 'histogram', 'percentile'\]"),
])
def test_choose_observer_wrong_rules_get_hints(cases, rule, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_choose_observer(rule, cases)


def test_choose_observer_rejects_a_value_instead_of_the_function(cases):
    with pytest.raises(ExerciseError, match="pass your function itself"):
        check_choose_observer("percentile", cases)
    with pytest.raises(ValueError, match="non-empty dict"):
        check_choose_observer(rule_right, {})


@pytest.mark.parametrize("sqnrs, rule, passes", [
    # a clean layer where Histogram's search edges MinMax out on the held-out batch: MinMax still passes
    ({"minmax": 39.3, "histogram": 40.6, "percentile": 36.0}, rule_right, True),
    # ... but not when MinMax is far behind (what an outlier does to it)
    ({"minmax": 30.0, "histogram": 40.6, "percentile": 40.0}, lambda x: "minmax", False),
    # the other observers get the strict tolerance
    ({"minmax": 40.6, "histogram": 40.2, "percentile": 36.0}, lambda x: "histogram", True),
    ({"minmax": 40.6, "histogram": 39.3, "percentile": 36.0}, lambda x: "histogram", False),
    ({"minmax": 40.6, "histogram": 39.3, "percentile": 39.0}, lambda x: "percentile", False),
])
def test_choose_observer_tolerances(monkeypatch, cases, sqnrs, rule, passes):
    monkeypatch.setattr(ex02, "reference_sqnrs", lambda x_calib, x_eval, names=None: dict(sqnrs))
    clean = {"clean": cases["clean"]}
    if passes:
        assert check_choose_observer(rule, clean)
    else:
        with pytest.raises(ExerciseError, match=r"on clean: you chose"):
            check_choose_observer(rule, clean)


def test_choose_observer_rejects_bad_tolerances(cases):
    with pytest.raises(ValueError, match="tol_db=3.0, minmax_tol_db=2.0"):
        check_choose_observer(rule_right, cases, tol_db=3.0)
