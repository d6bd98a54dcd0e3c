"""The notebook-03 exercise check passes a right fold_bn and explains typical wrong ones."""

import copy

import pytest
import torch
from notebook_solutions import solution
from torch import nn

from qatlab import exercises, fold_bn
from qatlab.exercises import ExerciseError
from qatlab.exercises.ex03 import check_fold_bn


def make_fold(scale_fn=None, bias_fn=None, keep_bias_none=False, in_place=False, ignore_conv_bias=False):
    """A fold_bn with one deliberate mistake swapped in."""

    def fold(conv, bn):
        s_true = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        s = scale_fn(bn) if scale_fn else s_true
        b = torch.zeros_like(s_true)
        if conv.bias is not None and not ignore_conv_bias:
            b = conv.bias.detach()
        out = conv if in_place else copy.deepcopy(conv)
        with torch.no_grad():
            out.weight = nn.Parameter(conv.weight.detach() * s.reshape(-1, 1, 1, 1))
        if not keep_bias_none:
            bias = bias_fn(bn, s_true) if bias_fn else (b - bn.running_mean) * s_true + bn.bias.detach()
            out.bias = nn.Parameter(bias)
        return out

    return fold


def test_correct_answers_pass(capsys):
    assert check_fold_bn(make_fold()) is True
    assert check_fold_bn(fold_bn) is True  # the library's own
    assert exercises.check_fold_bn is check_fold_bn
    assert "fold_bn: correct" in capsys.readouterr().out


@pytest.mark.parametrize("fold, hint", [
    (make_fold(scale_fn=lambda bn: bn.weight.detach() / (bn.running_var + bn.eps)), "square root"),
    (make_fold(scale_fn=lambda bn: bn.weight.detach() / torch.sqrt(bn.running_var)), "left out ε"),
    (make_fold(scale_fn=lambda bn: bn.weight.detach() / torch.sqrt(bn.running_var + 1e-5)), "bn.eps"),
    (make_fold(scale_fn=lambda bn: 1 / torch.sqrt(bn.running_var + bn.eps)), "forgot γ"),
    (make_fold(bias_fn=lambda bn, s: -bn.running_mean * s), "forgot β"),
    (make_fold(bias_fn=lambda bn, s: bn.bias.detach()), "subtract the running mean"),
    # right on a conv without bias, which was the only case: the conv's own bias must be folded too
    (make_fold(ignore_conv_bias=True), r"on a conv with a bias .* bias\[\d\] .* left out the conv's own bias"),
    (make_fold(keep_bias_none=True), "no bias"),
    (make_fold(in_place=True), "changed its input"),
    (lambda conv, bn: None, "returned None"),
    (lambda conv, bn: nn.Linear(2, 2), "got Linear"),
])
def test_wrong_answers_get_specific_hints(fold, hint):
    with pytest.raises(ExerciseError, match=hint) as info:
        check_fold_bn(fold)
    print(info.value)


def test_hint_names_the_element_and_values():
    with pytest.raises(ExerciseError) as info:
        check_fold_bn(make_fold(scale_fn=lambda bn: bn.weight.detach() / torch.sqrt(bn.running_var)))
    msg = str(info.value)
    assert msg.startswith("on a grouped conv without bias (groups=3, BN eps=0.1), weight[")
    assert "but should be" in msg


def test_lost_groups_is_caught():
    def fold_without_groups(conv, bn):  # builds a fresh conv and forgets groups=3
        return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)

    with pytest.raises(ExerciseError, match="groups=1 but the input conv has groups=3"):
        check_fold_bn(fold_without_groups)


def test_notebook_solution_passes():
    assert check_fold_bn(solution("03_fusion", "ex03_fold_bn")["my_fold_bn"]) is True


def fold_per_input_channel(conv, bn):  # s along dimension 1: broadcasting fails or folds the wrong axis
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    out = copy.deepcopy(conv)
    out.weight = nn.Parameter(conv.weight.detach() * s.reshape(1, -1, 1, 1))
    return out


def fold_bias_unscaled(conv, bn):
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    out = copy.deepcopy(conv)
    out.weight = nn.Parameter(conv.weight.detach() * s.reshape(-1, 1, 1, 1))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(s)
    out.bias = nn.Parameter(b - bn.running_mean * s + bn.bias.detach())
    return out


def fold_crashes_on_no_bias(conv, bn):
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    out = copy.deepcopy(conv)
    out.weight = nn.Parameter(conv.weight.detach() * s.reshape(-1, 1, 1, 1))
    out.bias = nn.Parameter((conv.bias.detach() - bn.running_mean) * s + bn.bias.detach())
    return out


@pytest.mark.parametrize("fold, hint", [
    (fold_per_input_channel, r"raised RuntimeError: .*one value per OUTPUT channel"),
    (fold_bias_unscaled, r"on a conv with a bias .* without scaling it"),
    (fold_crashes_on_no_bias, r"raised AttributeError: .*conv.bias = None"),
    (lambda conv, bn: conv, r"changed its input|returned the input conv itself"),
    ("my_fold_bn", r"pass your function itself, my_fold_bn"),
])
def test_more_wrong_answers_get_hints(fold, hint):
    with pytest.raises(ExerciseError, match=hint):
        check_fold_bn(fold)
