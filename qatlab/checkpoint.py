"""QAT training checkpoints: written atomically, loaded with ``weights_only=True``, compared bit for bit.

Taught in 08_qat_at_scale; used by :mod:`qatlab.train_qat`. A checkpoint holds the training
state of **every** rank (model, RNG, records), the optimizer (momentum), the step, the freeze
state and the settings of the run (``recipe``), which ``--resume`` checks before continuing.
"""

import copy

from .distributed import state_digest

FORMAT = "qatlab.train_qat/1"


def checkpoint_path(out):
    """``<out>/checkpoint.pt``: where a run in ``out`` checkpoints and resumes. Taught in 08_qat_at_scale."""
    from pathlib import Path

    return Path(out) / "checkpoint.pt"


def save_checkpoint(path, *, step, recipe, optimizer, freeze, rank_states):
    """Write the training state atomically (:func:`qatlab.files.atomic_path`): all or nothing.

    Taught in 08_qat_at_scale.
    """
    import torch

    from .files import atomic_path

    payload = {"format": FORMAT, "step": step, "recipe": recipe, "optimizer": optimizer,
               "freeze": freeze, "ranks": rank_states}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path, recipe=None):
    """Load a checkpoint with ``weights_only=True``; check it continues the run ``recipe`` describes.

    A checkpoint from another run (other model, batch, schedule, seed or world size) raises
    ``ValueError`` naming every setting that differs.

    Taught in 08_qat_at_scale.
    """
    import torch

    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qatlab.train_qat checkpoint (format {ckpt.get('format')!r})"
                         if isinstance(ckpt, dict) else f"{path} is not a qatlab.train_qat checkpoint")
    if recipe is not None:
        diff = {k: (ckpt["recipe"].get(k), v) for k, v in recipe.items() if ckpt["recipe"].get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {path}: it belongs to another run ({what})")
    return ckpt


def cpu_state_dict(model):
    """A CPU copy of ``model.state_dict()`` that keeps its ``_metadata`` (each module's version).

    Without it, ``load_state_dict`` takes the state for an old version: torchao's observers,
    for one, then reset their ``eps`` to the float32 default (PT2E's XNNPACK config sets
    ``2**-12``), and the resumed state is no longer the saved one. Taught in 08_qat_at_scale.
    """
    from collections import OrderedDict

    state = model.state_dict()
    out = OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())
    out._metadata = copy.deepcopy(getattr(state, "_metadata", OrderedDict()))
    return out



def checkpoint_differences(path_a, path_b):
    """``(compared, differing)``: how many entries two checkpoints hold, and which are not bit-identical.

    Compares the step, the freeze state, the optimizer (momentum buffers), and for every rank
    each model tensor (``torch.equal``: same dtype, shape and bits) and the RNG states.
    ``differing == []`` means the two training states are bit for bit the same.
    Taught in 08_qat_at_scale.
    """
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    compared, differing = 0, []
    for key in ("step", "freeze"):
        compared += 1
        if a[key] != b[key]:
            differing.append(key)
    compared += 1
    if state_digest(a["optimizer"]) != state_digest(b["optimizer"]):
        differing.append("optimizer")
    if len(a["ranks"]) != len(b["ranks"]):
        return compared + 1, differing + ["world size"]
    for r, (ra, rb) in enumerate(zip(a["ranks"], b["ranks"])):
        for k in sorted(set(ra["model"]) | set(rb["model"])):
            compared += 1
            ta, tb = ra["model"].get(k), rb["model"].get(k)
            if ta is None or tb is None or ta.dtype != tb.dtype or not _equal(ta, tb):
                differing.append(f"rank {r}: {k}")
        compared += 1
        if state_digest(ra["rng"]) != state_digest(rb["rng"]):
            differing.append(f"rank {r}: rng")
    return compared, differing


def _equal(a, b):
    """Bit-identical (``torch.equal`` would call ``0.0`` and ``-0.0`` equal)."""
    return state_digest({"t": a}) == state_digest({"t": b})


