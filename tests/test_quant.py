"""qatlab.quant against torch, bit for bit (atol=0, rtol=0), plus properties."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatlab.quant import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_with_torch,
    quant_range,
    quantize,
    sqnr_db,
)

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")


def assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.equal(ours, ref), f"maxdiff {(ours.double() - ref.double()).abs().max()}"


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)
ranges = st.builds(quant_range, st.integers(2, 16), st.booleans())


@st.composite
def tensor_case(draw, per_channel=False):
    """x with random values plus ties at .5, clamp edges and constants; qparams that fit."""
    shape = draw(shapes)
    quant_min, quant_max = draw(ranges)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    axis = draw(st.integers(0, len(shape) - 1)) if per_channel else None
    n = shape[axis] if per_channel else 1
    # a power-of-two scale makes x * (1/scale) exact, so ties at .5 really are ties
    pow2 = draw(st.booleans())
    if pow2:
        scale = 2.0 ** -torch.randint(0, 12, (n,), generator=g).float()
    else:
        scale = torch.rand(n, generator=g) * 0.5 + 1e-4
    zero_point = torch.randint(quant_min, quant_max + 1, (n,), generator=g).to(torch.int32)
    shape_b = [1] * len(shape)
    if per_channel:
        shape_b[axis] = n
    s, z = scale.reshape(shape_b), zero_point.reshape(shape_b).float()
    kind = draw(st.sampled_from(["random", "ties", "edges", "constant"]))
    u = torch.rand(shape, generator=g)
    k = torch.randint(quant_min - 3, quant_max + 4, shape, generator=g).float()
    if kind == "random":
        span = (quant_max - quant_min) * 1.3
        x = ((u - 0.5) * span + (quant_min + quant_max) / 2 - z) * s
    elif kind == "ties":
        x = (k - z + 0.5) * s
    elif kind == "edges":
        choices = torch.stack([torch.full(shape, float(quant_min)),
                               torch.full(shape, float(quant_max))]) - z
        pick = (u > 0.5).long()
        edge = choices.gather(0, pick.unsqueeze(0)).squeeze(0)
        offset = torch.tensor([-0.5, 0.0, 0.5])[torch.randint(0, 3, shape, generator=g)]
        x = (edge + offset) * s
    else:
        x = torch.full(shape, float(draw(st.floats(-10, 10, width=32))))
    x = x.float()
    if not per_channel:
        scale, zero_point = float(scale), int(zero_point)
    return x, scale, zero_point, quant_min, quant_max, axis


def torch_fake_quant(x, scale, zero_point, quant_min, quant_max, axis):
    return fake_quantize_with_torch(x, scale, zero_point, quant_min, quant_max, axis)


# ---------------------------------------------------------------------------
# fake_quantize: forward and backward against torch
# ---------------------------------------------------------------------------

@SETTINGS
@given(tensor_case())
def test_fake_quantize_per_tensor_matches_torch(case):
    x, scale, zp, qmin, qmax, _ = case
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert_same(fake_quantize(x, scale, zp, qmin, qmax), ref)


@SETTINGS
@given(tensor_case(per_channel=True))
def test_fake_quantize_per_channel_matches_torch_on_every_axis(case):
    x, scale, zp, qmin, qmax, axis = case
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    assert_same(fake_quantize(x, scale, zp, qmin, qmax, axis=axis), ref)
    # a negative axis means the same thing
    assert_same(fake_quantize(x, scale, zp, qmin, qmax, axis=axis - x.dim()), ref)


@SETTINGS
@given(tensor_case(per_channel=True), st.booleans())
def test_fake_quantize_gradient_matches_torch(case, per_channel):
    x, scale, zp, qmin, qmax, axis = case
    if not per_channel:
        scale, zp, axis = float(scale[0]), int(zp[0]), None
    grad = torch.randn(x.shape)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    fake_quantize(x1, scale, zp, qmin, qmax, axis=axis).backward(grad)
    torch_fake_quant(x2, scale, zp, qmin, qmax, axis).backward(grad)
    assert_same(x1.grad, x2.grad)


def test_ties_round_half_to_even_and_zero_point_after_rounding():
    # x / scale = 0.5, 1.5, 2.5, -0.5, -1.5: half to even gives 0, 2, 2, -0, -2
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert_same(quantize(x, 1.0, 0, -8, 7), torch.tensor([0, 2, 2, 0, -2], dtype=torch.int8))
    # with zero_point 1 the zero-point is added AFTER rounding (round(2.5)+1 = 3, not round(3.5)=4)
    assert_same(quantize(x, 1.0, 1, -8, 7), torch.tensor([1, 3, 3, 1, -1], dtype=torch.int8))
    assert_same(fake_quantize(x, 1.0, 1, -8, 7),
                torch.fake_quantize_per_tensor_affine(x, 1.0, 1, -8, 7))


def test_clamp_edges_gradient_mask():
    # q = x/scale + zp with range [-4, 3]: exactly at the edges passes gradient, beyond does not
    x = torch.tensor([-4.6, -4.5, -4.0, 3.0, 3.49, 3.5, 3.6], requires_grad=True)
    fake_quantize(x, 1.0, 0, -4, 3).sum().backward()
    # -4.5 rounds to -4 (half to even): inside; 3.5 rounds to 4: outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_fake_quantize_with_tensor_qparams_matches_torch():
    x = torch.randn(1000) * 3
    s, z = torch.tensor([0.0123]), torch.tensor([3], dtype=torch.int32)
    assert_same(fake_quantize(x, s, z, -128, 127),
                torch.fake_quantize_per_tensor_affine(x, s, z, -128, 127))


# ---------------------------------------------------------------------------
# quantize / dequantize against torch's quantized tensors
# ---------------------------------------------------------------------------

@SETTINGS
@given(tensor_case(per_channel=True), st.sampled_from([torch.qint8, torch.quint8]),
       st.booleans())
def test_quantize_dequantize_match_torch_int8_uint8(case, dtype, per_channel):
    x, scale, _, _, _, axis = case
    qmin, qmax = (-128, 127) if dtype == torch.qint8 else (0, 255)
    zp = torch.randint(qmin, qmax + 1, scale.shape, generator=torch.Generator().manual_seed(1))
    if per_channel:
        qt = torch.quantize_per_channel(x, scale.double(), zp.long(), axis, dtype)
    else:
        scale, zp, axis = float(scale[0]), int(zp[0]), None
        qt = torch.quantize_per_tensor(x, scale, zp, dtype)
    q = quantize(x, scale, zp, qmin, qmax, axis=axis)
    assert_same(q, qt.int_repr())
    assert q.dtype == qt.int_repr().dtype
    assert_same(dequantize(q, scale, zp, axis=axis), qt.dequantize())


@SETTINGS
@given(tensor_case(per_channel=True), st.booleans())
def test_properties_on_grid_idempotent_error_bound(case, per_channel):
    x, scale, zp, qmin, qmax, axis = case
    if not per_channel:
        scale, zp, axis = float(scale[0]), int(zp[0]), None
    y = fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
    # equals dequantize(quantize(x))
    assert_same(y, dequantize(quantize(x, scale, zp, qmin, qmax, axis), scale, zp, axis))
    # idempotent: the grid maps to itself
    assert_same(fake_quantize(y, scale, zp, qmin, qmax, axis=axis), y)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(shape)
    z = torch.as_tensor(zp).reshape(shape).double()
    # outputs sit on the grid: y == float32((k - zp) * scale) for an integer k in [qmin, qmax]
    k = torch.round(y.double() / s.double()) + z
    assert torch.equal(((k - z).float() * s), y)
    assert k.min() >= qmin and k.max() <= qmax
    # inside the representable range, the error is at most scale / 2
    lo, hi = (qmin - z) * s.double(), (qmax - z) * s.double()
    inside = (x.double() >= lo) & (x.double() <= hi)
    err = (y.double() - x.double()).abs()
    # ... plus float32 round-off of x * (1/scale) and of (q - zp) * scale
    ulp = torch.finfo(torch.float32).eps
    bound = s.double() / 2 + 2 * ulp * (x.double().abs() + s.double())
    assert bool((err[inside] <= bound[inside]).all())


# ---------------------------------------------------------------------------
# choose_qparams against MinMaxObserver / PerChannelMinMaxObserver
# ---------------------------------------------------------------------------

def torch_observer(quant_min, quant_max, symmetric, per_channel):
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    # torch's defaults for full-width ranges; any other range is a "customized qrange"
    default = {(0, 255): torch.quint8, (-128, 127): torch.qint8,
               (0, 2**16 - 1): torch.uint16, (-(2**15), 2**15 - 1): torch.int16}
    if (quant_min, quant_max) in default:
        kwargs = {"dtype": default[(quant_min, quant_max)]}
    elif quant_min >= 0:
        kwargs = {"dtype": torch.quint8, "quant_min": quant_min, "quant_max": quant_max}
    else:
        dtype = torch.qint8 if quant_max - quant_min < 256 else torch.qint32
        kwargs = {"dtype": dtype, "quant_min": quant_min, "quant_max": quant_max}
    if per_channel:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        return PerChannelMinMaxObserver(ch_axis=0, qscheme=qscheme, **kwargs)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    return MinMaxObserver(qscheme=qscheme, **kwargs)


finite = st.floats(-1e4, 1e4, width=32)
tiny = st.floats(-2.0**-20, 2.0**-20, width=32)


@SETTINGS
@given(ranges, st.booleans(), st.lists(st.tuples(st.one_of(finite, tiny), st.one_of(finite, tiny)),
                                       min_size=1, max_size=6), st.booleans())
def test_choose_qparams_matches_torch_observers(qrange, symmetric, pairs, per_channel):
    quant_min, quant_max = qrange
    lo = torch.tensor([min(a, b) for a, b in pairs])
    hi = torch.tensor([max(a, b) for a, b in pairs])
    obs = torch_observer(quant_min, quant_max, symmetric, per_channel)
    if per_channel:
        obs(torch.stack([lo, hi], dim=1))  # channel c sees exactly {lo[c], hi[c]}
        scale, zp = choose_qparams(lo, hi, quant_min, quant_max, symmetric=symmetric)
    else:
        obs(torch.stack([lo[:1], hi[:1]]))
        scale, zp = choose_qparams(float(lo[0]), float(hi[0]), quant_min, quant_max,
                                   symmetric=symmetric)
    ref_scale, ref_zp = obs.calculate_qparams()
    assert_same(scale, ref_scale)
    assert_same(zp, ref_zp)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32


def test_choose_qparams_eps_floor_and_zero_in_range():
    scale, zp = choose_qparams(0.0, 0.0, -128, 127)
    assert scale.item() == torch.finfo(torch.float32).eps and zp.item() == -128
    # all-positive values: the range is stretched down to 0, so 0 is exactly representable
    scale, zp = choose_qparams(2.0, 5.0, 0, 255)
    assert zp.item() == 0 and fake_quantize(torch.tensor(0.0), scale, zp, 0, 255).item() == 0.0
    scale, zp = choose_qparams(-5.0, -2.0, 0, 255)
    assert zp.item() == 255


def test_choose_qparams_unsigned_symmetric_zero_point():
    assert choose_qparams(-1.0, 1.0, 0, 255, symmetric=True)[1].item() == 128
    assert choose_qparams(-1.0, 1.0, 0, 255, symmetric=True,
                          customized_qrange=True)[1].item() == 127
    assert choose_qparams(-1.0, 1.0, 0, 15, symmetric=True)[1].item() == 7
    assert choose_qparams(-1.0, 1.0, 0, 2**16 - 1, symmetric=True)[1].item() == 2**15
    assert choose_qparams(-1.0, 1.0, -8, 7, symmetric=True)[1].item() == 0


# ---------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the value
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: fake_quantize(torch.ones(3), 0.0, 0, -128, 127), "scale.*0.0"),
    (lambda: fake_quantize(torch.ones(3), -0.5, 0, -128, 127), "scale.*-0.5"),
    (lambda: fake_quantize(torch.ones(3), float("inf"), 0, -128, 127), "scale.*inf"),
    (lambda: fake_quantize(torch.ones(3), float("nan"), 0, -128, 127), "scale.*nan"),
    (lambda: fake_quantize(torch.ones(3), 0.1, 0, 127, 127), "quant_min=127"),
    (lambda: fake_quantize(torch.ones(3), 0.1, 200, -128, 127), "zero_point 200"),
    (lambda: quantize(torch.ones(3), 0.1, -1, 0, 255), "zero_point -1"),
    (lambda: fake_quantize(torch.ones(3), 0.1, 0.5, -128, 127), "zero_point.*0.5"),
    (lambda: fake_quantize(torch.ones(2, 3), torch.ones(3), torch.zeros(3), -8, 7, axis=2),
     "axis 2"),
    (lambda: fake_quantize(torch.ones(2, 3), torch.ones(3), torch.zeros(3), -8, 7, axis=0),
     r"shape \(2,\).*got \(3,\)"),
    (lambda: fake_quantize(torch.ones(2, 3), torch.ones(3), 0, -8, 7), "one scale"),
    (lambda: choose_qparams(float("nan"), 1.0, -128, 127), "min_val.*nan"),
    (lambda: choose_qparams(torch.tensor([0.0, 1.0]), torch.tensor([1.0, float("nan")]),
                            -128, 127), "max_val.*nan.*index 1"),
    (lambda: choose_qparams(2.0, 1.0, -128, 127), "min_val=2.0 > max_val=1.0"),
    (lambda: choose_qparams(torch.zeros(2), torch.zeros(3), -128, 127), "same shape"),
    (lambda: choose_qparams(0.0, 1.0, 5, 2), "quant_min=5"),
])
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_type_errors():
    with pytest.raises(TypeError, match="int64"):
        fake_quantize(torch.ones(3, dtype=torch.int64), 0.1, 0, -8, 7)
    with pytest.raises(TypeError, match="quant_min"):
        fake_quantize(torch.ones(3), 0.1, 0, -8.0, 7)
    with pytest.raises(TypeError, match="float32"):
        dequantize(torch.ones(3), 0.1, 0)


def test_sqnr_db_and_quant_range():
    assert sqnr_db(torch.ones(4), torch.ones(4)) == float("inf")
    assert quant_range(2) == (-2, 1) and quant_range(16, signed=False) == (0, 65535)
    with pytest.raises(ValueError, match="bits.*0"):
        quant_range(0)
