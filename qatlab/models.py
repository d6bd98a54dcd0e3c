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


# --- a quantization-fragile model: depthwise-separable convolutions (06_when_qat_pays_off) ---

def dw_separable(in_ch, out_ch, stride=1):
    """Depthwise 3×3 conv-BN-ReLU then pointwise 1×1 conv-BN-ReLU, as in MobileNet (v1).

    Returns ``nn.Sequential(depthwise_block, pointwise_block)``; each block is
    ``Sequential(conv, bn, relu)`` named ``0, 1, 2``, fusable like SmallCNN's.
    """
    return nn.Sequential(
        conv_bn_relu(in_ch, in_ch, stride=stride, groups=in_ch),
        nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()),
    )


class TinyMobileNet(nn.Module):
    """A ~11k-parameter depthwise-separable CNN (MobileNet-style) for 1×28×28 digits.

    A 3×3 conv-BN-ReLU stem (stride 2) with ``widths[0]`` channels, then one
    depthwise-separable block per later width (stride 2, the last one stride 1),
    average pool and ``Linear``. Depthwise convs give every channel its own 3×3
    filter; after BN folding (``w · γ / sqrt(var + ε)``, roughly ``γ`` over the
    spread of that channel's *input*) their ranges differ several-fold between
    channels: the classic case where per-tensor weight quantization breaks
    (Krishnamoorthi 2018, arXiv:1806.08342): at 4 bits a per-tensor scale
    costs this net many points of accuracy, a per-channel one about one point
    (06_when_qat_pays_off measures both). Taught in 06_when_qat_pays_off.

    >>> model = TinyMobileNet()
    >>> model(*model.example_inputs()).shape
    torch.Size([1, 10])
    >>> sum(p.numel() for p in model.parameters())
    10890
    """

    def __init__(self, in_channels=1, num_classes=10, widths=(32, 64, 96), input_size=28):
        super().__init__()
        if len(widths) < 2 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"widths must be at least two positive ints, got {widths!r}")
        self.in_channels, self.input_size = in_channels, input_size
        self.quant = QuantStub()
        blocks = [conv_bn_relu(in_channels, widths[0], stride=2)]
        for a, b in zip(widths[:-1], widths[1:]):
            blocks.append(dw_separable(a, b, stride=2 if b != widths[-1] else 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.features(x)
        x = self.fc(self.flatten(self.pool(x)))
        return self.dequant(x)

    def example_inputs(self, batch_size=1):
        """A tuple of inputs for ``torch.export`` and tracing: ``(randn(B, C, H, W),)``."""
        s = self.input_size
        return (torch.randn(batch_size, self.in_channels, s, s),)

    def conv_blocks(self):
        """Every ``Sequential(conv, bn, relu)`` block, in order (stem, then dw/pw pairs)."""
        out = [self.features[0]]
        for pair in self.features[1:]:
            out.extend(pair)
        return out

    def fuse_model(self, is_qat):
        """Fuse every conv-BN-ReLU block in place (see :meth:`SmallCNN.fuse_model`); return ``self``."""
        from torch.ao.quantization import fuse_modules, fuse_modules_qat

        if not isinstance(is_qat, bool):
            raise TypeError(f"is_qat must be a bool, got {is_qat!r}")
        if is_qat and not self.training:
            raise ValueError("fuse_model(is_qat=True) needs train mode: call model.train() first")
        if not is_qat and self.training:
            raise ValueError("fuse_model(is_qat=False) needs eval mode: call model.eval() first")
        fuse = fuse_modules_qat if is_qat else fuse_modules
        for block in self.conv_blocks():
            fuse(block, ["0", "1", "2"], inplace=True)
        return self


# --- a small vision transformer with explicit Linear layers (07_qat_transformers) ---

class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    Every weight lives in an explicit ``nn.Linear`` (``qkv``, ``proj``, ``fc1``,
    ``fc2``), which is what torchao's ``quantize_`` swaps; ``nn.MultiheadAttention``
    keeps its input projection in a bare parameter that ``quantize_`` does not
    see. Attention is written out as two ``torch.bmm`` and a softmax (rather
    than ``F.scaled_dot_product_attention``, whose exported graph carries
    masking ops XNNPACK does not take), so ExecuTorch can delegate all of it.
    Taught in 07_qat_transformers.
    """

    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads

        def split_heads(z):  # (b, t, d) -> (b * heads, t, d / heads)
            return z.reshape(b, t, h, dh).permute(0, 2, 1, 3).reshape(b * h, t, dh)

        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        scores = torch.bmm(split_heads(q), split_heads(k).transpose(1, 2)) * dh ** -0.5
        a = torch.bmm(scores.softmax(dim=-1), split_heads(v))
        x = x + self.proj(a.reshape(b, h, t, dh).permute(0, 2, 1, 3).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """A ~72k-parameter vision transformer for 1×28×28 digits.

    7×7 patches → 16 tokens → ``Linear`` patch embedding (49 → ``dim``) plus a
    learned position embedding → ``depth`` pre-norm blocks → LayerNorm → mean
    over tokens → ``Linear`` head. Every matmul with a weight is an
    ``nn.Linear``; the patch embedding's ``in_features`` (49) is deliberately
    not a multiple of the usual group sizes. Taught in 07_qat_transformers.

    >>> model = TinyViT()
    >>> model(*model.example_inputs()).shape
    torch.Size([1, 10])
    >>> sum(p.numel() for p in model.parameters()), model.embed.in_features
    (71946, 49)
    """

    def __init__(self, in_channels=1, num_classes=10, input_size=28, patch=7, dim=64, depth=2,
                 heads=4, mlp_ratio=2):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input_size ({input_size}) must be divisible by patch ({patch})")
        self.in_channels, self.input_size, self.patch = in_channels, input_size, patch
        tokens = (input_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, x):
        """``(B, C, H, W)`` → ``(B, tokens, C·p·p)``: non-overlapping p×p patches, row by row."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x):
        x = self.embed(self.patchify(x)) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x.mean(dim=1))

    def example_inputs(self, batch_size=1):
        """A tuple of inputs for ``torch.export``: ``(randn(B, C, H, W),)``."""
        s = self.input_size
        return (torch.randn(batch_size, self.in_channels, s, s),)
