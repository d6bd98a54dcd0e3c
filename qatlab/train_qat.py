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
      --weight-bits B  --activation-bits B   weights 2..8 bits (per channel); activations 2..8 bits
                                       with eager, 8 with pt2e (XNNPACK computes in int8)
      --seed S  --augment-shift PIXELS
    where and how
      --device auto|cpu|cuda           --amp (bfloat16 autocast, CUDA only)  --threads N
      --backend auto|gloo|nccl  --timeout SECONDS  --no-forward-sync-buffers  --sync-bn
    outputs
      --out DIR  --checkpoint-every STEPS  --resume  --log-every N  --no-progress
      --calib-batches N                PTQ calibration batches for the PTQ comparison row
      --no-pte                         skip the ExecuTorch .pte (pt2e)
      --no-ptq                         skip the PTQ comparison row (the same for every --seed)
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

1. joins the process group when ``torchrun`` started it (gloo on CPU, nccl when CUDA is present)
   and picks its device (``--device``: CUDA when present);
2. loads the data (your ``--data`` callable, checked item by item, or ``--dataset``) and the fp32
   model (your ``--model`` callable with ``--init``, run once on the data's input shape, or the
   baseline, :func:`qatlab.baseline.load_baseline`); a bad spec stops here, naming it, with nothing
   written (:mod:`qatlab.user_spec`);
3. prepares QAT on the CPU: PT2E (``torch.export`` + ``prepare_qat_pt2e`` with the XNNPACK
   quantizer, :func:`qatlab.conversion.prepare_pt2e`) or eager (:func:`qatlab.qat.prepare_eager_qat`
   with :func:`qatlab.qat.make_qconfig`), then moves it to the device;
4. wraps it in ``DistributedDataParallel`` and trains on its share of every global batch
   (``DistributedSampler``): ``global_batch_size = world_size * per_rank_batch``, optionally
   under bfloat16 autocast (``--amp``, CUDA) with the fake-quantizers kept in float32;
5. follows :class:`qatlab.recipe.QATRecipe` step by step (:meth:`~qatlab.recipe.QATRecipe.apply`):
   SGD with momentum, BN statistics frozen at ``--freeze-bn-at`` with the learning rate times
   ``--bn-freeze-lr-factor`` from there on, observers frozen at ``--freeze-observers-at``;
6. every ``--checkpoint-every`` steps, rank 0 writes one atomic checkpoint with every rank's state;
7. at the end, copies rank 0's QAT state to every rank (``torch.distributed.broadcast``), so
   every rank would convert the same int8 model, and rank 0 converts a CPU copy
   (``convert_pt2e`` / ``convert``), scores the fake-quant model, the int8 model and a PTQ model
   made from the same fp32 weights with the same quantizer settings
   (:func:`qatlab.conversion.ptq_int8`, ``--calib-batches``; skipped with ``--no-ptq``) on the test set, and with PT2E
   lowers the int8 model to an XNNPACK ``.pte``, runs it, and reports its top-1 agreement;
8. with ``--scaling-rounds N``, before that, times rank 0 alone against all ranks with DDP in N
   interleaved rounds, on copies of the trained model (:func:`qatlab.scaling.measure_scaling`).

Progress: one line every ``--log-every`` steps (step, loss, learning rate), and a tqdm bar.

Files in ``--out`` (written by rank 0, atomically):

- ``checkpoint.pt``: the training state (loaded with ``weights_only=True``). ``--resume``
  continues from it, bit for bit, eager and PT2E alike: model (weights, BN statistics,
  fake-quant scale/zero-point, observer min/max and on/off switches) of **every** rank,
  optimizer (momentum, learning rate), step, every rank's RNG (torch, numpy, python), and the
  freeze state (BN's is not in a state dict: a fused module's attribute, or a PT2E graph's
  argument). The data position needs no state: the sampler's order is a function of
  ``(seed, epoch)``, so step ``k`` is epoch ``k // steps_per_epoch``, batch ``k % steps_per_epoch``.
- ``model_int8.pt``: the converted int8 model's ``state_dict`` (``model_int8.pt2``, an
  ``ExportedProgram``, with ``--api pt2e``); load either with :func:`load_int8_model`.
