"""``python -m qatlab.train_qat``: the course's QAT recipe on your model and data, on one process or many.

Command-line flags (``--help`` prints the same list with defaults)::

    what to train
      --model NAME | MODULE:CALLABLE   smallcnn or tinymobilenet (a course baseline), or your model:
                                       MODULE is an importable module name or a path to a .py file,
                                       CALLABLE returns an nn.Module (e.g. my_model.py:resnet20)
      --data MODULE:CALLABLE           your data (needed with --model MODULE:CALLABLE): CALLABLE
                                       returns (train_dataset, test_dataset) of (input, label) pairs;
                                       the export's input shape is read from the first input
      --dataset NAME                   the course dataset of a built-in model (default mnist5k)
      --init FILE.pt                   fp32 weights for your model: a state dict (or {"state_dict": ...}),
                                       loaded with weights_only=True; without it, the callable's weights
      --api auto|pt2e|eager            auto (default): pt2e for your model, eager for a built-in one
    the recipe (qatlab.recipe.QATRecipe; defaults from the course's measurements)
      --steps N  --global-batch-size N  --lr LR  --momentum M
      --freeze-bn-at STEP|never        --freeze-observers-at STEP|never
      --bn-freeze-lr-factor F          learning rate x F from the BN freeze on (1 = no drop)
      --weight-bits B  --activation-bits B   (eager only; pt2e uses XNNPACK's 8-bit config)
      --seed S  --augment-shift PIXELS
    where and how
      --device auto|cpu|cuda           --amp (bfloat16 autocast, CUDA only)  --threads N
      --backend auto|gloo|nccl  --timeout SECONDS  --no-forward-sync-buffers  --sync-bn
    outputs
      --out DIR  --checkpoint-every STEPS  --resume  --log-every N  --no-progress
      --calib-batches N                PTQ calibration batches for the PTQ comparison row
      --no-pte                         skip the ExecuTorch .pte (pt2e)
      --scaling-rounds N  --scaling-steps STEPS

From Python (a notebook): ``metrics = qatlab.train_qat.main([...same flags...])`` returns the
metrics dict that ``DIR/metrics.json`` holds (``None`` on ranks other than 0).

Taught in 08_qat_at_scale. The same command runs alone or under ``torchrun``::

    python -m qatlab.train_qat --steps 200                                  # one process
    torchrun --standalone --nproc_per_node=2 -m qatlab.train_qat --steps 200   # 2 processes, one machine
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --rdzv-id=JOB -m qatlab.train_qat ...     # on every node

(On several nodes the variable gives every ``--max-restarts`` round a fresh rendezvous store:
see :func:`qatlab.distributed.restart_store_prefix`.)

What a run does, on every process (rank):

1. joins the process group when ``torchrun`` started it (gloo on CPU, nccl when CUDA is present);
2. loads the fp32 baseline (:func:`qatlab.baseline.load_baseline`) and prepares eager QAT
   (:func:`qatlab.qat.prepare_eager_qat` with :func:`qatlab.qat.make_qconfig`), or with
   ``--api pt2e`` exports it and prepares PT2E QAT (``prepare_qat_pt2e``, XNNPACK quantizer);
3. wraps it in ``DistributedDataParallel`` and trains with SGD on its share of every global
   batch (``DistributedSampler``): ``global_batch_size = world_size * per_rank_batch``;
4. freezes BN statistics and observers on the step schedule of :func:`qatlab.qat.freeze_schedule`;
5. every ``--checkpoint-every`` steps, rank 0 writes one atomic checkpoint with every rank's state;
6. at the end, copies rank 0's QAT state to every rank (``torch.distributed.broadcast``), so
   every rank would convert the same int8 model, and rank 0 ships it;
7. with ``--scaling-rounds N``, before that, times rank 0 alone against all ranks with DDP in N
   interleaved rounds, on copies of the trained model (:func:`measure_scaling`).

Files in ``--out`` (written by rank 0, atomically):

- ``checkpoint.pt``: the training state (loaded with ``weights_only=True``). ``--resume``
  continues from it, bit for bit: model (weights, BN statistics, fake-quant scale/zero-point,
  observer min/max and on/off switches) of **every** rank, optimizer (momentum), step, every
  rank's RNG (torch, numpy, python), and the freeze state. The data position needs no state:
  the sampler's order is a function of ``(seed, epoch)``, so step ``k`` is epoch
  ``k // steps_per_epoch``, batch ``k % steps_per_epoch``.
- ``model_int8.pt``: the converted int8 model's ``state_dict`` (``model_int8.pt2``, an
  ``ExportedProgram``, with ``--api pt2e``); load either with :func:`load_int8_model`.
- ``metrics.json``: losses, accuracies, per-rank scales, digests, timings.
"""

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

from .distributed import (
    _env_world_size,
    broadcast_state,
    capture_rng,
    gather_to_rank0,
    init_distributed,
    max_rel_diff,
    restore_rng,
    state_digest,
)

FORMAT = "qatlab.train_qat/1"
# settings that must match for --resume to continue the same run (``steps`` may grow)
RECIPE_KEYS = ("model", "dataset", "api", "global_batch_size", "lr", "momentum", "weight_bits",
               "activation_bits", "freeze_bn_at", "freeze_observers_at", "seed",
               "forward_sync_buffers", "augment_shift", "sync_bn")


