"""The course's QAT recipe as code: one validated config, and what to do at step ``k``.

Taught in 04_qat_training (the schedule it encodes) and 08_qat_at_scale (``python -m
qatlab.train_qat`` runs it); every QAT loop of the course can call it. Like
torchao's QAT configs, :class:`QATRecipe` is a frozen dataclass that raises ``ValueError``
naming a bad value, separate from the code that trains. :meth:`QATRecipe.apply` is the one
place that says what happens at step ``k`` of a QAT fine-tune (learning rate, observer freeze,
BatchNorm freeze), for eager ``torch.ao.quantization`` models (fused ``ConvBn*`` modules and
``FakeQuantize``) and for PT2E graphs from torchao's ``prepare_qat_pt2e`` alike::

    recipe = QATRecipe(steps=40)
    optimizer = recipe.make_optimizer(model.parameters())
    for step, (x, y) in zip(range(recipe.steps), batches):
        recipe.apply(step, model, optimizer)     # before the forward of step `step`
        loss = F.cross_entropy(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
    accuracy = recipe.evaluate(model, test_loader)

**The defaults, and the measurement behind each** (steps count from 0; "at step k" means
"before the forward of step k"):

- **Optimizer: SGD, momentum 0.9, learning rate 0.01.** The course's fp32 baselines train
  with Adam (``qatlab.baseline.RECIPES``: one-cycle, peak ``1e-2``), whose schedule ends at
  ``peak / 25 / 1e4`` (torch's ``OneCycleLR`` defaults), about 4e-8, too small to move a
  weight across an int8 rounding boundary in a few dozen steps; an SGD learning rate is on
  another scale than an Adam peak, so the default is not derived from that peak but from
  notebook 06's sweep (below). With ``optimizer="adam"`` the rule is a small fraction of the
  fp32 run's Adam peak (notebook 05: 1 %, 1e-4). Notebook 04
  fine-tunes with exactly this optimizer and compares QAT int8 with an fp32 model given the same
  extra steps (its target 1, reported MET or MISSED with the seed spread); notebooks 06 and 08
  use it too. Notebook 06 sweeps 0.01, 0.03 and 0.1 and reports, on each run, the smallest rate
  at which the BatchNorm freeze collapses the run (``freeze_collapse_lr``): the recipe takes
  the bottom of that sweep. Notebook 05's Adam at 1 % of the peak (1e-4) and notebook 07's Adam
  at 1e-3 (a transformer) are the alternative, ``optimizer="adam"``; SGD is the default because
  04's LSQ rows need it (Adam rescales each parameter's gradient and cancels LSQ's gradient
  scale) and because 06's stability bound (``lr < 2 (1 + momentum) / sharpness``) is the one
  for SGD with momentum.
- **Steps: 40** (global batches of 64: about two thirds of an epoch of mnist5k), as in notebooks
  06 and 08. QAT is a fine-tune: a few percent of the fp32 schedule (04 uses one epoch of the 8).
- **Observers freeze at 3/4 of the steps** (``freeze_observers_at = 3 * steps // 4``): the last
  quarter fine-tunes the weights against a fixed grid. Notebook 04 traces an activation scale
  moving until the freeze and flat after it, and its ablation reports whether freezing changes
  accuracy beyond noise on its short fine-tune.
- **BatchNorm freezes at 1/2 of the steps** (``freeze_bn_at = steps // 2``), **and the learning
  rate drops to 0.1x there** (``bn_freeze_lr_factor``). Notebook 06 measures the largest Hessian
  eigenvalue of the loss with batch statistics and with BN frozen at the freeze point
  (``sharpness_batch_bn``, ``sharpness_frozen_bn``). SGD with momentum is stable on a quadratic
  only below ``2 (1 + momentum) / sharpness``, so a sharper frozen loss is a reason to shrink the
  learning rate with it; 06 reports that as consistent with its runs, not shown (its lambda_max
  stays below that limit). What 06 does show is the remedy: it tests the drop against the other
  remedies (re-estimating the statistics, a later freeze) at the learning rate where the freeze
  collapses the run, over seeds (``freeze_fix_acc``, its target reported MET or MISSED). The
  default 0.01 is below the rates where 06 looks for the collapse; 06's 4-bit ablation on the
  depthwise TinyMobileNet trains at 0.01 with and without the drop (its section 4) and prints
  whether leaving it out loses anything there. ``bn_freeze_lr_factor=1`` turns the drop off, to
  compare.

**Early and late.** A freeze is *late* when it happens in the second half of the QAT steps
(``freeze_bn_at >= steps // 2``, the middle step or later): BN has normalised each batch, with the fake-quantized weights,
for at least half of the fine-tune, and its running statistics have followed the weights.
It is *early* in the first half; folding BN into the conv before QAT (notebook 03, "folding,
then training") is the earliest freeze, step 0. By this definition the default, half of the
steps, is the earliest late freeze; torchvision's reference QAT script
(``references/classification/train_quantization.py``: BN frozen after epoch 3 of 90) freezes
early. :meth:`QATRecipe.bn_freeze_timing` names it for any setting.

**How to evaluate** (:meth:`QATRecipe.evaluate`): the fake-quant model in eval mode (BN on its
running statistics) with every observer switched off, so the test set never sets a range
(:func:`qatlab.qat.evaluate_fake_quant`); the int8 model that ``convert`` / ``convert_pt2e``
makes from it is then scored on the same images, and their top-1 agreement reported.
"""

