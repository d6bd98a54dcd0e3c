"""qatlab.recipe: the QAT recipe's validation and its schedule on eager and PT2E models,
each checked against the torch / torchao calls it stands for."""

import copy
import math
import warnings

import pytest
import torch

from qatlab import distributed
from qatlab.recipe import QATRecipe, fake_quant_modules, freeze_state, restore_freeze_state

# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be a positive int, got 0"),
    ({"steps": 2.5}, "steps must be a positive int, got 2.5"),
    ({"lr": -1}, "lr must be a positive finite number, got -1"),
    ({"lr": math.nan}, "lr must be a positive finite number, got nan"),
    ({"lr": True}, "lr must be a positive finite number, got True"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
    ({"bn_freeze_lr_factor": 0}, r"bn_freeze_lr_factor must be in \(0, 1\] \(1 = no drop\), got 0"),
    ({"bn_freeze_lr_factor": 1.5}, r"bn_freeze_lr_factor must be in \(0, 1\]"),
    ({"freeze_bn_at": -1}, r"freeze_bn_at must be a non-negative int \(a step\), None \(never\) or 'auto', got -1"),
    ({"freeze_observers_at": 2.5}, "freeze_observers_at must be a non-negative int .* got 2.5"),
    ({"freeze_bn_at": True}, "freeze_bn_at must be a non-negative int .* got True"),
])
def test_recipe_rejects_bad_values_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATRecipe(**kwargs)


def test_recipe_defaults_and_timing_words():
    r = QATRecipe()
    assert (r.steps, r.lr, r.optimizer, r.momentum, r.bn_freeze_lr_factor) == (40, 0.01, "sgd", 0.9, 0.1)
    assert (r.freeze_bn_at, r.freeze_observers_at) == (20, 30)
    assert [r.lr_at(k) for k in (0, 19, 20, 39)] == [0.01, 0.01, 0.01 * 0.1, 0.01 * 0.1]
    assert r.bn_freeze_timing() == "late"
    assert QATRecipe(steps=40, freeze_bn_at=19).bn_freeze_timing() == "early"
    # an odd number of steps: the default freeze (steps // 2) is still the earliest late one
    assert QATRecipe(steps=63).bn_freeze_timing() == "late"
    assert QATRecipe(steps=63, freeze_bn_at=30).bn_freeze_timing() == "early"
    assert QATRecipe(steps=40, freeze_bn_at=None).bn_freeze_timing() == "never"
    assert QATRecipe(steps=40, freeze_bn_at=40).bn_freeze_timing() == "never"   # after the last step
    no_drop = QATRecipe(steps=10, bn_freeze_lr_factor=1)
    assert {no_drop.lr_at(k) for k in range(10)} == {0.01}
    assert QATRecipe(steps=10, freeze_bn_at=None).lr_at(9) == 0.01   # no freeze, no drop
    assert QATRecipe(steps=10).to_dict()["freeze_bn_at"] == 5
    opt = QATRecipe(optimizer="adam", lr=1e-4).make_optimizer(torch.nn.Linear(2, 2).parameters())
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-4
    sgd = QATRecipe().make_optimizer(torch.nn.Linear(2, 2).parameters())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


# --- the schedule, against torch's own calls -----------------------------------------------

