"""Bias correction (qatlab.bias_correction): the mean output shift of rounded weights is removed."""

import math

import pytest
import torch
from torch import nn

from qatlab import ptq
from qatlab.bias_correction import (
    apply_analytic_bias_correction,
    apply_empirical_bias_correction,
    bn_input_means,
    mean_shift,
    relu_gaussian_mean,
)
from qatlab.fusion import fold_model_bn
from qatlab.models import TinyMobileNet


def test_relu_gaussian_mean_matches_sampling_and_scipy():
    from scipy import stats

    mu, sigma = torch.tensor([-1.0, 0.0, 0.7, 3.0]), torch.tensor([0.5, 1.0, 2.0, 0.1])
    got = relu_gaussian_mean(mu, sigma)
    want = [stats.truncnorm.mean(-m / s, math.inf, loc=m, scale=s) * stats.norm.sf(-m / s) for m, s in
            zip(mu.tolist(), sigma.tolist())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 4, generator=g) * sigma + mu
    torch.testing.assert_close(got, z.clamp(min=0).mean(0), rtol=0, atol=0.01)
    assert relu_gaussian_mean(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])).tolist() == [2.0, 0.0]


@pytest.mark.parametrize("groups", [1, 4])
def test_mean_shift_equals_mean_conv_output_without_padding(groups):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 4, 3, groups=groups)
    eps = torch.randn_like(layer.weight) * 0.01
    # images constant over space (one value per image and channel): no border effect, the identity is exact
    x = (torch.rand(64, 4, 1, 1) + torch.arange(4.0).reshape(1, 4, 1, 1)).expand(64, 4, 9, 9)
    direct = nn.functional.conv2d(x, eps, None, groups=groups).mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean_shift(layer, eps, x.mean(dim=(0, 2, 3))), direct, rtol=1e-4, atol=1e-6)


def test_empirical_correction_zeroes_the_mean_error_of_the_first_layer():
    torch.manual_seed(0)
    fp = fold_model_bn(TinyMobileNet().eval())
    q = ptq.clone(fp)
    ptq.quantize_weights(q, 3, "per_tensor")
    x = torch.rand(32, 1, 28, 28)
    first = ptq.weight_layers(fp)[1][0]  # the second layer: its input is a ReLU output
    apply_empirical_bias_correction(fp, q, x)
    # with the earlier layers corrected, the second layer's mean error on the same images, given the
    # quantized network's own inputs, is zero per channel
    ins = []
    h = q.get_submodule(first).register_forward_pre_hook(lambda m, a: ins.append(a[0]))
    with torch.no_grad():
        q(x)
    h.remove()
    layer_q, layer_f = q.get_submodule(first), fp.get_submodule(first)
    with torch.no_grad():
        err = layer_q(ins[0]) - nn.functional.conv2d(ins[0], layer_f.weight, layer_f.bias, layer_q.stride,
                                                     layer_q.padding, layer_q.dilation, layer_q.groups)
    mean_err = err.mean(dim=(0, 2, 3))
    assert mean_err.abs().max().item() < 1e-4 * (1 + err.abs().max().item())


def test_analytic_correction_uses_bn_statistics():
    torch.manual_seed(0)
    net = TinyMobileNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data = torch.rand(m.num_features) + 0.5  # positive pre-activations: E[x] far from 0
    fp = fold_model_bn(net)
    means = bn_input_means(net, fp)
    names = [n for n, _ in ptq.weight_layers(fp)]
    assert names[0] not in means and set(means) == set(names[1:])
    q = ptq.clone(fp)
    ptq.quantize_weights(q, 3, "per_tensor")
    before = {n: q.get_submodule(n).bias.detach().clone() for n in means}
    shifts = apply_analytic_bias_correction(fp, q, means)
    for n, s in shifts.items():
        torch.testing.assert_close(q.get_submodule(n).bias, before[n] - s)
        eps = q.get_submodule(n).weight - fp.get_submodule(n).weight
        torch.testing.assert_close(s, mean_shift(q.get_submodule(n), eps, means[n]))
