"""Training and evaluation loops with progress bars, and reproducibility helpers.

Taught in 00_start_here; reused by every later notebook.
"""

import contextlib
import random

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def set_seed(seed):
    """Seed Python, NumPy and torch. Call it yourself: ``import qatlab`` never does."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device():
    """``cuda`` when a GPU is present, else ``cpu`` (quantized kernels run on the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_loader(loader, what):
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{what} must be an iterable of (x, y) batches, got {type(loader).__name__}")


def _is_exported(model):
    """An exported (``torch.export`` / PT2E) graph: a GraphModule whose nodes carry export metadata."""
    return isinstance(model, torch.fx.GraphModule) and any("val" in n.meta for n in model.graph.nodes)


def _train_flags(graph_module):
    """The ``training`` / ``train`` argument of every op of a graph that has one (BatchNorm, dropout)."""
    flags = []
    for node in graph_module.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.name in ("training", "train"):
                flags.append(bool(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)))
    return flags


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode inside the block; afterwards the mode the model had, through its own switch.

    An eager module: ``.eval()``, then ``.train(was_training)``. An exported graph
    keeps its mode in its ops (each BatchNorm's ``training`` argument, each
    dropout's ``train``), not in ``.training``, which torchao's
    ``move_exported_model_to_eval`` leaves ``True``. So the ops decide: a graph
    whose ops are all in eval form is evaluated as it is, untouched; a graph whose
    ops are all in training form goes through its train/eval switch
    (:func:`qatlab.qat.allow_train_eval`, or torchao's
    ``allow_exported_model_train_eval``) and back, which moves every op to eval
    form and back. A graph with ops in both forms (BatchNorm frozen, dropout
    still training) cannot be put back that way: ``.train()`` would move every
    BatchNorm to training form, so it is refused, as is a graph in training form
    without a switch.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    if not _is_exported(model):
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
        return
    flags = _train_flags(model)
    if not any(flags):
        yield
        return
    if not all(flags):
        raise ValueError(
            f"this exported graph has {sum(flags)} of its {len(flags)} BatchNorm/dropout ops in training form "
            f"and the others in eval form (frozen BatchNorm): switching it to eval and back with .train() would "
            f"unfreeze its BatchNorm. Call .eval() (or torchao's move_exported_model_to_eval) before predicting, "
            f"and qatlab.qat.freeze_pt2e_bn_stats again after .train()")
    try:
        model.eval()
    except NotImplementedError:
        raise ValueError(
            f"this exported graph has {len(flags)} BatchNorm/dropout ops in training form and no train/eval "
            f"switch: call torchao's move_exported_model_to_eval(model) before predicting, or give it the switch "
            f"with qatlab.qat.allow_train_eval(model)") from None
    if any(_train_flags(model)):
        model.train()
        raise ValueError(f"{type(model).__name__}.eval() left BatchNorm/dropout ops of this exported graph in "
                         f"training form: call torchao's move_exported_model_to_eval(model) before predicting")
    try:
        yield
    finally:
        model.train()  # every op was in training form: the switch puts them all back


@torch.no_grad()
def predict(model, loader, device=None, progress=False):
    """Concatenated logits and labels over ``loader``: ``(logits, labels)``, in eval mode.

    Taught in 00_start_here. The model runs in eval mode and gets its own mode
    back afterwards: an eager module through ``.eval()`` and
    ``.train(was_training)``; an exported (PT2E) graph, whose mode lives in its
    BatchNorm and dropout ops rather than in ``.training``, is run as it is when
    those ops are in eval form (after ``move_exported_model_to_eval``), and
    switched to eval and back through its own switch
    (:func:`qatlab.qat.allow_train_eval`) when they are all in training form. A
    graph that cannot be evaluated and put back faithfully (training form without
    a switch, or frozen BatchNorm next to training dropout) raises ``ValueError``.
    Observers are not switched off: see :func:`qatlab.qat.evaluate_fake_quant`.

    >>> m = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
    >>> logits, labels = predict(m, [(torch.ones(4, 3), torch.zeros(4))])
    >>> logits.shape, bool((logits == logits[0]).all()), m.training   # no dropout, mode restored
    (torch.Size([4, 2]), True, True)
    """
    _check_loader(loader, "loader")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    logits, labels = [], []
    with _eval_mode(model):
        for x, y in tqdm(loader, desc="predict", leave=False, disable=not progress):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model, loader, device=None, progress=False):
    """Top-1 accuracy in percent over ``loader``, in eval mode (see :func:`predict`). Taught in 00_start_here."""
    logits, labels = predict(model, loader, device=device, progress=progress)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def train(model, train_loader, epochs=1, lr=2e-3, test_loader=None, optimizer=None,
          on_epoch_start=None, device=None, desc="train", weight_decay=0.0, schedule="constant"):
    """Train with cross-entropy and Adam (or ``optimizer``) and return a history.

    ``history`` has one entry per epoch in ``epoch``, ``train_loss``,
    ``train_acc`` and (with ``test_loader``) ``test_acc``, plus
    ``step_loss`` with every batch's loss. ``on_epoch_start(epoch, model)`` runs
    before each epoch, which is where a QAT freeze schedule goes.

    ``schedule="onecycle"`` warms the learning rate up to ``lr`` and anneals it
    to ~0 over all steps (``OneCycleLR``); ``"constant"`` keeps ``lr``.
    """
    _check_loader(train_loader, "train_loader")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not (isinstance(lr, float | int) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    device = device or get_device()
    model.to(device)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if schedule not in ("constant", "onecycle"):
        raise ValueError(f"schedule must be 'constant' or 'onecycle', got {schedule!r}")
    scheduler = None
    if schedule == "onecycle" and epochs > 0:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * len(train_loader))
    loss_fn = nn.CrossEntropyLoss()
    history = {"epoch": [], "train_loss": [], "train_acc": [], "test_acc": [], "step_loss": []}
    for epoch in range(epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch, model)
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history["step_loss"].append(loss.item())
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(loss_sum / max(total, 1))
        history["train_acc"].append(100.0 * correct / max(total, 1))
        if test_loader is not None:
            history["test_acc"].append(evaluate(model, test_loader, device=device))
    return history


def plot_history(history, ax=None, label=""):
    """Training loss per step and test accuracy per epoch (taught in 00_start_here)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    steps = np.arange(1, len(history["step_loss"]) + 1)
    ax.plot(steps, history["step_loss"], lw=0.8, alpha=0.7, label=f"{label} train loss".strip())
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    if history.get("test_acc"):
        ax2 = ax.twinx()
        per_epoch = len(steps) / max(len(history["epoch"]), 1)
        ax2.plot(np.array(history["epoch"]) * per_epoch, history["test_acc"], "o-", color="tab:green",
                 label=f"{label} test acc".strip())
        ax2.set_ylabel("test accuracy (%)", color="tab:green")
    ax.set_title("training curve")
    return ax


def plot_confusion(logits, labels, classes=None, ax=None):
    """Confusion matrix of ``logits.argmax(1)`` against ``labels``; returns ``ax``."""
    import matplotlib.pyplot as plt

    k = logits.shape[1]
    cm = torch.zeros(k, k, dtype=torch.long)
    cm.index_put_((labels, logits.argmax(1)), torch.ones_like(labels), accumulate=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.imshow(cm.numpy(), cmap="Blues")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ticks = classes or [str(i) for i in range(k)]
    ax.set_xticks(range(k), ticks)
    ax.set_yticks(range(k), ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test split)")
    return ax