- ``model_int8.pte`` (PT2E, unless ``--no-pte``): the XNNPACK program, for ExecuTorch.
- ``predictions.pt``: the test labels and each model's predicted class per test image
  (fake-quant, int8, PTQ, and the ``.pte`` when written; :func:`save_predictions`), for paired
  tests between runs; ``metrics.json`` names it (``predictions_file``).
- ``metrics.json``: losses, learning rates, accuracies (``qat_fake_quant_acc``, ``qat_int8_acc``,
  ``ptq_int8_acc``, ``pte_acc``), agreements (``pte_top1_agreement_vs_fake_quant``,
  ``pte_top1_agreement_vs_int8``, ``int8_top1_agreement_vs_fake_quant``), ``sizes`` (bytes of
  the fp32 state dict, the int8 file and the ``.pte``), the recipe, per-rank scales, digests,
  timings. ``fake_quant_acc`` / ``int8_acc`` are the same accuracies under their earlier names.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

from .checkpoint import (  # noqa: F401  (part of this module's API since notebook 08)
    FORMAT,
    checkpoint_differences,
    checkpoint_path,
    cpu_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from .conversion import (  # noqa: F401
    convert_int8,
    export_pte,
    load_int8_model,
    prepare_pt2e,
    ptq_int8,
    quiet_eager_api,
    save_int8_model,
)
from .distributed import (
    _env_world_size,
    broadcast_state,
    capture_rng,
    gather_to_rank0,
    init_distributed,
    max_rel_diff,
    restore_rng,
    state_digest,
    wrap_ddp,  # noqa: F401
)
from .recipe import (  # noqa: F401
    QATRecipe,
    fake_quant_modules,
    freeze_state,
    predict_fake_quant,
    restore_freeze_state,
)
from .scaling import combine_scaling, measure_scaling  # noqa: F401
from .user_spec import SpecError, is_spec

# settings that must match for --resume to continue the same run (``steps`` may grow)
RECIPE_KEYS = ("model", "data", "init", "dataset", "api", "global_batch_size", "lr", "momentum", "weight_bits",
               "activation_bits", "freeze_bn_at", "freeze_observers_at", "bn_freeze_lr_factor", "seed",
               "forward_sync_buffers", "augment_shift", "sync_bn")
# image shape of each qatlab dataset; the built-in baselines are trained on 1x28x28
DATASET_SHAPES = {"mnist5k": (1, 28, 28), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                  "digits": (1, 8, 8), "cifar10": (3, 32, 32)}


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
    api: str = "auto"
    data: str = ""
    init: str = ""
    steps: int = 40
    global_batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_bits: int = 8
    activation_bits: int = 8
    freeze_bn_at: int | None = None
    freeze_observers_at: int | None = None
    bn_freeze_lr_factor: float = 0.1
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
    device: str = "auto"
    amp: bool = False
    calib_batches: int = 8
    pte: bool = True
    ptq: bool = True

    @property
    def user_model(self):
        """Whether ``--model`` names your callable (``MODULE:CALLABLE``) rather than a built-in baseline."""
        return is_spec(self.model)

    def __post_init__(self):
        from .baseline import RECIPES
        from .data import DATASETS
        from .qat import BITS_MAX, BITS_MIN

        if not isinstance(self.model, str) or not (self.user_model or self.model in RECIPES):
            raise ValueError(f"--model must be one of {', '.join(RECIPES)} or MODULE:CALLABLE (your model), "
                             f"got {self.model!r}")
        if self.api == "auto":
            object.__setattr__(self, "api", "pt2e" if self.user_model else "eager")
        if self.api not in ("eager", "pt2e"):
            raise ValueError(f"--api must be auto, eager or pt2e, got {self.api!r}")
        if self.model == "tinyvit":
            raise ValueError("--model tinyvit has no conv-BN blocks and no QuantStub, so the eager "
                             "recipe cannot prepare it; use smallcnn or tinymobilenet")
        if self.user_model:
            if not self.data:
                raise ValueError(f"--model {self.model} (your model) needs --data MODULE:CALLABLE returning "
                                 f"(train_dataset, test_dataset)")
            if not is_spec(self.data):
                raise ValueError(f"--data must be MODULE:CALLABLE, got {self.data!r}")
        else:
            if self.data or self.init:
                raise ValueError(f"--data and --init go with your own --model MODULE:CALLABLE; the built-in "
                                 f"{self.model} baseline uses --dataset (got --data {self.data!r} --init "
                                 f"{self.init!r})")
            if self.dataset not in DATASETS:
                raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
            shape, want = DATASET_SHAPES.get(self.dataset), DATASET_SHAPES[RECIPES[self.model]["dataset"]]
            if shape != want:
                dims = "x".join(map(str, shape)) if shape else "other"
                raise ValueError(f"--dataset {self.dataset} has {dims} images, but the {self.model} baseline "
                                 f"was trained on {'x'.join(map(str, want))} {RECIPES[self.model]['dataset']} "
                                 f"images; to train on {self.dataset}, bring your model and data: "
                                 f"--model MODULE:CALLABLE --data MODULE:CALLABLE")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        f = self.bn_freeze_lr_factor
        if isinstance(f, bool) or not isinstance(f, int | float) or not (math.isfinite(f) and 0 < f <= 1):
            raise ValueError(f"--bn-freeze-lr-factor must be in (0, 1] (1 = no drop), got {f!r}")
        for name in ("steps", "global_batch_size", "log_every", "scaling_steps", "calib_batches"):
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
        if self.api == "pt2e" and self.activation_bits != 8:
            raise ValueError(f"--api pt2e quantizes activations to 8 bits (XNNPACK's int8 kernels); got "
                             f"--activation-bits {self.activation_bits} (--weight-bits may be "
                             f"{BITS_MIN}..{BITS_MAX})")
        if self.api == "pt2e":
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

    def qat_recipe(self):
        """The :class:`qatlab.recipe.QATRecipe` this run follows (SGD with ``--momentum``)."""
        return QATRecipe(steps=self.steps, lr=self.lr, optimizer="sgd", momentum=self.momentum,
                         freeze_observers_at=self.freeze_observers_at, freeze_bn_at=self.freeze_bn_at,
                         bn_freeze_lr_factor=self.bn_freeze_lr_factor)


def build_parser():
    """The argparse parser of ``python -m qatlab.train_qat`` (see ``--help``).

    Taught in 08_qat_at_scale.
    """
    p = argparse.ArgumentParser(
        prog="python -m qatlab.train_qat",
        description="Quantization-aware training with the course's recipe (qatlab.recipe.QATRecipe) of a "
                    "qatlab baseline or of your own model and data, on one process or under torchrun with "
                    "DistributedDataParallel; writes a checkpoint, the converted int8 model, an XNNPACK .pte "
                    "(PT2E) and metrics.json. Taught in notebook 08_qat_at_scale.",
        epilog="Examples: python -m qatlab.train_qat --steps 200 | python -m qatlab.train_qat --model "
               "my_model.py:resnet20 --data my_model.py:cifar10 --init fp32.pt --out runs/r20 | torchrun "
               "--standalone --nproc_per_node=2 -m qatlab.train_qat --steps 200 --checkpoint-every 50")
    # the defaults without validating them: Config() would import torch, and --help needs none of it
    d = argparse.Namespace(**{f.name: f.default for f in fields(Config)})
    p.add_argument("--model", default=d.model, metavar="NAME|MODULE:CALLABLE",
                   help="a built-in baseline, smallcnn or tinymobilenet (default: %(default)s; trained first if "
                        "its checkpoint is missing), or your model: MODULE (a module name or a .py file) and "
                        "a CALLABLE in it that returns an nn.Module")
    p.add_argument("--data", default=d.data, metavar="MODULE:CALLABLE",
                   help="your data, with your --model: CALLABLE returns (train_dataset, test_dataset) of "
                        "(input, label) pairs; the export's input shape is read from the first input")
    p.add_argument("--init", default=d.init, metavar="FILE",
                   help="fp32 weights for your --model: a state dict (or {'state_dict': ...}), loaded with "
                        "weights_only=True (default: the weights the callable returns)")
    p.add_argument("--dataset", default=d.dataset,
                   help="qatlab dataset of a built-in model (default: %(default)s, offline)")
    p.add_argument("--api", default=d.api, choices=("auto", "eager", "pt2e"),
                   help="pt2e: torch.export + prepare_qat_pt2e with XNNPACKQuantizer + convert_pt2e + .pte; "
                        "eager: torch.ao prepare_qat/convert (needs a fuse_model method and QuantStubs); "
                        "auto (default): pt2e for your model, eager for a built-in one")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total (default: %(default)s)")
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size,
                   help="images per step over all processes; each gets 1/world_size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="SGD learning rate (default: %(default)s = 1x the course baselines' fp32 peak)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-bits", type=int, default=d.weight_bits,
                   help="per-channel symmetric weight bits, 2..8 (pt2e: an int8 weight restricted to 2^B "
                        "levels, qatlab.conversion.pt2e_weight_qrange) (default: %(default)s)")
    p.add_argument("--activation-bits", type=int, default=d.activation_bits,
                   help="activation bits, 2..8 with eager; pt2e takes only 8 (default: %(default)s)")
    p.add_argument("--freeze-bn-at", type=_never_or_int, default=_DEFAULT, metavar="STEP",
                   help="freeze BN statistics from this step on, or 'never' (default: half of --steps)")
    p.add_argument("--bn-freeze-lr-factor", type=float, default=d.bn_freeze_lr_factor, metavar="F",
                   help="multiply the learning rate by F from the BN freeze on; 1 = no drop "
                        "(default: %(default)s, notebook 06)")
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
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                   help="where to train (default: auto = cuda when present, else cpu); the int8 model is "
                        "converted and exported on the CPU")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the training forward on CUDA (fake-quantizers run in float32)")
    p.add_argument("--calib-batches", type=int, default=d.calib_batches, metavar="N",
                   help="training batches that calibrate the PTQ comparison model (default: %(default)s)")
    p.add_argument("--no-ptq", dest="ptq", action="store_false",
                   help="skip the PTQ comparison row (it depends only on --init, --weight-bits and "
                        "--calib-batches, so one run of several seeds is enough)")
    p.add_argument("--no-pte", dest="pte", action="store_false",
                   help="do not write the ExecuTorch .pte (pt2e only)")
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
    auto = QATRecipe(steps=values["steps"]) if isinstance(values["steps"], int) and values["steps"] > 0 else None
    for name in ("freeze_bn_at", "freeze_observers_at"):
        if values[name] is _DEFAULT:  # the recipe's default, a fraction of --steps
            values[name] = getattr(auto, name) if auto is not None else None
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

