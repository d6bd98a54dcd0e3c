"""Your model and data for ``python -m qatlab.train_qat``: ``MODULE:CALLABLE`` specs, checked before training.

Taught in 08_qat_at_scale (the entry point). ``--model my_model.py:resnet20`` and
``--data my_model.py:cifar10`` name a callable in a module: ``MODULE`` is an importable
module name (``mypkg.models``) or a path to a ``.py`` file. The model callable returns an
``nn.Module``; the data callable returns ``(train_dataset, test_dataset)`` whose items are
``(input, label)`` pairs. Every way a spec can be wrong raises :class:`SpecError` (a
``ValueError``; a wrong type also a ``TypeError``) whose message names the spec, before
anything is trained or written.
"""

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path


class SpecError(ValueError):
    """A ``--model`` / ``--data`` / ``--init`` that cannot be used; the message names it."""


class SpecTypeError(SpecError, TypeError):
    """A spec whose callable returns the wrong type."""


def is_spec(text):
    """Whether ``text`` names a callable (``MODULE:CALLABLE``) rather than a built-in model.

    >>> is_spec("my_model.py:resnet20"), is_spec("smallcnn")
    (True, False)
    """
    return isinstance(text, str) and ":" in text


def split_spec(spec, flag="--model"):
    """``(module, callable_name)`` of ``MODULE:CALLABLE``; the last ``:`` splits (Windows paths keep theirs).

    >>> split_spec("notebooks/my_model.py:resnet20")
    ('notebooks/my_model.py', 'resnet20')
    >>> split_spec("my_model.py:")
    Traceback (most recent call last):
    ...
    qatlab.user_spec.SpecError: --model 'my_model.py:' must be MODULE:CALLABLE (a module name or a .py file, a colon, a function name)
    """
    if not isinstance(spec, str):
        raise SpecTypeError(f"{flag} must be a string MODULE:CALLABLE, got {type(spec).__name__}")
    module, _, name = spec.rpartition(":")
    if not module or not name or not name.replace(".", "_").isidentifier():
        raise SpecError(f"{flag} {spec!r} must be MODULE:CALLABLE (a module name or a .py file, a colon, "
                        f"a function name)")
    return module, name