import math
from dataclasses import asdict, dataclass
from typing import Literal

OPTIMIZERS = ("sgd", "adam")
AUTO = "auto"


def _check_step(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a non-negative int (a step), None (never) or 'auto', got {value!r}")


@dataclass(frozen=True)
class QATRecipe:
    """The course's QAT recipe: optimizer, steps, freeze steps, learning-rate drop. Taught in 04_qat_training.

    When to use it at all: start with the strongest cheap post-training quantization
    (per-channel weight scales, then cross-layer equalization and bias correction, then AdaRound
    or GPTQ: :mod:`qatlab.equalize`, :mod:`qatlab.bias_correction`, :mod:`qatlab.adaround`,
    :mod:`qatlab.gptq`, measured in 11_strongest_ptq), and train with this recipe only where that
    still loses more accuracy than you can afford (06_when_qat_pays_off's decision guide).

    ``freeze_bn_at`` / ``freeze_observers_at`` are steps counted from 0, ``None`` (never) or
    ``"auto"`` (the defaults: ``steps // 2`` and ``3 * steps // 4``, resolved when the recipe
    is made). See the module docstring for where every default comes from.

    >>> r = QATRecipe(steps=8)
    >>> r.freeze_bn_at, r.freeze_observers_at, [r.lr_at(k) for k in (3, 4)]
    (4, 6, [0.01, 0.001])
    >>> [r.plan(k) for k in (0, 4, 6)]  # (observers frozen, BN frozen, learning rate)
    [(False, False, 0.01), (False, True, 0.001), (True, True, 0.001)]
    >>> r.bn_freeze_timing()
    'late'
    >>> QATRecipe(steps=8, lr=-1)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a positive finite number, got -1
    """

    steps: int = 40
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    freeze_observers_at: int | None | str = AUTO
    freeze_bn_at: int | None | str = AUTO
    bn_freeze_lr_factor: float = 0.1

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not (
                math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, int | float) or not (
                0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        f = self.bn_freeze_lr_factor
        if isinstance(f, bool) or not isinstance(f, int | float) or not (math.isfinite(f) and 0 < f <= 1):
            raise ValueError(f"bn_freeze_lr_factor must be in (0, 1] (1 = no drop), got {f!r}")
        defaults = {"freeze_observers_at": 3 * self.steps // 4, "freeze_bn_at": self.steps // 2}
        for name, default in defaults.items():
            value = getattr(self, name)
            if value == AUTO:
                object.__setattr__(self, name, default)
            else:
                _check_step(name, value)

    # --- what happens at step k --------------------------------------------------------------

    def lr_at(self, step):
        """The learning rate of step ``step``: ``lr``, times ``bn_freeze_lr_factor`` from the BN freeze on."""
        frozen = self.freeze_bn_at is not None and step >= self.freeze_bn_at
        return self.lr * self.bn_freeze_lr_factor if frozen else self.lr

    def plan(self, step):
        """``(observers_frozen, bn_frozen, lr)`` at step ``step``: a pure function of the step."""
        return (self.freeze_observers_at is not None and step >= self.freeze_observers_at,
                self.freeze_bn_at is not None and step >= self.freeze_bn_at,
                self.lr_at(step))

    def apply(self, step, model, optimizer=None):
        """Put ``model`` (and ``optimizer``) in the state of step ``step``; call it before that step's forward.

        Sets every parameter group's learning rate to :meth:`lr_at`, switches the observers
        off from ``freeze_observers_at`` on, and freezes BN statistics from ``freeze_bn_at`` on:
        eager fused modules with ``freeze_bn_stats``, a PT2E graph by setting its BN ops'
        ``training`` argument to ``False`` (:func:`qatlab.qat.freeze_pt2e_bn_stats`). Every
        call re-applies the whole state of the step, so a run resumed at any step, or a graph
        that ``move_exported_model_to_train`` switched back, is put right. ``model`` may be
        wrapped in ``DistributedDataParallel``. Returns :meth:`plan` ``(step)``.
        """
        observers, bn, lr = self.plan(step)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        model = getattr(model, "module", model)  # DDP
        restore_freeze_state(model, {"observers_frozen": observers, "bn_frozen": bn})
        return observers, bn, lr

    def make_optimizer(self, params):
        """The recipe's optimizer over ``params``: SGD with ``momentum``, or Adam, at ``lr``."""
        import torch

        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def evaluate(self, model, loader, device=None):
        """Top-1 % of a fake-quant model as the recipe scores it (:func:`predict_fake_quant`)."""
        logits, labels = predict_fake_quant(model, loader, device=device)
        return 100.0 * (logits.argmax(1) == labels).float().mean().item()

    def bn_freeze_timing(self):
        """``"never"``, ``"early"`` (first half of the steps) or ``"late"`` (second half): see the module docstring."""
        if self.freeze_bn_at is None or self.freeze_bn_at >= self.steps:
            return "never"
        return "late" if self.freeze_bn_at >= self.steps // 2 else "early"

    def to_dict(self):
        """The recipe as plain data (for ``metrics.json`` and checkpoints)."""
        return asdict(self)


def predict_fake_quant(model, loader, device=None):
    """``(logits, labels)`` of a fake-quant model as the recipe scores it: eval form, every observer off.

    An eager model runs in ``eval()`` mode (:func:`qatlab.training.predict`), its observers
    switched off for the call (:func:`qatlab.qat.observers_disabled`), so the test set never
    sets a range. A PT2E graph is scored on a copy put in eval form with torchao's
    ``move_exported_model_to_eval``, so a graph whose BN the recipe froze is scored even next
    to dropout ops still in training form; ``model`` is left as it is. Taught in 04_qat_training.
    """
    import copy

    from .qat import observers_disabled
    from .training import predict

    if _is_graph(model):
        from torchao.quantization.pt2e import move_exported_model_to_eval

        from .patterns import pattern_cache
        from .provenance import shared_provenance

        with pattern_cache(), shared_provenance():
            model = move_exported_model_to_eval(copy.deepcopy(model))
        model.training = False
    with observers_disabled(model):
        return predict(model, loader, device=device)


# --- the freeze state of a model, read and re-applied ------------------------------------------

def fake_quant_modules(model):
    """``[(name, module)]`` of every FakeQuantize (torch.ao's and torchao's PT2E one), in module order.

    Taught in 08_qat_at_scale.
    """
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "observer_enabled") and hasattr(m, "scale") and hasattr(m, "disable_observer")]


def _is_graph(model):
    import torch

    return isinstance(model, torch.fx.GraphModule)


def _pt2e_bn_flags(graph_module):
    from .qat import _BN_TRAINING_ARG

    return [bool(n.args[_BN_TRAINING_ARG]) for n in graph_module.graph.nodes
            if n.op == "call_function" and "batch_norm" in str(n.target)]


def freeze_state(model):
    """``{"observers_frozen", "bn_frozen"}`` of a prepared QAT model (eager or PT2E), read from the model.

    Eager: the ``observer_enabled`` buffers and each fused module's ``freeze_bn``. PT2E: the
    buffers, and the ``training`` argument of every BN op in the graph. Taught in 08_qat_at_scale.
    """
    fqs = [m for _, m in fake_quant_modules(model)]
    if _is_graph(model):
        flags = _pt2e_bn_flags(model)
        bn_frozen = bool(flags) and not any(flags)
    else:
        bns = [m for m in model.modules() if hasattr(m, "freeze_bn")]
        bn_frozen = bool(bns) and all(m.freeze_bn for m in bns)
    return {"observers_frozen": bool(fqs) and all(int(m.observer_enabled[0]) == 0 for m in fqs),
            "bn_frozen": bn_frozen}


def restore_freeze_state(model, freeze):
    """Apply a freeze state (``{"observers_frozen", "bn_frozen"}``) to a prepared QAT model.

    The observers' on/off switch is a buffer (``observer_enabled``), so ``load_state_dict``
    restores it. A fused ConvBn's ``freeze_bn`` is a plain attribute, and a PT2E graph keeps
    BN's ``training`` in the graph: neither is in the state dict, so without this call a
    resumed run would update BN statistics that the original had frozen. Only freezes, never
    unfreezes. Taught in 08_qat_at_scale.
    """
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    from .qat import freeze_pt2e_bn_stats

    if freeze["observers_frozen"]:
        for _, m in fake_quant_modules(model):
            m.disable_observer()
    if freeze["bn_frozen"]:
        if _is_graph(model):
            freeze_pt2e_bn_stats(model)
        else:
            model.apply(freeze_bn_stats)
    return model
