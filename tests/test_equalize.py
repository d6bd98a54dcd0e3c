"""Cross-layer equalization (qatlab.equalize): the function is unchanged, the ranges are equalized."""

import copy

import pytest
import torch
from torch import nn

from qatlab.equalize import (
    channel_ranges,
    equalization_scales,
    equalize_chain,
    equalize_model,
    equalize_pair,
    relu_conv_chain,
)
from qatlab.fusion import fold_model_bn
from qatlab.models import SmallCNN, TinyMobileNet


def _randomized(model, seed=0):
    """A model with random BN statistics, so that folding gives very unequal channel ranges."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) * 3 + 0.05
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.running_var.data = torch.rand(m.num_features, generator=g) ** 4 * 5 + 1e-3
            m.running_mean.data = torch.randn(m.num_features, generator=g) * 0.1
    return model.eval()


@pytest.mark.parametrize("cls", [SmallCNN, TinyMobileNet])
def test_output_unchanged_and_ranges_equal(cls):
    torch.manual_seed(0)
    folded = fold_model_bn(_randomized(cls()))
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = folded(x)
    eq = copy.deepcopy(folded)
    passes = equalize_chain(relu_conv_chain(eq), iterations=50)
    with torch.no_grad():
        out = eq(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert passes >= 1
    convs = relu_conv_chain(eq)
    for a, b in zip(convs, convs[1:]):
        # after convergence each pair's ranges are equal: r1_i = r2_i, i.e. the scales are 1
        torch.testing.assert_close(equalization_scales(a, b), torch.ones(a.weight.shape[0]), rtol=1e-3, atol=1e-3)
    before = relu_conv_chain(folded)
    spread = lambda r: (r.max() / r.min()).item()  # noqa: E731
    assert spread(channel_ranges(convs[1])) < spread(channel_ranges(before[1]))


def test_depthwise_pair_scales_filters():
    torch.manual_seed(1)
    a = nn.Conv2d(3, 4, 3, padding=1)
    b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(2, 3, 8, 8)
    ref = b(torch.relu(a(x)))
    s = equalize_pair(a, b)
    torch.testing.assert_close(b(torch.relu(a(x))), ref, rtol=1e-5, atol=1e-5)
    r1 = a.weight.abs().reshape(4, -1).amax(1)
    r2 = b.weight.abs().reshape(4, -1).amax(1)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)
    assert s.shape == (4,)


def test_exact_scales_formula():
    a, b = nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[4.0, -1.0], [0.0, 0.0], [0.5, 0.25]]))
        b.weight.copy_(torch.tensor([[1.0, 2.0, -8.0]]))
    s = equalization_scales(a, b)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 0.25]))  # sqrt(4/1); dead channel -> 1; sqrt(0.5/8)


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Linear"):
        equalize_pair(nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="3 output channels but second takes 4"):
        equalize_pair(nn.Linear(2, 3), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="groups=2"):
        equalize_pair(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="fold BatchNorm first"):
        equalize_model(SmallCNN().eval())
    with pytest.raises(ValueError, match="at least two"):
        equalize_chain([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="scales must be 3 positive"):
        equalize_pair(nn.Linear(2, 3), nn.Linear(3, 2), scales=torch.tensor([1.0, -1.0, 1.0]))
