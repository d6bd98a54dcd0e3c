"""The small quantizable CNN that every notebook shares.

Taught in 00_start_here; fused in 03_fusion; quantized in 04 and 05.

``SmallCNN`` is written the way torch's eager quantization wants a model:
``QuantStub`` → three conv-BN-ReLU blocks → average pool to 4×4 → ``Linear``
→ ``DeQuantStub``. Each block is an ``nn.Sequential`` named ``0, 1, 2``, so
``fuse_model`` can fuse ``["0", "1", "2"]`` into one ``ConvReLU2d``.
"""

import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub


def conv_bn_relu(in_ch, out_ch, stride=1, groups=1):
    """``Conv2d(3x3, no bias) → BatchNorm2d → ReLU`` as an ``nn.Sequential``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """A ~34k-parameter CNN for 1×28×28 digits (any H, W ≥ 4 works).

    >>> model = SmallCNN()
    >>> model(*model.example_inputs()).shape
    torch.Size([1, 10])
    >>> sum(p.numel() for p in model.parameters())
    33658
    """

    def __init__(self, in_channels=1, num_classes=10, widths=(16, 32, 64), input_size=28):
        super().__init__()
        if len(widths) != 3 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"widths must be three positive ints, got {widths!r}")
        self.in_channels, self.input_size = in_channels, input_size
        self.quant = QuantStub()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, widths[0]),
            conv_bn_relu(widths[0], widths[1], stride=2),
            conv_bn_relu(widths[1], widths[2], stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[2] * 16, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.features(x)
        x = self.flatten(self.pool(x))
        x = self.fc(x)
        return self.dequant(x)

    def example_inputs(self, batch_size=1):
        """A tuple of inputs for ``torch.export`` and tracing: ``(randn(B, C, H, W),)``."""
        s = self.input_size
        return (torch.randn(batch_size, self.in_channels, s, s),)

    def fuse_model(self, is_qat):
        """Fuse each conv-BN-ReLU block in place and return ``self``.

        ``is_qat=False`` (eval mode): BN is folded into the conv weights
        (``fuse_modules``). ``is_qat=True`` (train mode): conv, BN and ReLU are
        grouped into one ``ConvBnReLU2d`` that keeps BN alive for training
        (``fuse_modules_qat``).
        """
        from torch.ao.quantization import fuse_modules, fuse_modules_qat

        if not isinstance(is_qat, bool):
            raise TypeError(f"is_qat must be a bool, got {is_qat!r}")
        if is_qat and not self.training:
            raise ValueError("fuse_model(is_qat=True) needs train mode: call model.train() first")
        if not is_qat and self.training:
            raise ValueError("fuse_model(is_qat=False) needs eval mode: call model.eval() first")
        fuse = fuse_modules_qat if is_qat else fuse_modules
        for block in self.features:
            fuse(block, ["0", "1", "2"], inplace=True)
        return self