@dataclass
class RunData:
    """What a run trains and tests on: ``train_set`` yields ``(input, label, index)`` (the index
    records the data order), ``test_set`` ``(input, label)``; ``input_shape`` is one input's shape."""

    train_set: object
    test_set: object
    input_shape: tuple
    name: str


def load_run_data(cfg):
    """The run's :class:`RunData`: ``--data MODULE:CALLABLE`` (checked, see :mod:`qatlab.user_spec`) or
    the qatlab ``--dataset``. Taught in 08_qat_at_scale."""
    import torch
    from torch.utils.data import TensorDataset

    from .user_spec import IndexedDataset, load_user_data

    if cfg.user_model:
        train, test, shape = load_user_data(cfg.data)
        return RunData(IndexedDataset(train), test, tuple(shape), cfg.data)
    from .data import load_dataset

    data = load_dataset(cfg.dataset)
    return RunData(TensorDataset(data.x_train, data.y_train, torch.arange(len(data.y_train))),
                   TensorDataset(data.x_test, data.y_test), tuple(data.input_shape), cfg.dataset)


def load_fp32_model(cfg, rank=0, distributed=False, input_shape=None):
    """The fp32 model a run starts from (CPU, eval): your ``--model`` (with ``--init``) or a baseline.

    Your model is called once on a batch of 2 zero inputs of ``input_shape``, so a shape it
    refuses is reported naming ``--model`` and ``--data`` before anything is trained. A
    baseline is loaded by rank 0 first (or, when missing, trained and saved); the other ranks
    wait at a barrier and then load the saved file, so it is trained once. Taught in 08_qat_at_scale.
    """
    from .baseline import load_baseline
    from .user_spec import check_model_accepts, load_user_model

    if cfg.user_model:
        model = load_user_model(cfg.model, cfg.init or None)
        if input_shape is not None:
            check_model_accepts(model, input_shape, cfg.model, cfg.data)
        return model
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
    model.input_shape = want
    return model


