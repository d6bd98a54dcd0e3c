"""The fp32 baselines every notebook starts from: train once, save, reload.

Taught in 00_start_here. Later notebooks call :func:`load_baseline`, which loads
the model's checkpoint from ``build/checkpoints/`` or, in a fresh checkout (or
when the file is missing or corrupt), retrains it with its recipe, so any
notebook runs alone.

Each model has one recipe in :data:`RECIPES`:

- ``"smallcnn"`` (00_start_here, used by 01-05): ``build/checkpoints/baseline.pt``;
- ``"tinymobilenet"`` (06_when_qat_pays_off): ``build/checkpoints/tinymobilenet.pt``;
- ``"tinyvit"`` (07_qat_transformers): ``build/checkpoints/tinyvit.pt``.
"""

import warnings

import torch

from .data import load_dataset
from .files import atomic_path, build_dir, locked
from .training import evaluate, set_seed, train

# model name -> (class name in qatlab.models, checkpoint file, training recipe)
RECIPES = {
    "smallcnn": {"cls": "SmallCNN", "file": "baseline.pt", "notebook": "00_start_here", "dataset": "mnist5k", "epochs": 8,
                 "lr": 1e-2, "batch_size": 64, "schedule": "onecycle", "seed": 0},
    "tinymobilenet": {"cls": "TinyMobileNet", "file": "tinymobilenet.pt",
                      "notebook": "06_when_qat_pays_off", "dataset": "mnist5k",
                      "epochs": 8, "lr": 1e-2, "batch_size": 64, "schedule": "onecycle", "seed": 0},
    "tinyvit": {"cls": "TinyViT", "file": "tinyvit.pt", "notebook": "07_qat_transformers",
                "dataset": "mnist5k", "epochs": 8, "lr": 5e-3, "batch_size": 64, "schedule": "onecycle", "seed": 0},
}
_NOT_RECIPE = ("cls", "file", "notebook")
RECIPE = {k: v for k, v in RECIPES["smallcnn"].items() if k not in _NOT_RECIPE}


def _recipe(model):
    if model not in RECIPES:
        raise ValueError(f"model must be one of {', '.join(RECIPES)}, got {model!r}")
    return RECIPES[model]


def checkpoint_path(model="smallcnn"):
    """``build/checkpoints/<file>`` of ``model`` (``baseline.pt`` for the SmallCNN)."""
    return build_dir() / "checkpoints" / _recipe(model)["file"]


def make_model(model="smallcnn", data=None):
    """A fresh, untrained instance of ``model`` sized for ``data`` (default: 1×28×28, 10 classes)."""
    from . import models

    cls = getattr(models, _recipe(model)["cls"])
    if data is None:
        return cls()
    return cls(in_channels=data.input_shape[0], input_size=data.input_shape[1])


def save_checkpoint(net, path, **meta):
    """Save ``{"state_dict", "meta"}`` of ``net`` atomically: the old file stays until the new one is whole."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": net.state_dict(), "meta": meta}, tmp)
    return path


def train_baseline(seed=0, epochs=None, path=None, progress_desc=None, model="smallcnn"):
    """Train ``model`` on its dataset with its recipe, save it, return ``(model, history)``."""
    spec = _recipe(model)
    recipe = {k: v for k, v in spec.items() if k not in _NOT_RECIPE}
    recipe.update(seed=seed, epochs=recipe["epochs"] if epochs is None else epochs)
    set_seed(recipe["seed"])
    data = load_dataset(recipe["dataset"])
    train_loader, test_loader = data.loaders(batch_size=recipe["batch_size"], seed=recipe["seed"])
    net = make_model(model, data)
    history = train(net, train_loader, epochs=recipe["epochs"], lr=recipe["lr"],
                    schedule=recipe["schedule"], test_loader=test_loader,
                    desc=progress_desc or f"fp32 {model}")
    net.eval()
    acc = evaluate(net, test_loader)
    save_checkpoint(net, path or checkpoint_path(model), test_acc=acc, model=model, **recipe)
    return net, history


def load_baseline(path=None, train_if_missing=True, model="smallcnn"):
    """The trained fp32 ``model`` in eval mode, from ``path`` (default: its build checkpoint).

    Loaded with ``weights_only=True``: a checkpoint is data, never code.
    A missing checkpoint is retrained (``train_if_missing=True``) or raises
    ``FileNotFoundError``; a corrupt one (unreadable, or weights that do not fit
    the model) is retrained with a warning, or raises ``ValueError``.
    """
    from pathlib import Path

    _recipe(model)
    path = Path(path) if path is not None else checkpoint_path(model)
    if not path.exists():
        if not train_if_missing:
            nb = RECIPES[model]["notebook"]
            raise FileNotFoundError(f"no {model} checkpoint at {path}; run notebook {nb} first")
        with locked(path):  # another process training the same baseline: wait for it, then load its file
            if not path.exists():
                warnings.warn(f"no {model} checkpoint at {path}: training it now", stacklevel=2)
                net, _ = train_baseline(path=path, model=model)
                return net
    net = make_model(model)
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        net.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # truncated file, foreign pickle, wrong model: all mean "retrain"
        if not train_if_missing:
            raise ValueError(f"{model} checkpoint {path} is corrupt or not a {model}: {e}") from e
        warnings.warn(f"{model} checkpoint {path} is corrupt or not a {model} "
                      f"({type(e).__name__}): training it again", stacklevel=2)
        net, _ = train_baseline(path=path, model=model)
        return net
    net.baseline_meta = ckpt.get("meta", {})
    return net.eval()


def load_baseline_and_data(batch_size=64, seed=0, model="smallcnn"):
    """``(model, data, train_loader, test_loader)``: what most notebooks start with."""
    net = load_baseline(model=model)
    data = load_dataset(_recipe(model)["dataset"])
    train_loader, test_loader = data.loaders(batch_size=batch_size, seed=seed)
    return net, data, train_loader, test_loader
