"""Your own model and data, as ``python -m qatlab.train_qat`` takes them (notebook 10).

This file stands for the one you would write for your own project: it lives outside
``qatlab`` and imports nothing from it except the course's offline dataset. Two kinds of
callables:

- a **model** callable returns a fresh ``nn.Module`` (untrained, in train mode);
- a **data** callable returns ``(train_dataset, test_dataset)``, each a dataset of
  ``(input, label)`` pairs (anything a ``DataLoader`` takes).

Pass them as ``MODULE:CALLABLE``, where MODULE is a module name or a path to this file::

    python -m qatlab.train_qat --model notebooks/my_model.py:resnet20 \\
        --data notebooks/my_model.py:mnist5k --out build/my_qat

The capstone model is **ResNet-20**, the CIFAR ResNet of He et al., "Deep Residual Learning
for Image Recognition" (CVPR 2016, section 4.2): a 3×3 stem, three stages of three basic
blocks with 16, 32 and 64 channels, global average pooling and one linear layer; the
shortcuts that change shape subsample and pad with zero channels (the paper's option A), so
the net has 0.27 M parameters. It is the CIFAR-10 model of PACT's low-bit tables (Choi et al.,
2018) and of many QAT papers since. The residual add is a
plain ``+``: the PT2E flow (``torch.export`` → ``prepare_qat_pt2e``) sees it as an ``add`` op
and quantizes it; torch's legacy eager API would need ``FloatFunctional`` there.

For a GPU with the real CIFAR-10 in a local folder, :func:`resnet18_cifar` and
:func:`cifar10` are torchvision's ResNet-18 and dataset (see notebook 10 for the command);
:func:`cifar_synthetic` is small CIFAR-shaped data that exercises the same code on any machine.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    When the block halves the size and doubles the channels, the shortcut takes every
    second pixel and pads the new channels with zeros (option A of He et al. 2016): no weights.
    """

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.stride, self.pad = stride, out_ch - in_ch

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """The CIFAR ResNet family of He et al. 2016: depth ``6 n + 2`` (n = 3 gives ResNet-20)."""

    def __init__(self, n=3, in_channels=1, num_classes=10, widths=(16, 32, 64)):
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n (blocks per stage) must be a positive int, got {n!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, in_ch = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(in_ch, width, stride=2 if stage > 0 and i == 0 else 1))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(in_channels=1, num_classes=10):
    """ResNet-20 (3 stages × 3 basic blocks) for ``in_channels`` × H × W images."""
    return ResNetCIFAR(3, in_channels, num_classes)


def resnet20_rgb():
    """ResNet-20 for 3-channel (CIFAR-shaped) images."""
    return resnet20(in_channels=3)


def resnet18_cifar(num_classes=10):
    """torchvision's ResNet-18 adapted to 32×32 images: a 3×3 stride-1 stem and no max pool.

    (The usual CIFAR adaptation: the ImageNet stem, a 7×7 stride-2 conv and a stride-2 max
    pool, would shrink a 32×32 image to 8×8 before the first block.) torchvision's blocks add
    their shortcut in place (``out += identity``); ``torch.export`` turns that into an ``add``.
    """
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


class _Tensors(torch.utils.data.TensorDataset):
    """A ``TensorDataset`` of ``(image, label)`` pairs that shows its size."""

    def __repr__(self):
        x, y = self.tensors
        return f"{len(y)} images of {tuple(x.shape[1:])}"


def mnist5k():
    """The course's offline data: 4,000 training and 1,000 test MNIST digits, 1×28×28, normalized."""
    from qatlab.data import load_dataset

    d = load_dataset("mnist5k")
    return _Tensors(d.x_train, d.y_train), _Tensors(d.x_test, d.y_test)


def cifar_synthetic(n_train=512, n_test=256, seed=0):
    """Small CIFAR-shaped data (3×32×32, 10 classes) that a network can learn: each class is a
    fixed random low-frequency color pattern, each image that pattern plus noise.

    For testing the CIFAR code path on a machine without CIFAR-10; not a benchmark.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=32, mode="bilinear",
                             align_corners=False)

    def split(n):
        y = torch.arange(n) % 10
        x = patterns[y] + 0.8 * torch.randn(n, 3, 32, 32, generator=g)
        return _Tensors(x, y)

    return split(n_train), split(n_test)


def cifar10(root=None):
    """torchvision's CIFAR-10 from a local folder (``root``, or ``$CIFAR10_ROOT``, default ``./data``),
    normalized per channel; training images randomly cropped (padding 4) and flipped.

    Nothing is downloaded: put ``cifar-10-batches-py`` in the folder first.
    """
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    root = root or os.environ.get("CIFAR10_ROOT", "./data")
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    try:
        return (tvd.CIFAR10(root, train=True, transform=train_tf, download=False),
                tvd.CIFAR10(root, train=False, transform=test_tf, download=False))
    except RuntimeError as e:
        raise FileNotFoundError(f"CIFAR-10 is not in {os.path.abspath(root)} ({e}); copy "
                                f"cifar-10-batches-py there or set CIFAR10_ROOT") from None