def _step(model, opt, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _batches(shape, n, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def test_schedule_on_eager_model_equals_torch_calls():
    """recipe.apply on a prepared eager model = torch.ao's disable_observer + freeze_bn_stats + an LR
    set by hand, step for step, bit for bit; and the LR drops at the BN freeze."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import disable_observer

    from qatlab import models, qat

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = qat.prepare_eager_qat(models.SmallCNN().train())
    ref = copy.deepcopy(ours)
    recipe = QATRecipe(steps=8)   # BN frozen at 4, observers at 6
    opt_ours, opt_ref = recipe.make_optimizer(ours.parameters()), recipe.make_optimizer(ref.parameters())
    first_fq = fake_quant_modules(ours)[0][1]
    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (x, y) in enumerate(_batches((1, 28, 28), recipe.steps)):
            observers, bn, lr = recipe.apply(k, ours, opt_ours)
            assert (observers, bn) == (k >= 6, k >= 4)
            assert opt_ours.param_groups[0]["lr"] == lr == (0.01 if k < 4 else 0.01 * 0.1)
            assert freeze_state(ours) == {"observers_frozen": k >= 6, "bn_frozen": k >= 4}
            if k >= 6:
                ref.apply(disable_observer)
            if k >= 4:
                ref.apply(freeze_bn_stats)
            for group in opt_ref.param_groups:
                group["lr"] = 0.01 * (0.1 if k >= 4 else 1.0)
            _step(ours, opt_ours, x, y)
            _step(ref, opt_ref, x, y)
            scales.append(first_fq.scale.clone())
    assert distributed.state_digest(ours.state_dict()) == distributed.state_digest(ref.state_dict())
    assert not ours.features[0][0].bn.training and ours.features[0][0].freeze_bn
    # the step that freezes still updates once (the switch acts on the next forward): constant from step 6 on
    assert all(torch.equal(scales[6], s) for s in scales[6:]) and not torch.equal(scales[0], scales[5])


@pytest.fixture(scope="module")
def pt2e_model():
    from qatlab.conversion import prepare_pt2e

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_pt2e(Net(), (3, 6, 6))


def _bn_training_flags(gm):
    return [bool(n.args[5]) for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


def test_schedule_on_pt2e_graph_equals_torchao_calls(pt2e_model):
    """On a prepare_qat_pt2e graph: observers off with torchao's disable_observer, BN frozen by
    setting the BN ops' training argument (torchao's PT2E QAT tutorial), LR dropped at the freeze;
    equal bit for bit to doing those calls by hand. After move_exported_model_to_train (which
    unfreezes BN), apply re-freezes."""
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_train

    ours = copy.deepcopy(pt2e_model)
    ref = copy.deepcopy(pt2e_model)
    recipe = QATRecipe(steps=6)   # BN frozen at 3, observers at 4
    opt_ours, opt_ref = recipe.make_optimizer(ours.parameters()), recipe.make_optimizer(ref.parameters())
    assert _bn_training_flags(ours) == [True]
    for k, (x, y) in enumerate(_batches((3, 6, 6), recipe.steps, classes=3)):
        _, _, lr = recipe.apply(k, ours, opt_ours)
        assert opt_ours.param_groups[0]["lr"] == lr == (0.01 if k < 3 else 0.01 * 0.1)
        assert _bn_training_flags(ours) == [k < 3]
        assert freeze_state(ours) == {"observers_frozen": k >= 4, "bn_frozen": k >= 3}
        if k >= 4:
            ref.apply(disable_observer)
        if k >= 3:
            for node in ref.graph.nodes:
                if node.target == torch.ops.aten.batch_norm.default and node.args[5]:
                    node.args = (*node.args[:5], False, *node.args[6:])
            ref.recompile()
        for group in opt_ref.param_groups:
            group["lr"] = 0.01 * (0.1 if k >= 3 else 1.0)
        _step(ours, opt_ours, x, y)
        _step(ref, opt_ref, x, y)
    assert distributed.state_digest(ours.state_dict()) == distributed.state_digest(ref.state_dict())
    move_exported_model_to_train(ours)   # BN back in training form, as a resumed run's .train() does
    assert _bn_training_flags(ours) == [True] and not freeze_state(ours)["bn_frozen"]
    recipe.apply(5, ours)
    assert _bn_training_flags(ours) == [False]


def test_restore_freeze_state_only_freezes_and_reaches_ddp_module(pt2e_model):
    m = copy.deepcopy(pt2e_model)
    restore_freeze_state(m, {"observers_frozen": False, "bn_frozen": False})
    assert freeze_state(m) == {"observers_frozen": False, "bn_frozen": False}

    class Wrapper:   # what apply sees under DistributedDataParallel: the model is .module
        module = m

    QATRecipe(steps=4).apply(3, Wrapper())
    assert freeze_state(m) == {"observers_frozen": True, "bn_frozen": True}


def test_evaluate_scores_with_observers_off_and_leaves_the_model_as_it_was(pt2e_model):
    """PT2E: scored on an eval-form copy (BN on running statistics), observers off; the graph keeps
    its training form and its observers. Eager: the same number as qat.evaluate_fake_quant."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    from qatlab import models, qat

    m = copy.deepcopy(pt2e_model)
    x, y = _batches((3, 6, 6), 1, classes=3)[0]
    m(x)   # observers see one batch
    before = distributed.state_digest(m.state_dict())
    acc = QATRecipe().evaluate(m, [(x, y)])
    assert distributed.state_digest(m.state_dict()) == before and _bn_training_flags(m) == [True]
    ref = move_exported_model_to_eval(copy.deepcopy(pt2e_model))
    ref.load_state_dict(m.state_dict())
    with qat.observers_disabled(ref):
        expected = 100.0 * (ref(x).argmax(1) == y).float().mean().item()
    assert acc == expected
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = qat.prepare_eager_qat(models.SmallCNN().train())
        batch = _batches((1, 28, 28), 1)[0]
        eager(batch[0])
        assert QATRecipe().evaluate(eager, [batch]) == qat.evaluate_fake_quant(eager, [batch])