def build_qat_model(cfg, rank=0, distributed=False, input_shape=None, fp32=None):
    """``fp32`` (default: :func:`load_fp32_model`) prepared for QAT, in train mode, on the CPU.

    ``--api eager``: :func:`qatlab.qat.prepare_eager_qat` with
    :func:`qatlab.qat.make_qconfig` ``(weight_bits, activation_bits)`` (the model needs
    ``fuse_model`` and QuantStubs); ``--api pt2e``: :func:`qatlab.conversion.prepare_pt2e`
    (``torch.export`` and ``prepare_qat_pt2e`` with XNNPACK's QAT config, ``weight_bits``-bit
    per-channel weights, 8-bit activations). ``fp32`` itself is
    prepared in place. Taught in 08_qat_at_scale.
    """
    from .qat import make_qconfig, prepare_eager_qat

    model = fp32 if fp32 is not None else load_fp32_model(cfg, rank, distributed, input_shape)
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    if cfg.api == "pt2e":
        if shape is None:
            raise ValueError("build_qat_model(api='pt2e') needs input_shape (one input, no batch dimension)")
        return prepare_pt2e(model.train(), shape, weight_bits=cfg.weight_bits)
    if cfg.user_model and not hasattr(model, "fuse_model"):
        from .user_spec import SpecTypeError

        raise SpecTypeError(f"--api eager needs --model {cfg.model!r} to have a fuse_model(is_qat) method and "
                            f"QuantStub / DeQuantStub around its float part (torch.ao's eager API); it is a "
                            f"{type(model).__name__} without fuse_model: use --api pt2e")
    with quiet_eager_api():
        prepare_eager_qat(model.train(), make_qconfig(cfg.weight_bits, cfg.activation_bits))
    return model


