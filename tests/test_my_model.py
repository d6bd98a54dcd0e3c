"""notebooks/my_model.py: the capstone's user-style model and data file (notebook 10)."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "notebooks" / "my_model.py"


@pytest.fixture(scope="module")
def my_model():
    spec = importlib.util.spec_from_file_location("my_model", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet20_has_he_et_al_size_and_shapes(my_model):
    torch.manual_seed(0)
    net = my_model.resnet20().eval()
    n = sum(p.numel() for p in net.parameters())
    assert 0.26e6 < n < 0.28e6  # "0.27M" in He et al. 2016, table 6 (ten classes, three input channels)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 19
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert my_model.resnet20_rgb()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="n \\(blocks per stage\\) must be a positive int, got 0"):
        my_model.ResNetCIFAR(0)


def test_option_a_shortcut_subsamples_and_pads_with_zeros(my_model):
    block = my_model.BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])  # the old channels in the middle, unchanged
    assert not s[:, :8].any() and not s[:, 24:].any()
    same = my_model.BasicBlock(16, 16)
    assert same.shortcut(x) is x


def test_residual_add_exports_as_an_add_op(my_model):
    net = my_model.resnet20().eval()
    graph = torch.export.export(net, (torch.randn(2, 1, 28, 28),)).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in
            (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)]
    assert len(adds) == 9  # one per basic block: PT2E sees them as operators, no FloatFunctional needed


def test_resnet18_cifar_stem(my_model):
    net = my_model.resnet18_cifar().eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_synthetic_is_deterministic_balanced_and_learnable(my_model):
    train, test = my_model.cifar_synthetic(n_train=200, n_test=100)
    again, _ = my_model.cifar_synthetic(n_train=200, n_test=100)
    x, y = train.tensors
    assert x.shape == (200, 3, 32, 32) and torch.equal(x, again.tensors[0])
    assert torch.bincount(y).tolist() == [20] * 10
    # the classes are separable: nearest class mean on the training images classifies most test images
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    xt, yt = test.tensors
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_mnist5k_pairs(my_model):
    train, test = my_model.mnist5k()
    x, y = train[0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.int64
    assert (len(train), len(test)) == (4000, 1000)


def test_cifar10_without_the_files_says_where(my_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 is not in"):
        my_model.cifar10(str(tmp_path))


@pytest.mark.notebook
def test_gpu_command_code_path_on_synthetic_cifar(tmp_path, monkeypatch):
    """Notebook 10's ResNet-18 / CIFAR-10 command, with the data callable swapped for synthetic
    CIFAR-shaped data and a few steps on the CPU: the same train_qat code path end to end."""
    from qatlab import train_qat

    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path / "build"))
    # a user-style data file of its own: cifar_synthetic with fewer images (the evaluation of ResNet-18
    # on the default 256 test images is most of this test's time on one thread)
    data = tmp_path / "small_cifar.py"
    data.write_text("import importlib.util\n"
                    f"spec = importlib.util.spec_from_file_location('my_model_copy', {str(PATH)!r})\n"
                    "my_model = importlib.util.module_from_spec(spec)\n"
                    "spec.loader.exec_module(my_model)\n\n\n"
                    "def small():\n"
                    "    return my_model.cifar_synthetic(n_train=64, n_test=32)\n")
    metrics = train_qat.main(["--model", f"{PATH}:resnet18_cifar", "--data", f"{data}:small",
                              "--api", "pt2e", "--device", "cpu", "--steps", "4", "--global-batch-size", "16",
                              "--calib-batches", "1", "--no-pte", "--no-progress", "--threads", "1",
                              "--out", str(tmp_path / "r18")])
    assert (tmp_path / "r18" / "metrics.json").exists()
    for key in ("qat_fake_quant_acc", "ptq_int8_acc"):
        value = metrics.get(key)
        assert value is not None and 0.0 <= value <= 100.0, (key, value)
    assert metrics["int8_top1_agreement_vs_fake_quant"] > 50.0
