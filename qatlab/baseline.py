"""The fp32 baseline every notebook starts from: train it once, save it, reload it.

Taught in 00_start_here. Later notebooks call :func:`load_baseline`, which loads
``build/checkpoints/baseline.pt`` or, in a fresh checkout, retrains it with the
same recipe (about 15 s on 2 cores), so any notebook runs alone.
"""

import warnings

import torch

from .data import load_dataset
from .files import atomic_path, build_dir
from .models import SmallCNN
from .training import evaluate, set_seed, train

RECIPE = {"dataset": "mnist5k", "epochs": 8, "lr": 1e-2, "batch_size": 64,
          "schedule": "onecycle", "seed": 0}


def checkpoint_path():
    return build_dir() / "checkpoints" / "baseline.pt"


def save_checkpoint(model, path, **meta):
    """Save ``{"state_dict", "meta"}`` atomically: the old file stays until the new one is whole."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    return path


def train_baseline(seed=0, epochs=None, path=None, progress_desc="fp32 baseline"):
    """Train ``SmallCNN`` on mnist5k with :data:`RECIPE`, save it, return ``(model, history)``."""
    recipe = dict(RECIPE, seed=seed, epochs=RECIPE["epochs"] if epochs is None else epochs)
    set_seed(recipe["seed"])
    data = load_dataset(recipe["dataset"])
    train_loader, test_loader = data.loaders(batch_size=recipe["batch_size"], seed=recipe["seed"])
    model = SmallCNN(in_channels=data.input_shape[0], input_size=data.input_shape[1])
    history = train(model, train_loader, epochs=recipe["epochs"], lr=recipe["lr"],
                    schedule=recipe["schedule"], test_loader=test_loader, desc=progress_desc)
    model.eval()
    acc = evaluate(model, test_loader)
    save_checkpoint(model, path or checkpoint_path(), test_acc=acc, **recipe)
    return model, history


def load_baseline(path=None, train_if_missing=True):
    """The trained fp32 baseline in eval mode, from ``path`` (default: the build checkpoint).

    Loaded with ``weights_only=True``: a checkpoint is data, never code.
    A missing checkpoint is retrained (``train_if_missing=True``) or raises
    ``FileNotFoundError``.
    """
    path = path or checkpoint_path()
    if not path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no baseline checkpoint at {path}; run notebook 00 first")
        warnings.warn(f"no baseline at {path}: training it now (about 15 s)", stacklevel=2)
        model, _ = train_baseline(path=path)
        return model
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    meta = ckpt.get("meta", {})
    model = SmallCNN()
    model.load_state_dict(ckpt["state_dict"])
    model.baseline_meta = meta
    return model.eval()


def load_baseline_and_data(batch_size=64, seed=0):
    """``(model, data, train_loader, test_loader)``: what most notebooks start with."""
    model = load_baseline()
    data = load_dataset(RECIPE["dataset"])
    train_loader, test_loader = data.loaders(batch_size=batch_size, seed=seed)
    return model, data, train_loader, test_loader