def _never_or_int(text):
    """argparse type: a non-negative step, or ``never``."""
    if text == "never":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'never', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative step, got {value}")
    return value


_DEFAULT = object()  # "not given": the freeze steps then follow --steps


@dataclass(frozen=True)
class Config:
    """One run's settings (the command line, validated). Taught in 08_qat_at_scale.

    ``freeze_bn_at`` / ``freeze_observers_at`` are steps (``None`` = never).

    >>> Config(steps=10).per_rank_batch(2)
    32
    >>> Config(steps=10, global_batch_size=63).per_rank_batch(2)
    Traceback (most recent call last):
    ...
    ValueError: --global-batch-size 63 is not divisible by the 2 processes (world size): use a multiple of 2
    """

    model: str = "smallcnn"
    dataset: str = "mnist5k"
    api: str = "eager"
    steps: int = 40
    global_batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_bits: int = 8
    activation_bits: int = 8
    freeze_bn_at: int | None = None
    freeze_observers_at: int | None = None
    seed: int = 0
    forward_sync_buffers: bool = True
    sync_bn: bool = False
    augment_shift: int = 0
    checkpoint_every: int = 0
    scaling_rounds: int = 0
    scaling_steps: int = 10
    resume: bool = False
    out: str = ""
    threads: int | None = None
    backend: str = "auto"
    log_every: int = 10
    progress: bool = True
    timeout: float = 600.0

    def __post_init__(self):
        from .baseline import RECIPES
        from .data import DATASETS
        from .qat import BITS_MAX, BITS_MIN

        if self.model not in RECIPES:
            raise ValueError(f"--model must be one of {', '.join(RECIPES)}, got {self.model!r}")
        if self.model == "tinyvit":
            raise ValueError("--model tinyvit has no conv-BN blocks and no QuantStub, so the eager "
                             "recipe cannot prepare it; use smallcnn or tinymobilenet")
        if self.api not in ("eager", "pt2e"):
            raise ValueError(f"--api must be eager or pt2e, got {self.api!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        for name in ("steps", "global_batch_size", "log_every", "scaling_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")
        for name in ("checkpoint_every", "augment_shift", "seed", "scaling_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative int, got {v!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.momentum, int | float) and 0 <= self.momentum < 1):
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("weight_bits", "activation_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not BITS_MIN <= v <= BITS_MAX:
                raise ValueError(f"--{name.replace('_', '-')} must be an int in {BITS_MIN}..{BITS_MAX}, got {v!r}")
        for name in ("freeze_bn_at", "freeze_observers_at"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative step or None, got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"--threads must be a positive int, got {self.threads!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"--backend must be auto, gloo or nccl, got {self.backend!r}")
        if not (isinstance(self.timeout, int | float) and self.timeout > 0):
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.api == "pt2e":
            if (self.weight_bits, self.activation_bits) != (8, 8):
                raise ValueError(f"--api pt2e uses XNNPACK's 8-bit QAT config; got --weight-bits "
                                 f"{self.weight_bits} --activation-bits {self.activation_bits}")
            if self.freeze_bn_at is not None:
                raise ValueError(f"--api pt2e cannot freeze BN statistics during training (got --freeze-bn-at "
                                 f"{self.freeze_bn_at}); the exported graph has no freeze_bn_stats: use "
                                 f"--freeze-bn-at never")
            if self.sync_bn:
                raise ValueError("--sync-bn needs the eager API: an exported graph's BatchNorm is an "
                                 "operator, not a module that convert_sync_batchnorm can replace")

    def per_rank_batch(self, world_size):
        """The batch each of ``world_size`` processes trains on: ``global_batch_size / world_size``."""
        if self.global_batch_size % world_size:
            raise ValueError(f"--global-batch-size {self.global_batch_size} is not divisible by the "
                             f"{world_size} processes (world size): use a multiple of {world_size}")
        return self.global_batch_size // world_size

    def recipe(self, world_size):
        """What ``--resume`` checks: the settings that define the run, plus the world size."""
        return {**{k: getattr(self, k) for k in RECIPE_KEYS}, "world_size": world_size}


def build_parser():
    """The argparse parser of ``python -m qatlab.train_qat`` (see ``--help``).

    Taught in 08_qat_at_scale.
    """
    p = argparse.ArgumentParser(
        prog="python -m qatlab.train_qat",
        description="Quantization-aware training (eager torch.ao recipe) of a qatlab baseline, on one "
                    "process or under torchrun with DistributedDataParallel; writes a checkpoint, the "
                    "converted int8 model and metrics.json. Taught in notebook 08_qat_at_scale.",
        epilog="Examples: python -m qatlab.train_qat --steps 200 | torchrun --standalone "
               "--nproc_per_node=2 -m qatlab.train_qat --steps 200 --checkpoint-every 50")
    # the defaults without validating them: Config() would import torch, and --help needs none of it
    d = argparse.Namespace(**{f.name: f.default for f in fields(Config)})
    p.add_argument("--model", default=d.model, help="baseline to quantize: smallcnn or tinymobilenet "
                   "(default: %(default)s; trained first if its checkpoint is missing)")
    p.add_argument("--dataset", default=d.dataset, help="qatlab dataset (default: %(default)s, offline)")
    p.add_argument("--api", default=d.api, choices=("eager", "pt2e"),
                   help="eager: torch.ao prepare_qat/convert (default); pt2e: torch.export + "
                        "prepare_qat_pt2e with XNNPACKQuantizer + convert_pt2e")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total (default: %(default)s)")
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size,
                   help="images per step over all processes; each gets 1/world_size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-bits", type=int, default=d.weight_bits, help="default: %(default)s")
    p.add_argument("--activation-bits", type=int, default=d.activation_bits, help="default: %(default)s")
    p.add_argument("--freeze-bn-at", type=_never_or_int, default=_DEFAULT, metavar="STEP",
                   help="freeze BN statistics from this step on, or 'never' (default: half of --steps; "
                        "never with --api pt2e)")
    p.add_argument("--freeze-observers-at", type=_never_or_int, default=_DEFAULT, metavar="STEP",
                   help="freeze observers (scale, zero-point) from this step on, or 'never' "
                        "(default: three quarters of --steps)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="data order (same on every rank) and RNG (seed + rank) (default: %(default)s)")
    p.add_argument("--no-forward-sync-buffers", "--no-broadcast-buffers", dest="forward_sync_buffers",
                   action="store_false",
                   help="do not copy rank 0's buffers (BN statistics, observers) to every rank at the start of "
                        "each forward: DDP's forward_sync_buffers=False (called broadcast_buffers before "
                        "torch 2.13; unlike the old broadcast_buffers=False, DDP still copies them once when "
                        "it wraps the model)")
    p.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm: BN statistics over the global batch (needs CUDA and >1 process)")
    p.add_argument("--augment-shift", type=int, default=d.augment_shift, metavar="PIXELS",
                   help="random translation of each training image by up to PIXELS (default: 0 = off)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="write OUT/checkpoint.pt every STEPS steps (0: only at the end; default: %(default)s)")
    p.add_argument("--scaling-rounds", type=int, default=d.scaling_rounds, metavar="N",
                   help="after training, time N interleaved rounds of rank 0 alone (no DDP, the whole global "
                        "batch) and of all processes (DDP), on copies of the trained model, for the scaling "
                        "efficiency; needs more than one process (default: 0 = off)")
    p.add_argument("--scaling-steps", type=int, default=d.scaling_steps, metavar="STEPS",
                   help="timed steps per mode and round of --scaling-rounds, after one untimed step "
                        "(default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists (else start at step 0)")
    p.add_argument("--out", default="", help="output folder (default: <build>/train_qat)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's; torchrun sets 1)")
    p.add_argument("--backend", default=d.backend, choices=("auto", "gloo", "nccl"),
                   help="process-group backend (default: auto = nccl with CUDA, else gloo)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="log every N steps (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds a collective may wait for another rank (default: %(default)s)")
    return p


def parse_args(argv=None, world_size=None):
    """Parse and validate a command line into a :class:`Config`; bad values exit with a usage error.

    Taught in 08_qat_at_scale.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    world_size = _env_world_size() if world_size is None else world_size
    values = vars(ns)
    if values["freeze_bn_at"] is _DEFAULT:
        values["freeze_bn_at"] = values["steps"] // 2 if values["api"] == "eager" else None
    if values["freeze_observers_at"] is _DEFAULT:
        values["freeze_observers_at"] = 3 * values["steps"] // 4
    try:
        cfg = Config(**values)
        cfg.per_rank_batch(world_size)
        if cfg.sync_bn and world_size < 2:
            raise ValueError("--sync-bn needs more than one process (start with torchrun "
                             "--nproc_per_node=N, N > 1)")
        if cfg.scaling_rounds and world_size < 2:
            raise ValueError("--scaling-rounds needs more than one process to compare with one (start "
                             "with torchrun --nproc_per_node=N, N > 1)")
    except ValueError as e:
        parser.error(str(e))
    return cfg


def fake_quant_modules(model):
    """``[(name, module)]`` of every FakeQuantize (activations and weights), in module order.

    Taught in 08_qat_at_scale.
    """
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "observer_enabled") and hasattr(m, "scale") and hasattr(m, "disable_observer")]


def scale_vector(model):
    """Every fake-quantizer's scale, flattened into one float64 vector (see :func:`scale_layout`).

    Taught in 08_qat_at_scale.
    """
    import torch

    return torch.cat([m.scale.detach().double().cpu().flatten() for _, m in fake_quant_modules(model)])


def scale_layout(model):
    """``[(name, kind, start, stop)]``: where each fake-quantizer's scale sits in :func:`scale_vector`.

    Taught in 08_qat_at_scale.
    """
    out, i = [], 0
    for name, m in fake_quant_modules(model):
        n = m.scale.numel()
        per_channel = "per_channel" in str(getattr(m, "qscheme", ""))  # weights; activations are per tensor
        out.append((name, "weight" if per_channel else "activation", i, i + n))
        i += n
    return out


# --- model and data -------------------------------------------------------------------------

def build_qat_model(cfg, rank=0, distributed=False, input_shape=None):
    """The baseline ``cfg.model`` prepared for QAT (train mode): eager or PT2E (``cfg.api``).

    Rank 0 loads (or, when missing, trains and saves) the baseline first; the other ranks
    wait at a barrier and then load the saved file, so it is trained once. ``input_shape``
    (C, H, W) of the data must be the one the baseline was trained on.

    Taught in 08_qat_at_scale.
    """
    from .baseline import load_baseline
    from .qat import make_qconfig, prepare_eager_qat

    if distributed:
        import torch.distributed as dist

        if rank == 0:
            model = load_baseline(model=cfg.model)
        dist.barrier()
        if rank != 0:
            model = load_baseline(model=cfg.model, train_if_missing=False)
    else:
        model = load_baseline(model=cfg.model)
    want = (model.in_channels, model.input_size, model.input_size)
    if input_shape is not None and tuple(input_shape) != want:
        raise ValueError(f"--dataset {cfg.dataset} has images {tuple(input_shape)}, but the "
                         f"{cfg.model} baseline was trained on {want}")
    if cfg.api == "pt2e":
        return _prepare_pt2e(model.train(), want)
    with _quiet_eager_api():
        prepare_eager_qat(model.train(), make_qconfig(cfg.weight_bits, cfg.activation_bits))
    return model


def _prepare_pt2e(model, input_shape):
    """``torch.export`` (batch dimension dynamic) → ``prepare_qat_pt2e`` with XNNPACK's QAT config.

    The same steps as notebook 04; the result takes ``.train()`` / ``.eval()``
    (:func:`qatlab.qat.allow_train_eval`).
    """
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from .qat import allow_train_eval

    example = (torch.zeros(2, *input_shape),)  # zeros: exporting draws no random numbers
    exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    prepared = allow_train_eval(prepare_qat_pt2e(exported, quantizer))
    prepared.input_shape = tuple(input_shape)
    return prepared.train()


@contextlib.contextmanager
def _quiet_eager_api():
    """torch.ao's eager API warns that it is deprecated on every call (shown once in notebook 04)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


def shift_images(x, pixels):
    """Translate each image by its own random ``(dy, dx)`` in ``[-pixels, pixels]`` (torch RNG).

    ``pixels=0`` returns ``x`` and draws nothing.

    Taught in 08_qat_at_scale.

    >>> import torch
    >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> shift_images(x, 0) is x
    True
    """
    import torch

    if pixels == 0:
        return x
    shifts = torch.randint(-pixels, pixels + 1, (x.shape[0], 2)).tolist()
    return torch.stack([torch.roll(img, (dy, dx), dims=(-2, -1)) for img, (dy, dx) in zip(x, shifts)])


class _SkipSampler:
    """A sampler's indices from position ``skip`` on: resume in the middle of an epoch."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


# --- checkpoints ----------------------------------------------------------------------------

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


def freeze_state(model):
    """``{"observers_frozen", "bn_frozen"}`` of a prepared eager QAT model, read from its modules.

    Taught in 08_qat_at_scale.
    """
    fqs = [m for _, m in fake_quant_modules(model)]
    bns = [m for m in model.modules() if hasattr(m, "freeze_bn")]
    return {"observers_frozen": bool(fqs) and all(int(m.observer_enabled[0]) == 0 for m in fqs),
            "bn_frozen": bool(bns) and all(m.freeze_bn for m in bns)}


def restore_freeze_state(model, freeze):
    """Re-apply a saved freeze state after ``load_state_dict``.

    The observers' on/off switch is a buffer (``observer_enabled``), so ``load_state_dict``
    restores it. A fused ConvBn's ``freeze_bn`` is a plain attribute, not in the state dict:
    without this call a resumed run would update BN statistics that the original had frozen.
    Taught in 08_qat_at_scale.
    """
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats

    if freeze["observers_frozen"]:
        for _, m in fake_quant_modules(model):  # torch.ao's and torchao's (PT2E) FakeQuantize
            m.disable_observer()
    if freeze["bn_frozen"]:
        model.apply(freeze_bn_stats)
    return model


# --- convert and ship -----------------------------------------------------------------------

def convert_int8(model):
    """A converted (int8, CPU) copy of a QAT model; ``model`` itself is left as it is.

    Eager: ``torch.ao.quantization.convert``. PT2E (a ``GraphModule``):
    ``move_exported_model_to_eval`` then ``convert_pt2e``.

    Taught in 08_qat_at_scale.
    """
    import torch

    m = copy.deepcopy(model).cpu()
    if isinstance(m, torch.fx.GraphModule):
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from .qat import allow_train_eval

        m = move_exported_model_to_eval(m)
        m.training = False
        converted = allow_train_eval(convert_pt2e(m)).eval()
        converted.input_shape = model.input_shape  # a deepcopy of a GraphModule drops extra attributes
        return converted
    from torch.ao.quantization import convert

    with _quiet_eager_api():
        return convert(m.eval())


def save_int8_model(model, path, meta):
    """Write a converted model atomically: eager → ``state_dict`` + ``meta`` (``.pt``);
    PT2E → a re-exported ``ExportedProgram`` (``.pt2``). Returns the path written.

    Taught in 08_qat_at_scale.
    """
    import io
    from pathlib import Path

    import torch

    from .files import atomic_path

    path = Path(path)
    if isinstance(model, torch.fx.GraphModule):
        path = path.with_suffix(".pt2")
        example = (torch.zeros(2, *model.input_shape),)
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)  # to memory first: the temporary name is not *.pt2
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
        return path
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    return path


def load_int8_model(path):
    """The int8 model that ``python -m qatlab.train_qat`` shipped, in eval mode.

    ``model_int8.pt`` (eager): rebuilds the converted module structure from the recorded model
    name and bit widths and loads the saved ``state_dict`` with ``weights_only=True``.
    ``model_int8.pt2`` (PT2E): ``torch.export.load``. Taught in 08_qat_at_scale.
    """
    import torch

    if str(path).endswith(".pt2"):
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

        return torch.export.load(str(path)).module()

    from .baseline import make_model
    from .qat import make_qconfig, prepare_eager_qat

    with _quiet_eager_api():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        meta = saved["meta"]
        model = make_model(meta["model"]).train()
        prepare_eager_qat(model, make_qconfig(meta["weight_bits"], meta["activation_bits"]))
        # give the observers a shape (then overwritten); zeros, so no random numbers are drawn
        model(torch.zeros(2, model.in_channels, model.input_size, model.input_size))
        int8 = convert_int8(model)
        int8.load_state_dict(saved["state_dict"])
    return int8.eval()


def _write_json(path, obj):
    from .files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# --- the run --------------------------------------------------------------------------------

def _log(d, *args):
    if d.rank == 0:
        print("train_qat:", *args, flush=True)


def run(cfg, d=None):
    """Train, checkpoint, convert and ship as :data:`cfg` says; return the metrics (rank 0) or ``None``.

    Taught in 08_qat_at_scale.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from tqdm.auto import tqdm

    from .data import load_dataset
    from .files import build_dir
    from .qat import freeze_schedule, observers_disabled
    from .training import evaluate, set_seed

    started = time.perf_counter()
    d = d or init_distributed(cfg.backend, cfg.timeout)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = os.path.abspath(cfg.out) if cfg.out else str(build_dir() / "train_qat")
    per_rank = cfg.per_rank_batch(d.world_size)
    recipe = cfg.recipe(d.world_size)
    set_seed(cfg.seed + d.rank)  # RNG per rank; the data order uses cfg.seed on every rank

    data = load_dataset(cfg.dataset)
    model = build_qat_model(cfg, d.rank, d.distributed, input_shape=data.input_shape)
    model.to(d.device)
    # the third tensor is each image's index, recorded to compare data orders between runs
    train_set = TensorDataset(data.x_train, data.y_train, torch.arange(len(data.y_train)))
    sampler = DistributedSampler(train_set, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                                 seed=cfg.seed)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch < 1:
        raise ValueError(f"per-process batch {per_rank} is larger than the {len(sampler)} images each "
                         f"process gets: lower --global-batch-size")

    net = model
    if d.distributed:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        try:
            net = wrap_ddp(model, cfg, d)
        except ValueError as e:
            if cfg.sync_bn:
                raise ValueError(f"--sync-bn: torch says {e!r}. SyncBatchNorm needs CUDA (nccl); on CPU "
                                 "leave it off and freeze BN statistics early (--freeze-bn-at)") from e
            raise
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    schedule = freeze_schedule(freeze_observers_at=cfg.freeze_observers_at, freeze_bn_at=cfg.freeze_bn_at)

    # per-rank records, carried in the checkpoint so a resumed run reports the whole run
    rec = {"loss": [], "indices": [], "scales": [], "step_seconds": [], "cpu_seconds": 0.0}
    start_step, resumed_from = 0, None
    ckpt_file = checkpoint_path(out)
    if cfg.resume and ckpt_file.exists():
        ckpt = load_checkpoint(ckpt_file, recipe)
        if ckpt["step"] > cfg.steps:
            raise ValueError(f"{ckpt_file} is at step {ckpt['step']}, beyond --steps {cfg.steps}")
        mine = ckpt["ranks"][d.rank]
        model.load_state_dict(mine["model"])
        model.train()
        restore_freeze_state(model, ckpt["freeze"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(mine["rng"])
        rec = mine["records"]
        start_step = resumed_from = ckpt["step"]
        _log(d, f"resumed from {ckpt_file} at step {start_step}")
    elif cfg.resume:
        _log(d, f"no checkpoint at {ckpt_file}: starting at step 0")
    model.train()

    if d.store_prefix:
        _log(d, f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}: the process group's keys go under "
                f"'{d.store_prefix}' in torchrun's shared store, apart from the failed round's")
    _log(d, f"{d.world_size} process(es), backend {d.backend}, device {d.device}, "
            f"{torch.get_num_threads()} thread(s) each; {cfg.model} on {cfg.dataset}; global batch "
            f"{cfg.global_batch_size} = {d.world_size} x {per_rank}; steps {start_step}..{cfg.steps}; "
            f"BN frozen at {cfg.freeze_bn_at}, observers at {cfg.freeze_observers_at}")

    def rank_state():
        return {"model": cpu_state_dict(model),
                "rng": capture_rng(), "records": copy.deepcopy(rec)}

    def checkpoint(step):
        t = time.perf_counter()
        states = gather_to_rank0(rank_state(), d)
        if d.rank == 0:
            save_checkpoint(ckpt_file, step=step, recipe=recipe, optimizer=optimizer.state_dict(),
                            freeze=freeze_state(model), rank_states=states)
            _log(d, f"checkpoint step {step} -> {ckpt_file} ({time.perf_counter() - t:.2f} s)")

    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"QAT x{d.world_size}", leave=False,
               disable=not cfg.progress or d.rank != 0)
    step = start_step
    # each step's wall and CPU time, from the end of the previous step (so data loading counts),
    # without checkpoint writes and logging
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while step < cfg.steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = _SkipSampler(sampler, offset * per_rank)
        # a private generator: each new iterator draws a seed from it, and from the global RNG
        # that draw would shift a resumed run's random stream
        loader = DataLoader(train_set, batch_size=per_rank, sampler=order, drop_last=True,
                            generator=torch.Generator())
        for x, y, idx in loader:
            if step >= cfg.steps:
                break
            schedule(step, model)
            x = shift_images(x, cfg.augment_shift).to(d.device)
            loss = loss_fn(net(x), y.to(d.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rec["loss"].append(loss.detach().item())
            rec["step_seconds"].append(time.perf_counter() - wall0)
            rec["cpu_seconds"] += time.process_time() - cpu0
            rec["indices"].append(idx.tolist())
            rec["scales"].append(scale_vector(model).tolist())
            step += 1
            bar.update(1)
            if d.rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                line = f"train_qat: step {step}/{cfg.steps} loss (rank 0) {rec['loss'][-1]:.4f}"
                bar.write(line) if cfg.progress else print(line, flush=True)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step)
            wall0, cpu0 = time.perf_counter(), time.process_time()
    bar.close()
    checkpoint(cfg.steps)  # the final training state: --resume of a finished run only re-ships
    layout = scale_layout(model)  # after training: per-channel scales take their shape in the first forward
    scaling = None
    if cfg.scaling_rounds:
        _log(d, f"timing {cfg.scaling_rounds} interleaved rounds of 1 and {d.world_size} processes, "
                f"{cfg.scaling_steps} steps each")
        scaling = measure_scaling(model, train_set, cfg, d, loss_fn)
    return _finish(cfg, d, model, data, rec, layout, out, started, resumed_from, evaluate,
                   observers_disabled, scaling)


def wrap_ddp(model, cfg, d):
    """``DistributedDataParallel(model)`` with ``cfg.forward_sync_buffers``. Taught in 08_qat_at_scale.

    torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers``. Both copy rank 0's
    buffers to every rank at the start of each forward when ``True``. With ``False`` the new
    flag still copies them once, when DDP wraps the model; the old one skipped that copy too.
    Here that copy is harmless: the ranks' buffers are equal before training, and a resumed
    rank loads its own state *after* wrapping.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None,
               **{name: cfg.forward_sync_buffers})


def measure_scaling(model, train_set, cfg, d, loss_fn):
    """Time one process against all of them, in ``cfg.scaling_rounds`` interleaved rounds.

    Every round runs two modes, each with one untimed SGD step and then ``cfg.scaling_steps``
    timed ones, on copies of ``model`` (its state is left as it is, and the RNGs are restored):

    - *single*: rank 0 trains a plain copy (no DDP) on the whole global batch, the work of a
      one-process run; the other ranks wait at a barrier (their CPU time is recorded too);
    - *ddp*: every rank trains a DDP copy on its share of the global batch.

    Alternating the two modes exposes both to the same background load on a shared machine.
    Returns this rank's wall and CPU seconds per round: ``{"single_seconds",
    "single_cpu_seconds", "ddp_seconds", "ddp_cpu_seconds"}`` (``single_*`` of ranks > 0:
    their wait). :func:`combine_scaling` turns every rank's into throughputs.
    Taught in 08_qat_at_scale.
    """
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    rng = capture_rng()
    cuda = d.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def trainer(net, replicas, rank, batch):
        sampler = DistributedSampler(train_set, num_replicas=replicas, rank=rank, shuffle=True, seed=cfg.seed)
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)

        def batches():
            while True:
                yield from DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                      generator=torch.Generator())

        data = batches()

        def steps(n):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                x, y, _ = next(data)
                loss = loss_fn(net(x.to(d.device)), y.to(d.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            sync()
            return time.perf_counter() - wall, time.process_time() - cpu

        return steps

    single = trainer(copy.deepcopy(model), 1, 0, cfg.global_batch_size) if d.rank == 0 else None
    ddp = trainer(wrap_ddp(copy.deepcopy(model), cfg, d), d.world_size, d.rank,
                  cfg.per_rank_batch(d.world_size))
    out = {"single_seconds": [], "single_cpu_seconds": [], "ddp_seconds": [], "ddp_cpu_seconds": []}
    for _ in range(cfg.scaling_rounds):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        if d.rank == 0:
            single(1)
            w, c = single(cfg.scaling_steps)
        dist.barrier()
        if d.rank != 0:
            w, c = time.perf_counter() - wall, time.process_time() - cpu
        out["single_seconds"].append(w)
        out["single_cpu_seconds"].append(c)
        ddp(1)
        w, c = ddp(cfg.scaling_steps)
        out["ddp_seconds"].append(w)
        out["ddp_cpu_seconds"].append(c)
    restore_rng(rng)
    return out


def combine_scaling(per_rank, images):
    """Throughputs from every rank's :func:`measure_scaling`; ``images`` per timed run (all ranks).

    Per round: *single* = ``images / rank 0's seconds``; *ddp* = ``images / slowest rank's
    seconds``; ``speedup = ddp / single``; each mode's share of a core = CPU seconds / wall
    seconds (rank 0 alone; the mean over ranks with DDP; ``waiting_cpu_share``: the other
    ranks' largest while rank 0 trains alone). Taught in 08_qat_at_scale.

    >>> r0 = {"single_seconds": [2.0], "single_cpu_seconds": [1.8], "ddp_seconds": [1.0], "ddp_cpu_seconds": [0.9]}
    >>> r1 = {"single_seconds": [2.0], "single_cpu_seconds": [0.0], "ddp_seconds": [1.25], "ddp_cpu_seconds": [1.0]}
    >>> s = combine_scaling([r0, r1], images=100)
    >>> s["single_images_per_second"], s["ddp_images_per_second"], s["speedup"], s["single_cpu_share"]
    ([50.0], [80.0], [1.6], [0.9])
    """
    r0 = per_rank[0]
    rounds = range(len(r0["ddp_seconds"]))
    single = [images / r0["single_seconds"][i] for i in rounds]
    ddp = [images / max(r["ddp_seconds"][i] for r in per_rank) for i in rounds]
    return {
        "rounds": len(rounds), "world_size": len(per_rank),
        "single_images_per_second": single, "ddp_images_per_second": ddp,
        "speedup": [b / a for a, b in zip(single, ddp)],
        "single_cpu_share": [r0["single_cpu_seconds"][i] / r0["single_seconds"][i] for i in rounds],
        "ddp_cpu_share": [sum(r["ddp_cpu_seconds"][i] / r["ddp_seconds"][i] for r in per_rank) / len(per_rank)
                          for i in rounds],
        "waiting_cpu_share": [max((r["single_cpu_seconds"][i] / r["single_seconds"][i] for r in per_rank[1:]),
                                  default=0.0) for i in rounds],
    }


def _finish(cfg, d, model, data, rec, layout, out, started, resumed_from, evaluate, observers_disabled,
            scaling=None):
    """After training: per-rank state and models, then rank 0's state on every rank, convert, ship.

    Eager: every rank converts its own state, then (after :func:`broadcast_state`) rank 0's,
    and reports both int8 models' digests. PT2E: ``convert_pt2e`` costs seconds per call,
    so only rank 0 converts (once), and every rank reports the digest of the QAT state it
    holds after the broadcast: the input of a deterministic convert.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=500)
    eager = cfg.api == "eager"
    model.eval()
    mine = {"rank": d.rank, "records": rec, "rng_digest": state_digest(capture_rng()),
            "qat_state_digest": state_digest(model.state_dict()),
            "param_digest": state_digest(dict(model.named_parameters())),
            "bn_running_var": torch.cat([b.detach().double().cpu().flatten() for n, b in model.named_buffers()
                                         if n.endswith("running_var")] or [torch.zeros(0)]).tolist(),
            "own_int8_digest": None, "own_int8_acc": None, "scaling": scaling}
    if eager:
        own = convert_int8(model)  # what this rank would ship if it converted its own state
        mine.update(own_int8_digest=state_digest(own.state_dict()),
                    own_int8_acc=evaluate(own, test_loader, device="cpu"))
    broadcast_state(model, d, src=0)  # the practitioner's rule: ship rank 0's state, everywhere
    shipped = convert_int8(model) if eager or d.rank == 0 else None
    mine["shipped_digest"] = state_digest(shipped.state_dict() if eager else model.state_dict())
    ranks = gather_to_rank0(mine, d)
    if d.rank != 0:
        if d.distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return None

    fq_acc = _evaluate_fake_quant(model, test_loader, d.device, evaluate, observers_disabled)
    int8_acc = evaluate(shipped, test_loader, device="cpu")
    shipped_file = save_int8_model(shipped, os.path.join(out, "model_int8.pt"),
                                   {"model": cfg.model, "weight_bits": cfg.weight_bits,
                                    "activation_bits": cfg.activation_bits, "format": FORMAT})
    metrics = _metrics(cfg, d, ranks, layout, fq_acc, int8_acc, resumed_from, started)
    if scaling is not None:
        metrics["scaling"] = combine_scaling([r["scaling"] for r in ranks],
                                             images=cfg.global_batch_size * cfg.scaling_steps)
    metrics["shipped_file"] = str(shipped_file)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    _log(d, f"done: fake-quant {fq_acc:.2f} %, int8 {int8_acc:.2f} %, shipped model identical on every "
            f"rank: {bool(metrics['shipped_model_rank_independent'])}; "
            f"{metrics['samples_per_second']:.0f} images/s -> {out}")
    if d.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def _evaluate_fake_quant(model, loader, device, evaluate, observers_disabled):
    with observers_disabled(model):
        return evaluate(model, loader, device=device)


def _metrics(cfg, d, ranks, layout, fq_acc, int8_acc, resumed_from, started):
    import torch

    steps = cfg.steps
    loss = [sum(r["records"]["loss"][t] for r in ranks) / len(ranks) for t in range(steps)]
    order = hashlib.sha256()
    for t in range(steps):
        order.update(repr(sorted(i for r in ranks for i in r["records"]["indices"][t])).encode())
    scales = [torch.tensor(r["records"]["scales"], dtype=torch.float64) for r in ranks]  # steps x n
    act = [i for name, kind, a, b in layout if kind == "activation" for i in range(a, b)]
    per_step = [max_rel_diff([s[t] for s in scales]) for t in range(steps)]
    per_step_act = [max_rel_diff([s[t, act] for s in scales]) for t in range(steps)]
    # throughput: skip the first steps (allocator, kernel and DDP bucket warm-up) on every run
    warmup = min(3, steps // 4)
    wall = max(sum(r["records"]["step_seconds"][warmup:]) for r in ranks)
    timed = steps - warmup
    return {
        "config": asdict(cfg), "world_size": d.world_size, "backend": d.backend, "device": d.device,
        "threads": torch.get_num_threads(), "per_rank_batch": cfg.per_rank_batch(d.world_size),
        "steps": steps, "resumed_from_step": resumed_from,
        "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "store_prefix": d.store_prefix,
        "loss": loss, "loss_per_rank": [r["records"]["loss"] for r in ranks],
        "data_order_sha256": order.hexdigest()[:16],
        "fake_quant_acc": fq_acc, "int8_acc": int8_acc,
        "scale_layout": [list(x) for x in layout],
        "final_scales_per_rank": [s[-1].tolist() for s in scales],
        "scale_rel_diff_per_step": per_step, "activation_scale_rel_diff_per_step": per_step_act,
        "ranks_scale_max_rel_diff": per_step[-1],
        "ranks_activation_scale_max_rel_diff": per_step_act[-1],
        "bn_running_var_max_rel_diff": max_rel_diff([r["bn_running_var"] for r in ranks]),
        "own_int8_acc_per_rank": [r["own_int8_acc"] for r in ranks],
        "own_int8_digest_per_rank": [r["own_int8_digest"] for r in ranks],
        "shipped_digest_per_rank": [r["shipped_digest"] for r in ranks],
        "shipped_model_rank_independent": int(len({r["shipped_digest"] for r in ranks}) == 1),
        "rank_independence_of": "int8 model" if cfg.api == "eager" else "QAT state before convert_pt2e",
        "qat_state_digest_per_rank": [r["qat_state_digest"] for r in ranks],
        "param_digest_per_rank": [r["param_digest"] for r in ranks],
        "rng_digest_per_rank": [r["rng_digest"] for r in ranks],
        "warmup_steps": warmup, "train_seconds": wall,
        "samples_per_second": cfg.global_batch_size * timed / wall if wall > 0 else float("nan"),
        "cpu_over_wall_per_rank": [r["records"]["cpu_seconds"] / max(sum(r["records"]["step_seconds"]), 1e-9)
                                   for r in ranks],
        "seconds": time.perf_counter() - started,
    }


# --- for notebooks and tests: run the entry point as a job, compare checkpoints ----------------

def launch(args, out, nproc=None, *, max_restarts=0, on_line=None, echo=True, timeout=900.0):
    """Run ``python -m qatlab.train_qat <args> --out <out>`` as a separate job; return its metrics.

    ``nproc=None``: one plain process; ``nproc=N``: torchrun with N workers, rendezvous on
    127.0.0.1 (:func:`qatlab.distributed.torchrun_command`). Every stdout line is printed
    (``echo``) and passed to ``on_line(line, job)``, which may e.g. kill a worker
    (:meth:`qatlab.distributed.Job.kill_rank`). When this returns, by any path, every process
    of the job is gone: it is killed if needed and checked in ``/proc``. The metrics get
    ``launch_seconds``, the job's wall time. Taught in 08_qat_at_scale.
    """
    from pathlib import Path

    from .distributed import Job, torchrun_command

    out = Path(out)
    cmd = torchrun_command([*args, "--out", str(out)], nproc=nproc, max_restarts=max_restarts)
    with Job(cmd, log=out.parent / f"{out.name}.log", timeout=timeout) as job:
        for line in job.lines():
            if echo:
                print("  " + line, flush=True)
            if on_line is not None:
                on_line(line, job)
        job.check(job.wait())
    if job.leftovers():
        raise RuntimeError(f"processes left behind: {job.leftovers()}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["launch_seconds"] = job.seconds
    return metrics


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


def main(argv=None):
    """Entry point of ``python -m qatlab.train_qat`` (and of ``torchrun ... -m qatlab.train_qat``).

    Taught in 08_qat_at_scale.
    """
    cfg = parse_args(argv)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