def load_callable(spec, flag="--model"):
    """The callable that ``MODULE:CALLABLE`` names. ``MODULE`` ending in ``.py`` (or an existing file) is loaded
    from that path, under a private module name; otherwise it is imported. ``CALLABLE`` may be dotted
    (``Class.method``). Raises :class:`SpecError` for a missing module or attribute, or a non-callable.
    """
    module_name, attr = split_spec(spec, flag)
    path = Path(module_name)
    if module_name.endswith(".py") or path.is_file():
        if not path.is_file():
            raise SpecError(f"{flag} {spec!r}: module file {module_name!r} not found")
        # a name from the file's path, the same in every process (hash() of a str is salted per process),
        # so that what records module names (a saved program's metadata) is the same from run to run
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        unique = f"qatlab_user_{digest}_{path.stem}"
        if unique in sys.modules:
            module = sys.modules[unique]
        else:
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[unique] = module
            # the file's own folder first on the path, so it can import its neighbours
            folder = str(path.resolve().parent)
            added = folder not in sys.path
            if added:
                sys.path.insert(0, folder)
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[unique]
                raise
            finally:
                if added:
                    sys.path.remove(folder)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):  # the module itself, not one it imports
                raise SpecError(f"{flag} {spec!r}: module {module_name!r} not found (neither importable "
                                f"nor a .py file)") from None
            raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise SpecError(f"{flag} {spec!r}: {module_name!r} has no callable {attr!r} "
                            f"(it has: {', '.join(public) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecTypeError(f"{flag} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def load_user_model(spec, init=None):
    """The ``nn.Module`` that ``--model MODULE:CALLABLE`` returns, with ``--init`` weights if given (CPU, eval).

    ``init`` is a file holding a state dict, or ``{"state_dict": ...}`` (qatlab's checkpoints),
    loaded with ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``; missing or
    unexpected keys and shape mismatches raise :class:`SpecError` naming the file.
    """
    import torch
    from torch import nn

    model = load_callable(spec, "--model")()
    if not isinstance(model, nn.Module):
        raise SpecTypeError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if init is not None:
        path = Path(init)
        if not path.is_file():
            raise SpecError(f"--init {str(init)!r}: no such file")
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise SpecError(f"--init {str(init)!r} cannot be loaded with weights_only=True: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise SpecTypeError(f"--init {str(init)!r} holds a {type(state).__name__}, not a state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise SpecError(f"--init {str(init)!r} does not fit --model {spec!r}: {e}") from e
    return model.cpu().eval()


def _describe(item):
    import torch

    if isinstance(item, torch.Tensor):
        return f"Tensor{tuple(item.shape)}"
    return type(item).__name__


def _check_pair(item, spec, which):
    """``(input, label)`` of a dataset item, or :class:`SpecError` naming the spec."""
    import torch

    if not isinstance(item, list | tuple) or len(item) != 2:
        got = (f"a {type(item).__name__} of {len(item)}" if isinstance(item, list | tuple)
               else f"a {_describe(item)}")
        raise SpecTypeError(f"--data {spec!r}: {which} items must be (input, label) pairs, got {got}")
    x, y = item
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise SpecTypeError(f"--data {spec!r}: a {which} input must be a float tensor (one example, no batch "
                            f"dimension), got {_describe(x)}"
                            + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if isinstance(y, torch.Tensor):
        ok = y.numel() == 1 and not y.is_floating_point() and not y.is_complex()
    else:
        ok = isinstance(y, int) and not isinstance(y, bool)
    if not ok:
        raise SpecTypeError(f"--data {spec!r}: a {which} label must be a class index (an int or a 0-d integer "
                            f"tensor), got {_describe(y)}")
    return x, y


def load_user_data(spec):
    """``(train_dataset, test_dataset, input_shape)`` from ``--data MODULE:CALLABLE``, checked.

    Both datasets need ``__len__`` and ``__getitem__`` with at least one item; their first items
    must be ``(input, label)`` pairs with a float input tensor (no batch dimension) of the same
    shape, which becomes ``input_shape``, and an integer class label.
    """
    got = load_callable(spec, "--data")()
    if not isinstance(got, list | tuple) or len(got) != 2:
        what = f"a {type(got).__name__}" + (f" of {len(got)}" if isinstance(got, list | tuple) else "")
        raise SpecTypeError(f"--data {spec!r} must return (train_dataset, test_dataset), got {what}")
    shapes = []
    for which, ds in zip(("train", "test"), got):
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise SpecTypeError(f"--data {spec!r}: the {which} dataset (a {type(ds).__name__}) has no "
                                f"__len__ / __getitem__")
        if len(ds) < 1:
            raise SpecError(f"--data {spec!r}: the {which} dataset is empty")
        x, _ = _check_pair(ds[0], spec, which)
        shapes.append(tuple(x.shape))
    if shapes[0] != shapes[1]:
        raise SpecError(f"--data {spec!r}: train inputs have shape {shapes[0]} but test inputs {shapes[1]}")
    return got[0], got[1], shapes[0]


def check_model_accepts(model, input_shape, model_name, data_name, num_classes=None):
    """Run ``model`` (eval, no grad) on a batch of 2 zero inputs of ``input_shape``; return its output shape.

    A model that refuses the shape, or returns something other than a ``(2, classes)`` tensor of
    logits, raises :class:`SpecError` naming both specs.
    """
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise SpecError(f"--model {model_name!r} refuses inputs of shape {tuple(input_shape)} (from --data "
                        f"{data_name!r}; a batch of 2): {type(e).__name__}: {e}") from e
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise SpecTypeError(f"--model {model_name!r} must return logits of shape (batch, classes) for inputs of "
                            f"shape {tuple(input_shape)}, got {_describe(out)}")
    if num_classes is not None and out.shape[1] <= num_classes - 1:
        raise SpecError(f"--model {model_name!r} returns {out.shape[1]} logits, but --data {data_name!r} has "
                        f"label {num_classes - 1}")
    return tuple(out.shape)


class IndexedDataset:
    """``(input, label, index)`` items of a dataset of ``(input, label)`` pairs (the index records data order)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i