def resolve_device(cfg, d):
    """Set ``d.device`` from ``--device`` (``auto``: what :func:`qatlab.distributed.init_distributed`
    chose, cuda when present); check ``--amp``. Returns ``d``. Taught in 08_qat_at_scale."""
    import torch

    if cfg.device == "cpu":
        if d.backend == "nccl":
            raise ValueError("--device cpu cannot use the nccl backend: add --backend gloo")
        d.device = "cpu"
    elif cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this machine (use --device cpu)")
        if not d.device.startswith("cuda"):
            torch.cuda.set_device(d.local_rank)
            d.device = f"cuda:{d.local_rank}"
    if cfg.amp and not d.device.startswith("cuda"):
        raise ValueError(f"--amp (bfloat16 autocast) is for CUDA; this run trains on {d.device}")
    return d


def autocast(device, enabled):
    """``torch.autocast`` in bfloat16 for ``device`` when ``enabled``, else a no-op context.

    Used with :func:`keep_fake_quant_fp32`: matmuls and convolutions run in bfloat16, the
    fake-quantizers (observers, scale, rounding) in float32. Taught in 08_qat_at_scale.
    """
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def keep_fake_quant_fp32(model):
    """Cast every fake-quantizer's input to float32 (forward pre-hooks); return the hook handles.

    Under autocast a conv's output is bfloat16, whose 8 significant bits would move the
    observers' min/max and the rounding of ``x / scale`` off the float32 grid that
    ``convert`` uses. Taught in 08_qat_at_scale.
    """
    def to_fp32(module, args):
        return tuple(a.float() if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args)

    return [m.register_forward_pre_hook(to_fp32) for _, m in fake_quant_modules(model)]


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


def _write_json(path, obj):
    from .files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# --- the run --------------------------------------------------------------------------------

def _log(d, *args):
    if d.rank == 0:
        print("train_qat:", *args, flush=True)


