"""Checks for notebook 03_fusion's exercise: fold a BatchNorm into a grouped conv."""

import torch
from torch import nn

from ._common import ExerciseError, call, passed, require_callable


def _grouped_case():
    """A grouped conv without bias and an eval-mode BN with non-trivial statistics.

    ``eps`` is large on purpose, so that a fold that ignores ``bn.eps`` (or hard-codes
    1e-5) is caught, and the variances are far from 1, so that ``σ²`` vs ``σ`` shows.
    """
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)
    bn = nn.BatchNorm2d(6, eps=0.1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        bn.weight.copy_(torch.rand(6, generator=gen) * 2 + 0.5)
        bn.bias.copy_(torch.randn(6, generator=gen))
        bn.running_mean.copy_(torch.randn(6, generator=gen))
        bn.running_var.copy_(torch.rand(6, generator=gen) * 3 + 0.2)
    conv.eval(), bn.eval()
    x = torch.randn(2, 6, 5, 5, generator=gen)
    return conv, bn, x


def _biased_case():
    """A plain conv (3 -> 5 channels, stride 2) WITH a bias, and a BN with eps = 1e-3."""
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 0), bias=True)
    bn = nn.BatchNorm2d(5, eps=1e-3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(5, generator=gen) * 2)
        bn.weight.copy_(torch.rand(5, generator=gen) * 2 - 1)   # gamma of both signs
        bn.bias.copy_(torch.randn(5, generator=gen))
        bn.running_mean.copy_(torch.randn(5, generator=gen))
        bn.running_var.copy_(torch.rand(5, generator=gen) * 0.5 + 0.01)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 7, 6, generator=gen)
    return conv, bn, x


def _cases():
    return [("a grouped conv without bias (groups=3, BN eps=0.1)", *_grouped_case()),
            ("a conv with a bias (3 -> 5 channels, stride 2, BN eps=1e-3)", *_biased_case())]


def _first_diff(ours, ref):
    diff = (ours.detach() - ref.detach()).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return idx, ours.detach()[idx].item(), ref.detach()[idx].item(), diff.max().item()


def _weight_hint(w, conv, bn):
    """Name the usual mistake when ``w`` is not ``W·γ/√(σ²+ε)``."""
    W, gamma, var, eps = conv.weight.detach(), bn.weight.detach(), bn.running_var, bn.eps
    shape = (-1, 1, 1, 1)
    guesses = {
        "you divided by σ²+ε instead of its square root √(σ²+ε)": W * (gamma / (var + eps)).reshape(shape),
        "you left out ε: use √(σ² + bn.eps)": W * (gamma / var.sqrt()).reshape(shape),
        f"you used ε = 1e-5 instead of bn.eps (this BN has eps={bn.eps:g})":
            W * (gamma / (var + 1e-5).sqrt()).reshape(shape),
        "you forgot γ (bn.weight) in the scale": W * (1 / (var + eps).sqrt()).reshape(shape),
        "you did not scale the weight at all": W,
    }
    for hint, guess in guesses.items():
        if guess.shape == w.shape and torch.allclose(w, guess, rtol=1e-5, atol=1e-6):
            return hint
    return ("scale each output channel o (dimension 0 of the weight, also with groups) "
            "by γ[o]/√(σ²[o]+ε)")


def _bias_hint(b, conv, bn):
    s = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    mu, beta = bn.running_mean, bn.bias.detach()
    b0 = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mu)
    guesses = {
        "you left out the conv's own bias b: b' = (b − μ)·s + β": (-mu) * s + beta,
        "you added the conv's bias b without scaling it: b' = (b − μ)·s + β, so b is multiplied by s too":
            b0 + (-mu) * s + beta,
        "you forgot β (bn.bias): b' = (b − μ)·s + β": (b0 - mu) * s,
        "you forgot to subtract the running mean μ: b' = (b − μ)·s + β": b0 * s + beta,
        "you did not multiply (b − μ) by s = γ/√(σ²+ε): b' = (b − μ)·s + β": b0 - mu + beta,
        "you used μ·s − β; the sign is b' = (b − μ)·s + β = β − μ·s": (mu - b0) * s - beta,
    }
    for hint, guess in guesses.items():
        if torch.allclose(b, guess, rtol=1e-5, atol=1e-6):
            return hint
    return "b' = (b − μ)·γ/√(σ²+ε) + β, with b = 0 for a conv without bias"


