"""A user's model and data for ``python -m qatlab.train_qat --model FILE.py:CALLABLE --data FILE.py:CALLABLE``.

Loaded by path in tests/test_train_qat_user.py, never imported as a package module. The model
has what QAT on a real network meets: residual adds (one after a BN without ReLU), a
concatenation, max and average pooling, and conv-BN(-ReLU) blocks. The data are synthetic
(4 classes: which quadrant of a 3x16x16 image is bright), so a few steps learn them.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def conv_bn(cin, cout, k, relu=True):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class ResidualNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.branch_a = conv_bn(8, 8, 3)
        self.branch_b = conv_bn(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = conv_bn(16, 16, 3, relu=False)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch_a(x)                        # residual add
        x = torch.cat([x, self.branch_b(x)], dim=1)     # concatenation
        x = self.pool(x)                                # max pooling
        x = torch.relu(self.head(x) + x)                # add after a BN without ReLU
        return self.fc(torch.flatten(self.avg(x), 1))   # average pooling


def residual_net():
    torch.manual_seed(0)
    return ResidualNet()


def quadrants(n_train=256, n_test=128, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.3 * torch.randn(n, channels, size, size, generator=g)
        h = size // 2
        for i, c in enumerate(y.tolist()):
            r, col = divmod(c, 2)
            x[i, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 1.0
        return TensorDataset(x, y)

    return make(n_train), make(n_test)


# --- wrong specs, one per mistake ---------------------------------------------------------------

NOT_CALLABLE = 3


def returns_int():
    return 3


def gray_quadrants():
    """1-channel images: the 3-channel stem refuses them."""
    return quadrants(channels=1)


def one_dataset():
    return quadrants()[0]


def triples():
    train, test = quadrants()
    return [(x, y, 0) for x, y in train], [(x, y, 0) for x, y in test]


def images_only():
    train, test = quadrants()
    return [x for x, _ in train], [x for x, _ in test]


def mnist_like(n_train=128, n_test=64, seed=0):
    """1x28x28 inputs, 10 classes: what qatlab.models:SmallCNN (which has fuse_model) takes."""
    g = torch.Generator().manual_seed(seed)
    return tuple(TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
                 for n in (n_train, n_test))