def run(cfg, d=None, ship=True):
    """Train, checkpoint, convert and ship as :data:`cfg` says; return the metrics (rank 0) or ``None``.

    Everything that can be checked before training is checked first (your model and data
    specs, the input shape, a checkpoint to resume), so a bad run writes nothing. With
    ``ship=False`` the run stops after its final checkpoint (no conversion, no
    ``metrics.json``) and returns ``{"step", "loss", "lr"}`` of this rank: what a test of
    resuming needs, without paying for ``convert_pt2e``. Taught in 08_qat_at_scale.
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm

    from .files import build_dir
    from .training import set_seed

    started = time.perf_counter()
    d = resolve_device(cfg, d or init_distributed(cfg.backend, cfg.timeout))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = os.path.abspath(cfg.out) if cfg.out else str(build_dir() / "train_qat")
    per_rank = cfg.per_rank_batch(d.world_size)
    recipe = cfg.recipe(d.world_size)
    qrecipe = cfg.qat_recipe()
    set_seed(cfg.seed + d.rank)  # RNG per rank; the data order uses cfg.seed on every rank

    data = load_run_data(cfg)
    fp32 = load_fp32_model(cfg, d.rank, d.distributed, input_shape=data.input_shape)
    fp32_copy = copy.deepcopy(fp32) if d.rank == 0 else None  # for the PTQ row
    model = build_qat_model(cfg, input_shape=data.input_shape, fp32=fp32)
    model.to(d.device)
    if cfg.amp:
        keep_fake_quant_fp32(model)
    train_set = data.train_set
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
    optimizer = qrecipe.make_optimizer(model.parameters())

    # per-rank records, carried in the checkpoint so a resumed run reports the whole run
    rec = {"loss": [], "indices": [], "scales": [], "step_seconds": [], "cpu_seconds": 0.0, "lr": []}
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
            f"{torch.get_num_threads()} thread(s) each; {cfg.model} ({cfg.api}) on {data.name}, inputs "
            f"{'x'.join(map(str, data.input_shape))}; global batch {cfg.global_batch_size} = {d.world_size} x "
            f"{per_rank}; steps {start_step}..{cfg.steps}; lr {cfg.lr:g}; BN frozen at {cfg.freeze_bn_at} "
            f"({qrecipe.bn_freeze_timing()}) with lr x{cfg.bn_freeze_lr_factor:g}, observers at "
            f"{cfg.freeze_observers_at}")

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
            _, _, lr = qrecipe.apply(step, model, optimizer)  # the recipe's state of this step
            x = shift_images(x, cfg.augment_shift).to(d.device)
            with autocast(d.device, cfg.amp):
                loss = loss_fn(net(x), y.to(d.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rec["loss"].append(loss.detach().item())
            rec["step_seconds"].append(time.perf_counter() - wall0)
            rec["cpu_seconds"] += time.process_time() - cpu0
            rec["indices"].append(idx.tolist())
            rec["scales"].append(scale_vector(model).tolist())
            rec.setdefault("lr", []).append(lr)
            step += 1
            bar.update(1)
            if d.rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                line = f"train_qat: step {step}/{cfg.steps} loss (rank 0) {rec['loss'][-1]:.4f} lr {lr:g}"
                bar.write(line) if cfg.progress else print(line, flush=True)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step)
            wall0, cpu0 = time.perf_counter(), time.process_time()
    bar.close()
    checkpoint(cfg.steps)  # the final training state: --resume of a finished run only re-ships
    if not ship:
        if d.distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return {"step": step, "loss": list(rec["loss"]), "lr": list(rec.get("lr", []))}
    layout = scale_layout(model)  # after training: per-channel scales take their shape in the first forward
    scaling = None
    if cfg.scaling_rounds:
        _log(d, f"timing {cfg.scaling_rounds} interleaved rounds of 1 and {d.world_size} processes, "
                f"{cfg.scaling_steps} steps each")
        scaling = measure_scaling(model, train_set, cfg, d, loss_fn)
    return _finish(cfg, d, model, data, rec, layout, out, started, resumed_from, scaling, fp32_copy, qrecipe)


def _finish(cfg, d, model, data, rec, layout, out, started, resumed_from, scaling, fp32, qrecipe):
    """After training: per-rank state and models, then rank 0's state on every rank, convert, ship.

    Eager: every rank converts its own state, then (after :func:`broadcast_state`) rank 0's,
    and reports both int8 models' digests. PT2E: ``convert_pt2e`` costs seconds per call,
    so only rank 0 converts (once, after the last collective), and every rank reports the
    digest of the QAT state it holds after the broadcast: the input of a deterministic convert.
    After the gather of every rank's report, each rank leaves the process group; the other
    ranks exit while rank 0 ships. Rank 0 then scores the
    fake-quant model, the int8 model and the PTQ model on the test set, writes the ``.pte``
    (PT2E) and runs it, and writes ``metrics.json``.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from .deploy import parity
    from .training import evaluate, predict

    test_loader = DataLoader(data.test_set, batch_size=500)
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
    shipped = convert_int8(model) if eager else None  # on a CPU copy
    mine["shipped_digest"] = state_digest(shipped.state_dict() if eager else model.state_dict())
    ranks = gather_to_rank0(mine, d)
    if d.distributed:
        # the last collective: rank 0 ships alone (convert_pt2e, PTQ, .pte can take longer than
        # --timeout on a big model), so no rank waits for it at a barrier
        torch.distributed.destroy_process_group()
    if d.rank != 0:
        return None
    if shipped is None:
        shipped = convert_int8(model)

    fq_logits, labels = predict_fake_quant(model, test_loader, device=d.device)
    fq_acc = _top1(fq_logits, labels)
    int8_logits, _ = predict(shipped, test_loader, device="cpu")
    int8_acc = _top1(int8_logits, labels)
    shipped_file = save_int8_model(shipped, os.path.join(out, "model_int8.pt"),
                                   {"model": cfg.model, "weight_bits": cfg.weight_bits,
                                    "activation_bits": cfg.activation_bits, "format": FORMAT,
                                    "input_shape": list(data.input_shape)})
    # PTQ from the same fp32 weights, same quantizer settings, calibrated on the first training images
    calib = DataLoader(Subset(data.train_set, range(min(len(data.train_set), cfg.calib_batches * cfg.global_batch_size))),
                       batch_size=cfg.global_batch_size)
    ptq_logits = ptq_acc = None
    if cfg.ptq:
        with quiet_eager_api():
            ptq = ptq_int8(fp32, calib, api=cfg.api, input_shape=data.input_shape,
                           weight_bits=cfg.weight_bits, activation_bits=cfg.activation_bits)
        ptq_logits, _ = predict(ptq, test_loader, device="cpu")
        ptq_acc = _top1(ptq_logits, labels)
    sizes = {"fp32_state_dict_bytes": _state_dict_bytes(fp32), "int8_file_bytes": os.path.getsize(shipped_file)}
    pte = {"pte_file": None, "pte_acc": None, "pte_top1_agreement_vs_fake_quant": None,
           "pte_top1_agreement_vs_int8": None, "pte_max_abs_diff_vs_int8": None}
    if not eager and cfg.pte:
        from .deploy import run_executorch
        from .noise import native_stderr_filtered

        pte_path = os.path.join(out, "model_int8.pte")
        summary = export_pte(shipped, pte_path)
        with native_stderr_filtered():
            pte_logits = run_executorch(pte_path, test_loader, threads=max(1, torch.get_num_threads()))
        vs_int8 = parity(pte_logits, int8_logits)
        pte.update(pte_file=str(pte_path), pte_acc=_top1(pte_logits, labels),
                   pte_top1_agreement_vs_fake_quant=parity(pte_logits, fq_logits)["top1_agreement"],
                   pte_top1_agreement_vs_int8=vs_int8["top1_agreement"],
                   pte_max_abs_diff_vs_int8=vs_int8["max_abs_diff"],
                   pte_delegated_nodes=summary.delegated_nodes, pte_non_delegated_nodes=summary.non_delegated_nodes,
                   pte_max_batch=summary.max_batch)
        sizes["pte_bytes"] = os.path.getsize(pte_path)
    else:
        pte_logits = None
    predictions_file = save_predictions(os.path.join(out, "predictions.pt"), labels, fake_quant=fq_logits,
                                        int8=int8_logits, ptq=ptq_logits, pte=pte_logits)
    metrics = _metrics(cfg, d, ranks, layout, fq_acc, int8_acc, resumed_from, started)
    metrics.update(
        model_spec=cfg.model, data_spec=cfg.data or cfg.dataset, init=cfg.init or None, api=cfg.api,
        input_shape=list(data.input_shape), test_images=len(labels), qat_recipe=qrecipe.to_dict(),
        bn_freeze_timing=qrecipe.bn_freeze_timing(), lr_per_step=rec.get("lr", []),
        qat_fake_quant_acc=fq_acc, qat_int8_acc=int8_acc, ptq_int8_acc=ptq_acc,
        qat_minus_ptq_pp=None if ptq_acc is None else int8_acc - ptq_acc,
        calib_images=len(calib.dataset) if cfg.ptq else None,
        int8_top1_agreement_vs_fake_quant=parity(int8_logits, fq_logits)["top1_agreement"],
        sizes=sizes, **pte)
    if scaling is not None:
        metrics["scaling"] = combine_scaling([r["scaling"] for r in ranks],
                                             images=cfg.global_batch_size * cfg.scaling_steps)
    metrics["shipped_file"] = str(shipped_file)
    metrics["predictions_file"] = str(predictions_file)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    pte_line = (f"; .pte {pte['pte_acc']:.2f} %, top-1 agreement with fake-quant "
                f"{pte['pte_top1_agreement_vs_fake_quant']:.2f} % ({sizes['pte_bytes']} bytes)"
                if pte["pte_file"] else "")
    ptq_line = f", PTQ int8 {ptq_acc:.2f} %" if ptq_acc is not None else ""
    _log(d, f"done: fake-quant {fq_acc:.2f} %, int8 {int8_acc:.2f} %{ptq_line}{pte_line}; "
            f"shipped model identical on every rank: {bool(metrics['shipped_model_rank_independent'])}; "
            f"{metrics['samples_per_second']:.0f} images/s -> {out}")
    return metrics