def check_fold_bn(fold_bn):
    """Check a student's ``fold_bn(conv, bn)`` on a grouped Conv2d without bias and on a
    strided Conv2d with a bias (03_fusion).

    The folded conv must equal ``torch.nn.utils.fusion.fuse_conv_bn_eval`` to float32
    round-off (``rtol=1e-5, atol=1e-6``) on weight, bias and output, and the inputs
    must be left unchanged.
    """
    require_callable(fold_bn, "my_fold_bn")
    for name, conv, bn, x in _cases():
        _check_one(fold_bn, name, conv, bn, x)
    return passed("fold_bn")


def _on_error(e):
    if isinstance(e, RuntimeError) and "size" in str(e):
        return ("shapes do not broadcast: s = γ/√(σ²+ε) has one value per OUTPUT channel, the "
                "weight's dimension 0: multiply by s.reshape(-1, 1, 1, 1)")
    if isinstance(e, TypeError | AttributeError) and "NoneType" in str(e):
        return "a conv without bias has conv.bias = None: use b = 0 (torch.zeros_like(s)) then"
    return None


def _check_one(fold_bn, name, conv, bn, x):
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    before = {k: v.clone() for k, v in list(conv.state_dict().items()) + [
        (f"bn.{k}", v) for k, v in bn.state_dict().items()]}
    ref = fuse_conv_bn_eval(conv, bn)
    out = call(fold_bn, f"my_fold_bn on {name}", conv, bn, on_error=_on_error)
    if not isinstance(out, nn.Conv2d):
        raise ExerciseError(f"fold_bn must return an nn.Conv2d, got {type(out).__name__}")
    after = dict(list(conv.state_dict().items()) + [
        (f"bn.{k}", v) for k, v in bn.state_dict().items()])
    for key, value in before.items():
        if key not in after or not torch.equal(after[key], value):
            raise ExerciseError(f"on {name}, fold_bn changed its input ({key}): copy the conv "
                                "(copy.deepcopy) and write the folded parameters into the copy")
    if out is conv:
        raise ExerciseError(f"on {name}, fold_bn returned the input conv itself: return a new "
                            "conv (copy.deepcopy(conv)) so that the unfused model still works")
    for attr in ("groups", "stride", "padding", "dilation", "in_channels", "out_channels"):
        if getattr(out, attr) != getattr(conv, attr):
            raise ExerciseError(f"on {name}, the folded conv has {attr}={getattr(out, attr)} but the "
                                f"input conv has {attr}={getattr(conv, attr)}: keep every conv "
                                f"setting (copy.deepcopy(conv)), change only weight and bias")
    if out.weight.shape != ref.weight.shape:
        raise ExerciseError(f"on {name}, the folded weight has shape {tuple(out.weight.shape)}, expected "
                            f"{tuple(ref.weight.shape)}")
    if not torch.allclose(out.weight, ref.weight, rtol=1e-5, atol=1e-6):
        idx, got, want, _ = _first_diff(out.weight, ref.weight)
        raise ExerciseError(f"on {name}, weight{list(idx)} is {got:.6g} but should be {want:.6g}: "
                            f"{_weight_hint(out.weight.detach(), conv, bn)}")
    if out.bias is None:
        raise ExerciseError(f"on {name}, the folded conv has no bias, but it needs b' = (b − μ)·γ/√(σ²+ε) + β "
                            "even when the original conv had none (set conv.bias = nn.Parameter(...))")
    if out.bias.shape != ref.bias.shape:
        raise ExerciseError(f"on {name}, the folded bias has shape {tuple(out.bias.shape)}, expected "
                            f"{tuple(ref.bias.shape)} (one value per output channel)")
    if not torch.allclose(out.bias, ref.bias, rtol=1e-5, atol=1e-6):
        idx, got, want, _ = _first_diff(out.bias, ref.bias)
        raise ExerciseError(f"on {name}, bias[{idx[0]}] is {got:.6g} but should be {want:.6g}: "
                            f"{_bias_hint(out.bias.detach(), conv, bn)}")
    with torch.no_grad():
        got, want = out(x), bn(conv(x))
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        idx, g, w, d = _first_diff(got, want)
        raise ExerciseError(f"on {name}, weights match but the output differs at {list(idx)}: {g:.6g} vs "
                            f"{w:.6g} (max diff {d:.2e}); check stride/padding/groups were kept")
