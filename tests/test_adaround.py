"""AdaRound (qatlab.adaround): codes on the floor/ceiling grid, output error below round-to-nearest."""

import pytest
import torch
from torch import nn

from qatlab import ptq
from qatlab.adaround import (
    adaround_layer,
    apply_adaround,
    beta_schedule,
    init_v,
    output_error,
    rectified_sigmoid,
    rounding_regularizer,
)
from qatlab.fusion import fold_model_bn
from qatlab.models import SmallCNN
from qatlab.quant import fake_quantize


def test_rectified_sigmoid_and_regularizer():
    v = torch.tensor([-100.0, -2.0, 0.0, 2.0, 100.0])
    h = rectified_sigmoid(v)
    assert h[0] == 0 and h[-1] == 1 and h[2] == 0.5
    assert rounding_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0) == 0
    assert rounding_regularizer(torch.tensor([0.5]), 20.0) == 1
    # init: h(V) is the fractional part of W/s, so the soft weight starts at W
    ws = torch.tensor([-2.3, 0.1, 0.5, 3.95])
    torch.testing.assert_close(torch.floor(ws) + rectified_sigmoid(init_v(ws)), ws, rtol=0, atol=1e-5)
    assert beta_schedule(0, 100) is None and beta_schedule(20, 100) == 20.0 and beta_schedule(99, 100) == 2.0


def test_layer_codes_on_floor_or_ceiling_and_error_below_rtn():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(64, 4, 8, 8).clamp(min=0)
    with torch.no_grad():
        target = layer(x)
    scale, zp, qmin, qmax, axis = ptq.weight_qparams(layer.weight, 3, "per_channel")
    codes, floor, w_hat, losses = adaround_layer(layer, x, target, scale, qmin, qmax, iters=200, seed=0)
    d = codes - floor
    assert bool(((d == 0) | (d == 1)).all()) and bool((codes >= qmin).all()) and bool((codes <= qmax).all())
    torch.testing.assert_close(w_hat, codes * scale.reshape(-1, 1, 1, 1), rtol=0, atol=0)
    rtn = fake_quantize(layer.weight.detach(), scale, zp, qmin, qmax, axis=axis)
    assert output_error(layer, x, target, w_hat) < output_error(layer, x, target, rtn)
    assert len(losses) == 200


def test_apply_adaround_on_a_network():
    torch.manual_seed(0)
    fp = fold_model_bn(SmallCNN().eval())
    q = ptq.clone(fp)
    x = torch.rand(32, 1, 28, 28)
    report = apply_adaround(fp, q, x, 3, "per_tensor", iters=30, seed=0)
    assert list(report) == [n for n, _ in ptq.weight_layers(fp)]
    assert all(r["on_grid"] for r in report.values())
    for name, layer in ptq.weight_layers(q):  # every weight is now a code times its scale
        scale = ptq.weight_qparams(fp.get_submodule(name).weight, 3, "per_tensor")[0]
        k = layer.weight / scale
        torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-4)


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Linear"):
        adaround_layer(nn.ReLU(), torch.zeros(1), torch.zeros(1), 1.0, -4, 3)
    with pytest.raises(ValueError, match="iters"):
        adaround_layer(nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, 2), 1.0, -4, 3, iters=0)
    with pytest.raises(ValueError, match="same images"):
        adaround_layer(nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(2, 2), 1.0, -4, 3)