PREDICTION_KEYS = ("fake_quant", "int8", "ptq", "pte")


def save_predictions(path, labels, **logits):
    """Write ``{"labels", "fake_quant", "int8", "ptq", "pte"}`` to ``path`` atomically; return the path.

    Each model's entry is the argmax of its logits on the test set (int64, one class per test
    image, in the test set's order), or ``None`` where that model was not run (``pte`` with
    ``--no-pte`` or ``--api eager``, ``ptq`` with ``--no-ptq``): what a paired test of two runs on the same images needs
    (``qatlab.stats.mcnemar(preds_a["int8"] == preds_a["labels"], ...)``). Load it with
    ``torch.load(path, weights_only=True)``. Taught in 10_qat_your_own_model.
    """
    import torch

    from .files import atomic_path

    unknown = sorted(set(logits) - set(PREDICTION_KEYS))
    if unknown:
        raise ValueError(f"save_predictions: unknown model(s) {', '.join(unknown)}; expected {PREDICTION_KEYS}")
    record = {"labels": torch.as_tensor(labels).long().cpu()}
    for key in PREDICTION_KEYS:
        value = logits.get(key)
        if value is not None:
            value = value.argmax(1).long().cpu()
            if value.shape != record["labels"].shape:
                raise ValueError(f"save_predictions: {key} has {tuple(value.shape)} predictions for "
                                 f"{len(record['labels'])} labels")
        record[key] = value
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return path


def _top1(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def _state_dict_bytes(model):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


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


def main(argv=None):
    """Entry point of ``python -m qatlab.train_qat`` (and of ``torchrun ... -m qatlab.train_qat``).

    From Python, ``main(["--model", "my_model.py:resnet20", "--data", "my_model.py:cifar10",
    "--out", "runs/r20"])`` runs the same command in this process and returns the metrics dict
    that ``metrics.json`` holds (``None`` on ranks other than 0). A bad flag raises
    ``SystemExit`` (argparse); a bad model or data spec raises
    :class:`qatlab.user_spec.SpecError` naming it. Taught in 08_qat_at_scale.
    """
    cfg = parse_args(argv)
    return run(cfg)


def _cli():
    try:
        main()
    except SpecError as e:  # a bad --model / --data / --init: its message, not a traceback
        print(f"train_qat: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
