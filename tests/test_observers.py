"""Our observers against torch.ao's and torchao.pt2e's: same buffers, same qparams."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import observer as torch_obs

from qatlab import observers as ob

warnings.filterwarnings("ignore", category=UserWarning)

try:
    from torchao.quantization.pt2e import observer as ao_obs
except ImportError:  # pragma: no cover - torchao is pinned, but keep the suite importable
    ao_obs = None

REFS = [torch_obs] + ([ao_obs] if ao_obs is not None else [])

PER_TENSOR_KW = [
    {},
    {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric},
    {"dtype": torch.quint8, "qscheme": torch.per_tensor_symmetric},
    {"quant_min": 0, "quant_max": 15},
    {"dtype": torch.qint8, "quant_min": -8, "quant_max": 7},
    {"qscheme": torch.per_tensor_symmetric, "quant_min": 0, "quant_max": 15},
]


def _stream(seed=0, shape=(6, 4, 3, 3), n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def _assert_same(ours, ref, where):
    for buf in ("min_val", "max_val"):
        a, b = getattr(ours, buf), getattr(ref, buf)
        assert a.shape == b.shape and torch.equal(a, b), f"{where}: {buf} {a} vs {b}"
    (s1, z1), (s2, z2) = ours.calculate_qparams(), ref.calculate_qparams()
    assert torch.equal(s1, s2), f"{where}: scale {s1} vs {s2}"  # atol=0, rtol=0
    assert torch.equal(z1.long(), z2.long()), f"{where}: zero_point {z1} vs {z2}"


@pytest.mark.parametrize("ref_mod", REFS, ids=lambda m: m.__name__.split(".")[0])
@pytest.mark.parametrize("kw", PER_TENSOR_KW)
@pytest.mark.parametrize("cls", ["MinMaxObserver", "MovingAverageMinMaxObserver"])
def test_per_tensor_matches_reference_every_batch(cls, kw, ref_mod):
    extra = {"averaging_constant": 0.3} if cls.startswith("Moving") else {}
    ours, ref = getattr(ob, cls)(**extra, **kw), getattr(ref_mod, cls)(**extra, **kw)
    for i, x in enumerate(_stream()):
        assert ours(x) is x  # returns its input, unchanged
        ref(x)
        _assert_same(ours, ref, f"{cls} batch {i}")


@pytest.mark.parametrize("ref_mod", REFS, ids=lambda m: m.__name__.split(".")[0])
@pytest.mark.parametrize("kw", [{}, {"ch_axis": 1, "dtype": torch.qint8,
                                     "qscheme": torch.per_channel_symmetric},
                                {"ch_axis": -1}, {"ch_axis": 2, "quant_min": 0, "quant_max": 15}])
def test_per_channel_matches_reference_every_batch(kw, ref_mod):
    ours, ref = ob.PerChannelMinMaxObserver(**kw), ref_mod.PerChannelMinMaxObserver(**kw)
    for i, x in enumerate(_stream(seed=1)):
        assert ours(x) is x
        ref(x)
        _assert_same(ours, ref, f"per-channel batch {i}")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), scale=st.floats(1e-3, 1e3),
       symmetric=st.booleans())
def test_minmax_random_streams(seed, n, scale, symmetric):
    kw = {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric} if symmetric else {}
    ours, ref = ob.MinMaxObserver(**kw), torch_obs.MinMaxObserver(**kw)
    for x in _stream(seed, shape=(17,), n=n):
        ours(x * scale)
        ref(x * scale)
    _assert_same(ours, ref, "random stream")


def _histogram_data():
    g = torch.Generator().manual_seed(0)
    gauss = [torch.randn(2000, generator=g) * (1 + i) + 0.3 * i for i in range(4)]
    relu = [torch.relu(torch.randn(3000, generator=g)) * (1 + 0.5 * i) for i in range(3)]
    relu[1][7] = 40.0  # one outlier in the middle of the stream
    return {"gauss": gauss, "relu+outlier": relu}


@pytest.mark.parametrize("ref_mod", REFS, ids=lambda m: m.__name__.split(".")[0])
@pytest.mark.parametrize("data", ["gauss", "relu+outlier"])
@pytest.mark.parametrize("kw", PER_TENSOR_KW[:2])
def test_histogram_within_one_step_of_reference(data, kw, ref_mod):
    ours, ref = ob.HistogramObserver(bins=512, **kw), ref_mod.HistogramObserver(bins=512, **kw)
    for x in _histogram_data()[data]:
        assert ours(x) is x
        ref(x)
    assert torch.equal(ours.histogram, ref.histogram)
    assert torch.equal(ours.min_val, ref.min_val) and torch.equal(ours.max_val, ref.max_val)
    (s1, z1), (s2, z2) = ours.calculate_qparams(), ref.calculate_qparams()
    # the contract: the chosen range's ends within one quantization step of torch's
    qmin, qmax = ours.quant_min, ours.quant_max
    lo1, hi1 = (qmin - z1.double()) * s1.double(), (qmax - z1.double()) * s1.double()
    lo2, hi2 = (qmin - z2.double()) * s2.double(), (qmax - z2.double()) * s2.double()
    step = float(s2)
    assert abs(float(lo1 - lo2)) <= step and abs(float(hi1 - hi2)) <= step
    # and in fact we reproduce it exactly
    assert torch.equal(s1, s2) and torch.equal(z1.long(), z2.long())


def test_estimate_l2_error_matches_torch_private_helper():
    g = torch.Generator().manual_seed(3)
    ref = torch_obs.HistogramObserver(bins=64)
    ref(torch.randn(500, generator=g))
    width = (ref.max_val.item() - ref.min_val.item()) / ref.bins
    for start, end in [(0, 63), (5, 40), (20, 21)]:
        ours = float(ob.estimate_l2_error(ref.histogram, start, end, 256, width))
        assert ours == ref._compute_quantization_error(start, end)


def test_percentile_clips_a_lone_outlier_that_minmax_keeps():
    x = torch.cat([torch.linspace(0, 1, 9999), torch.tensor([100.0])])
    pct = ob.calibrate(ob.PercentileObserver(percentile=99.9), x)
    mm = ob.calibrate(ob.MinMaxObserver(), x)
    lo, hi = pct.calculate_range()
    assert float(lo) == 0.0 and 0.95 < float(hi) < 1.05
    assert float(mm.max_val) == 100.0
    clean = torch.linspace(0, 1, 1000)
    assert (ob.measure_quantization_error(pct, clean)["sqnr_db"]
            > ob.measure_quantization_error(mm, clean)["sqnr_db"] + 20)


def test_percentile_100_keeps_the_whole_range():
    x = torch.randn(1000)
    lo, hi = ob.calibrate(ob.PercentileObserver(percentile=100, bins=256), x).calculate_range()
    assert torch.isclose(lo, x.min()) and torch.isclose(hi, x.max(), rtol=1e-5)


# --- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["minmax", "moving_average", "histogram", "percentile",
                                  "per_channel"])
@pytest.mark.parametrize("bad, err, text", [
    (torch.tensor([]), ValueError, "empty"),
    (torch.tensor([1.0, float("nan")]), ValueError, "1 NaN"),
    (torch.tensor([1.0, float("inf"), -float("inf")]), ValueError, "2 inf"),
    (torch.tensor([1, 2]), TypeError, "floating-point"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_bad_input_raises(name, bad, err, text):
    obs = ob.make_observer(name)
    with pytest.raises(err, match=text):
        obs(bad)
    assert not obs.has_data()  # nothing half-updated


@pytest.mark.parametrize("name", ["minmax", "moving_average", "histogram", "percentile",
                                  "per_channel"])
def test_calculate_qparams_before_data_raises(name):
    with pytest.raises(RuntimeError, match="before any data"):
        ob.make_observer(name).calculate_qparams()


def test_ch_axis_out_of_range_and_changing_channel_count():
    with pytest.raises(ValueError, match="ch_axis=3 is out of range"):
        ob.PerChannelMinMaxObserver(ch_axis=3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="ch_axis=-3"):
        ob.PerChannelMinMaxObserver(ch_axis=-3)(torch.randn(2, 3))
    obs = ob.PerChannelMinMaxObserver()
    obs(torch.randn(4, 2))
    with pytest.raises(ValueError, match="got 5 channels"):
        obs(torch.randn(5, 2))
    with pytest.raises(TypeError, match="ch_axis must be an int"):
        ob.PerChannelMinMaxObserver(ch_axis=1.0)


@pytest.mark.parametrize("make, text", [
    (lambda: ob.MinMaxObserver(dtype=torch.float16), "dtype must be one of"),
    (lambda: ob.MinMaxObserver(qscheme=torch.per_channel_affine), "supports qscheme"),
    (lambda: ob.PerChannelMinMaxObserver(qscheme=torch.per_tensor_affine), "supports qscheme"),
    (lambda: ob.MinMaxObserver(quant_min=0), "give both"),
    (lambda: ob.MinMaxObserver(quant_min=1, quant_max=10), r"quant_min <= 0"),
    (lambda: ob.MinMaxObserver(dtype=torch.qint8, quant_min=-200, quant_max=10), "-200"),
    (lambda: ob.MovingAverageMinMaxObserver(averaging_constant=0), "averaging_constant"),
    (lambda: ob.PercentileObserver(percentile=101), "percentile must be"),
    (lambda: ob.HistogramObserver(bins=1), "bins must be"),
])
def test_bad_arguments_raise_valueerror_naming_the_value(make, text):
    with pytest.raises((ValueError, TypeError), match=text):
        make()


# --- contract details --------------------------------------------------------------

def test_forward_detaches_and_keeps_autograd_of_input():
    x = torch.randn(10, requires_grad=True)
    obs = ob.MinMaxObserver()
    y = obs(x)
    assert y is x and not obs.min_val.requires_grad
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def test_per_channel_state_dict_roundtrip():
    a = ob.calibrate(ob.PerChannelMinMaxObserver(), torch.randn(3, 4))
    b = ob.PerChannelMinMaxObserver()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)


def test_moving_average_forgets_a_spike():
    mm, ma = ob.MinMaxObserver(), ob.MovingAverageMinMaxObserver(averaging_constant=0.1)
    batches = [torch.tensor([0.0, 1.0])] * 5 + [torch.tensor([0.0, 50.0])] + \
              [torch.tensor([0.0, 1.0])] * 40
    mins, maxs = ob.trace_running_range(ma, batches)
    ob.calibrate(mm, batches)
    assert float(mm.max_val) == 50.0
    assert maxs[5] == pytest.approx(1 + 0.1 * 49)  # the spike moves it by c * (50 - 1)
    assert maxs[-1] < 1.1 and mins[-1] == 0.0


# --- notebook helpers --------------------------------------------------------------

def test_capture_activations_and_inject_outlier():
    from qatlab.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    acts = ob.capture_activations(model, torch.randn(2, 1, 28, 28),
                                  {"block1": model.features[0][2], "fc": model.fc})
    assert acts["block1"].shape == (2, 16, 28, 28) and acts["fc"].shape == (2, 10)
    assert float(acts["block1"].min()) >= 0  # after ReLU
    assert not model.features[0][2]._forward_hooks  # hooks removed
    x = acts["fc"]
    y = ob.inject_outlier(x, 99.0, index=4)
    assert y.view(-1)[4] == 99.0 and x.view(-1)[4] != 99.0


def test_calibration_sweep_runs_eager_ptq():
    from torch.ao.quantization import QConfig

    from qatlab.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    qconfig = QConfig(activation=torch_obs.MinMaxObserver.with_args(dtype=torch.quint8),
                      weight=torch_obs.PerChannelMinMaxObserver.with_args(
                          dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    batches = [torch.randn(4, 1, 28, 28) for _ in range(2)]
    test = [(torch.randn(8, 1, 28, 28), torch.arange(8))]
    accs = ob.calibration_sweep(model, qconfig, batches, [2, 1], test)
    assert sorted(accs) == [1, 2] and all(0 <= a <= 100 for a in accs.values())
    assert model.training is False and not hasattr(model, "qconfig")  # the input is untouched
    with pytest.raises(ValueError, match="sizes"):
        ob.calibration_sweep(model, qconfig, batches, [3], test)
    accs2, correct = ob.calibration_sweep(model, qconfig, batches, [1, 2], test, return_correct=True)
    assert accs2 == accs and correct[2].dtype == torch.bool and correct[2].shape == (8,)
    assert accs[2] == 100.0 * correct[2].float().mean().item()


def test_plots_return_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.relu(torch.randn(2000))
    ax = ob.explore_observer(x, "percentile", outlier=30.0)
    assert "SQNR=" in ax.get_title()
    ax = ob.plot_calibration_sweep({"minmax": {1: 90.0, 2: 95.0}}, fp32_acc=98.0)
    assert ax.get_xlabel() == "calibration batches (log scale)"
    # with the test-set size: error bars, the fp32 ± 2 SE band, and a title computed from them
    ax = ob.plot_calibration_sweep({"minmax": {1: 97.9, 2: 98.2}}, fp32_acc=98.0, n_test=1000)
    assert ax.get_title() == "every int8 accuracy within 2 SE of fp32"
    lo, hi = ax.get_ylim()
    assert lo < 98.0 - 2 * 0.44 and hi > 98.0 + 2 * 0.44  # the band is visible, noise looks like noise
    ax = ob.plot_calibration_sweep({"minmax": {1: 90.0, 2: 98.0}}, fp32_acc=98.0, n_test=1000)
    assert ax.get_title() == "some int8 accuracies outside 2 SE of fp32"
    ax = ob.plot_weight_sqnr({"conv1": 40.0, "fc": 38.0}, {"conv1": 43.0, "fc": 41.5})
    assert [t.get_text() for t in ax.texts] == ["+3.0 dB", "+3.5 dB"]
    ax = ob.plot_running_range({"minmax": ([0, 0], [1, 2])})
    assert len(ax.get_lines()) == 2
    with pytest.raises(ValueError, match="per-tensor observer"):
        ob.explore_observer(x, "per_channel")
    plt.close("all")
