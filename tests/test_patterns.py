"""qatlab.patterns: cached pattern graphs and skipped conv kinds change no prepared or converted model."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from qatlab import conversion, patterns
from qatlab.user_spec import load_callable

FIXTURE = Path(__file__).with_name("user_model_fixture.py")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prepare_train_convert(net, shape, use_cache):
    """torchao's own prepare_qat_pt2e -> 3 SGD steps -> eval -> convert_pt2e, inside the block or not."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    block = patterns.pattern_cache if use_cache else __import__("contextlib").nullcontext
    torch.manual_seed(0)
    x = torch.randn(8, *shape)
    y = torch.randint(0, 4, (8,))
    with warnings.catch_warnings(), block():
        warnings.simplefilter("ignore")
        exported = torch.export.export(copy.deepcopy(net).train(), (torch.zeros(2, *shape),),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        prepared = prepare_qat_pt2e(exported, conversion.xnnpack_quantizer(True, 4))
        move_exported_model_to_train(prepared)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            loss = nn.functional.cross_entropy(prepared(x)[:, :4], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        move_exported_model_to_eval(prepared)
        with torch.no_grad():
            fake = prepared(x)
        converted = convert_pt2e(prepared)
        with torch.no_grad():
            out = converted(x)
    return prepared, converted, fake, out


@pytest.mark.parametrize("spec, shape", [(f"{FIXTURE}:residual_net", (3, 16, 16))])
def test_the_block_changes_no_model_bit_for_bit(spec, shape, one_thread):
    net = load_callable(spec)()
    plain = prepare_train_convert(net, shape, use_cache=False)
    before = len(patterns._PATTERNS)
    fast = prepare_train_convert(net, shape, use_cache=True)
    assert len(patterns._PATTERNS) >= before
    for a, b in zip(plain, fast):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a.code == b.code
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_second_prepare_exports_no_pattern(one_thread):
    net = load_callable(f"{FIXTURE}:residual_net")()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = conversion.prepare_pt2e(copy.deepcopy(net).train(), (3, 16, 16), weight_bits=4)
        cached = len(patterns._PATTERNS)
        b = conversion.prepare_pt2e(copy.deepcopy(net).train(), (3, 16, 16), weight_bits=4)
    assert cached > 0 and len(patterns._PATTERNS) == cached
    assert a.code == b.code


def test_conv_kinds_and_the_skip():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3)
            self.b = nn.ConvTranspose2d(2, 2, 2)

        def forward(self, x):
            return self.b(self.a(x))

    gm = torch.export.export(Net(), (torch.zeros(1, 1, 6, 6),)).module()
    assert patterns.conv_kinds(gm) == {"conv2d", "conv_transpose2d"}
    calls = []
    run = patterns._skipping_absent_kinds(lambda m, fn, ex, is_cuda: calls.append(fn.__name__) or m)
    for fn in (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv_transpose1d,
               nn.functional.conv_transpose2d):
        assert run(gm, fn, (), is_cuda=False) is gm
    assert calls == ["conv2d", "conv_transpose2d"]


def test_the_block_restores_torchao_and_nests():
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import utils as pt2e_utils

    before = (pt2e_utils._get_aten_graph_module_for_pattern, qat_utils._fold_conv_bn_qat_helper)
    with patterns.pattern_cache():
        inner = pt2e_utils._get_aten_graph_module_for_pattern
        assert inner is not before[0] and qat_utils._get_aten_graph_module_for_pattern is inner
        with patterns.pattern_cache():
            assert pt2e_utils._get_aten_graph_module_for_pattern is inner
        assert pt2e_utils._get_aten_graph_module_for_pattern is inner
    assert (pt2e_utils._get_aten_graph_module_for_pattern, qat_utils._fold_conv_bn_qat_helper) == before
