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
def test_the_block_changes_no_model_bit_for_bit(spec, shape, one_thread, tmp_path, monkeypatch):
    """Without the block; with it on an empty disk cache (export, write); with it again in a fresh
    process's state (load every graph from disk): the same models, bit for bit."""
    net = load_callable(spec)()
    plain = prepare_train_convert(net, shape, use_cache=False)
    monkeypatch.setenv("QATLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(patterns, "_PATTERNS", {})
    exported = prepare_train_convert(net, shape, use_cache=True)
    files = sorted((tmp_path / "patterns").glob("*.pt2"))
    assert len(files) == len(patterns._PATTERNS) > 10
    stamps = [f.stat().st_mtime_ns for f in files]
    monkeypatch.setattr(patterns, "_PATTERNS", {})   # a new process: nothing in memory
    real_export, exports = torch.export.export, []
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(a[0]) or real_export(*a, **k))
    loaded = prepare_train_convert(net, shape, use_cache=True)
    assert exports == [] or all(isinstance(m, nn.Module) and not hasattr(m, "fn") for m in exports)
    assert [f.stat().st_mtime_ns for f in files] == stamps   # read, not written again
    for fast in (exported, loaded):
        for a, b in zip(plain, fast):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:
                assert a.code == b.code
                sa, sb = a.state_dict(), b.state_dict()
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def export_pattern(pattern, example_inputs):
    """torchao's exporter of one pattern function (wrapped in a module, as torchao does), inside the block."""
    from torchao.quantization.pt2e import utils as pt2e_utils
    from torchao.quantization.pt2e.export_utils import WrapperModule

    with patterns.pattern_cache():
        return pt2e_utils._get_aten_graph_module_for_pattern(WrapperModule(pattern), example_inputs)


def scaled_relu(x, w):
    return nn.functional.relu(x) * w


def test_a_damaged_file_is_exported_and_written_again(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(patterns, "_PATTERNS", {})
    example = (torch.randn(2, 3), torch.randn(3))
    first = export_pattern(scaled_relu, example)
    [file] = (tmp_path / "patterns").glob("*.pt2")
    file.write_bytes(b"half a file")
    monkeypatch.setattr(patterns, "_PATTERNS", {})
    again = export_pattern(scaled_relu, example)
    assert again.code == first.code
    assert file.read_bytes()[:2] == b"PK"   # a whole program (a zip archive) again
    assert not [p for p in file.parent.iterdir() if p.name.endswith(".tmp")]   # no temporary file left


def test_a_closure_without_a_stable_description_stays_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(patterns, "_PATTERNS", {})
    token = object()   # its repr holds an address: another process would name it differently

    def pattern(x):
        assert token is not None
        return x + 1

    export_pattern(pattern, (torch.randn(2),))
    assert len(patterns._PATTERNS) == 1
    assert not (tmp_path / "patterns").exists() or not list((tmp_path / "patterns").iterdir())


KEY_OF_A_TORCHAO_PATTERN = """
import torch
from torchao.quantization.pt2e import qat_utils
from qatlab import patterns
pattern = qat_utils._get_qat_conv_bn_pattern(torch.nn.functional.conv2d)
example = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), torch.randn(1))
print(patterns.pattern_file_key(patterns.pattern_key(pattern, example, False, {})))
"""


def test_a_patterns_file_name_is_the_same_in_every_process():
    """No address, no salted hash: two processes name torchao's conv-BN pattern alike, and a
    change of the pattern's closure (another conv function) changes the name."""
    import subprocess
    import sys

    there = subprocess.run([sys.executable, "-c", KEY_OF_A_TORCHAO_PATTERN], capture_output=True, text=True,
                           check=True).stdout.strip()
    from torchao.quantization.pt2e import qat_utils

    here = patterns.pattern_file_key(patterns.pattern_key(
        qat_utils._get_qat_conv_bn_pattern(nn.functional.conv2d),
        (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), torch.randn(1)), False, {}))
    other = patterns.pattern_file_key(patterns.pattern_key(
        qat_utils._get_qat_conv_bn_pattern(nn.functional.conv1d),
        (torch.randn(1, 1, 3), torch.randn(1, 1, 1), torch.randn(1)), False, {}))
    assert there == here and len(here) == 64 and other != here


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
