"""Exercise checks for 05_deployment."""

from ._common import ExerciseError, passed


def reference_int8_bytes(model):
    """Expected int8 size of ``model``'s weights, in bytes.

    Every ``Conv2d`` / ``Linear`` weight element is stored as 1 byte (int8);
    every output channel adds a 4-byte fp32 bias (BatchNorm folds into it,
    so a conv without bias gets one) and a 4-byte fp32 per-channel scale
    (symmetric quantization: zero-points are 0 and need no storage).
    BatchNorm layers add nothing: they are folded away.

    >>> from torch import nn
    >>> reference_int8_bytes(nn.Linear(10, 3))  # 30 weights + 3 channels * 8 bytes
    54
    """
    from torch import nn

    total = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            total += module.weight.numel() + 8 * module.weight.shape[0]
    return total


def _models():
    from torch import nn

    from ..models import SmallCNN

    return [("SmallCNN()", SmallCNN()),
            ("Sequential(Conv2d(3, 8, 5, bias=False), BatchNorm2d(8), Linear(20, 7))",
             nn.Sequential(nn.Conv2d(3, 8, 5, bias=False), nn.BatchNorm2d(8), nn.Linear(20, 7)))]


def check_expected_int8_bytes(fn):
    """Check ``fn(model) -> bytes`` against :func:`reference_int8_bytes` on two models."""
    from torch import nn

    for name, model in _models():
        got = fn(model)
        want = reference_int8_bytes(model)
        if not isinstance(got, int | float) or isinstance(got, bool):
            raise ExerciseError(f"fn({name}) returned {got!r}; return a number of bytes")
        if got == want:
            continue
        n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        n_channels = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        n_bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
        n_params = sum(p.numel() for p in model.parameters())
        diff = got - want
        if got == 4 * n_params or got == 4 * n_weights + 8 * n_channels:
            hint = "that is the fp32 size: int8 weights take 1 byte each, not 4"
        elif diff == 4 * n_bn or diff == n_bn:
            hint = (f"you counted the {n_bn} BatchNorm parameters: BN folds into the conv's "
                    "weight and bias, it adds no bytes of its own")
        elif diff == -8 * n_channels:
            hint = (f"you left out the {n_channels} output channels' fp32 bias and scale "
                    "(4 + 4 bytes each)")
        elif diff == -4 * n_channels:
            hint = (f"{n_channels} output channels need both a 4-byte bias and a 4-byte scale; "
                    "you counted only one of them")
        elif got == n_params:
            hint = "1 byte per parameter counts BN and biases as int8; see the rule above"
        else:
            hint = "count weight elements at 1 byte plus 8 bytes per output channel"
        raise ExerciseError(f"fn({name}) = {got} bytes but should be {want} "
                            f"(off by {diff:+}): {hint}")
    return passed("expected_int8_bytes")
