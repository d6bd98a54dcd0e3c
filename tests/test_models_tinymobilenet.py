"""TinyMobileNet (notebook 06): shapes, fusion, eager QAT and convert, cached checkpoint."""

import copy
import warnings

import pytest
import torch
from torch.ao.nn.intrinsic import ConvBnReLU2d, ConvReLU2d

import qatlab
from qatlab import baseline
from qatlab import sensitivity as sens


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        yield


def _warmed(seed=0):
    """A TinyMobileNet with non-trivial BN running statistics, in eval mode."""
    torch.manual_seed(seed)
    m = qatlab.TinyMobileNet()
    m.train()
    m(torch.randn(32, 1, 28, 28))
    return m.eval()


def test_shapes_parameters_and_depthwise_blocks():
    m = qatlab.TinyMobileNet()
    (x,) = m.example_inputs(batch_size=3)
    assert m(x).shape == (3, 10)
    assert 5_000 < sum(p.numel() for p in m.parameters()) < 20_000
    blocks = m.conv_blocks()
    assert len(blocks) == 1 + 2 * (len(m.features) - 1) and len(m.features) == 3
    dw = blocks[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
    small = qatlab.TinyMobileNet(input_size=8).eval()
    assert small(*small.example_inputs()).shape == (1, 10)
    with pytest.raises(ValueError, match="widths"):
        qatlab.TinyMobileNet(widths=(16,))
    with pytest.raises(ValueError, match="widths"):
        qatlab.TinyMobileNet(widths=(16, 0))


def test_fuse_eval_is_exact_up_to_roundoff_and_checks_mode():
    m = _warmed()
    x = torch.randn(4, 1, 28, 28)
    ref = m(x)
    m.fuse_model(is_qat=False)
    assert all(isinstance(b[0], ConvReLU2d) for b in m.conv_blocks())
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        qatlab.TinyMobileNet().train().fuse_model(is_qat=False)
    with pytest.raises(ValueError, match="train mode"):
        qatlab.TinyMobileNet().eval().fuse_model(is_qat=True)
    with pytest.raises(TypeError, match="'yes'"):
        qatlab.TinyMobileNet().fuse_model(is_qat="yes")


def test_fuse_qat_keeps_bn():
    m = qatlab.TinyMobileNet().train().fuse_model(is_qat=True)
    assert all(isinstance(b[0], ConvBnReLU2d) for b in m.conv_blocks())


def test_eager_qat_trains_and_converts_to_int8():
    m = sens.prepare_mixed_qat(_warmed(), 8, 8, reduce_range=True)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    sens.finetune_steps(m, data, steps=2, lr=0.01)
    sens.calibrate(m, data, 1)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        fake = m(x)
    q = torch.ao.quantization.convert(copy.deepcopy(m))
    out = q(x)
    assert out.shape == (4, 10) and q.features[1][0][0]._get_name() == "QuantizedConvReLU2d"
    assert (out - fake).abs().max() < 0.5 * fake.abs().max()


@pytest.fixture
def one_epoch_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    monkeypatch.setitem(baseline.RECIPES["tinymobilenet"], "epochs", 1)
    monkeypatch.setitem(baseline.RECIPES["tinymobilenet"], "dataset", "digits")  # 8x8: trains in a blink
    return tmp_path


def test_checkpoint_is_trained_once_then_cached(one_epoch_recipe):
    path = baseline.checkpoint_path("tinymobilenet")
    assert path == one_epoch_recipe / "checkpoints" / "tinymobilenet.pt"
    with pytest.warns(UserWarning, match="no tinymobilenet checkpoint"):
        first = qatlab.load_baseline(model="tinymobilenet")
    assert path.exists() and isinstance(first, qatlab.TinyMobileNet)
    stamp = path.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        second = qatlab.load_baseline(model="tinymobilenet")
    assert path.stat().st_mtime_ns == stamp and not second.training
    assert second.baseline_meta["model"] == "tinymobilenet" and second.baseline_meta["epochs"] == 1
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="06_when_qat_pays_off"):
        qatlab.load_baseline(path=one_epoch_recipe / "missing.pt", train_if_missing=False, model="tinymobilenet")


def test_corrupt_checkpoint_is_retrained_with_a_warning(one_epoch_recipe):
    path = baseline.checkpoint_path("tinymobilenet")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        qatlab.load_baseline(train_if_missing=False, model="tinymobilenet")
    with pytest.warns(UserWarning, match="corrupt or not a tinymobilenet"):
        net = qatlab.load_baseline(model="tinymobilenet")
    assert isinstance(net, qatlab.TinyMobileNet)
    assert torch.load(path, weights_only=True)["meta"]["model"] == "tinymobilenet"
    # a SmallCNN's weights in the TinyMobileNet file are "not a tinymobilenet": retrained too
    baseline.save_checkpoint(qatlab.SmallCNN(), path, model="smallcnn")
    with pytest.warns(UserWarning, match="not a tinymobilenet"):
        qatlab.load_baseline(model="tinymobilenet")
