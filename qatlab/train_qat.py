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

This module is the command line (the flags, :class:`Config`, :func:`main`, :func:`launch`); the
work of one run, on every process, is :func:`qatlab.qat_run.run` (data and model, the training
loop that follows :class:`qatlab.recipe.QATRecipe`, convert and ship), with
:mod:`qatlab.distributed`, :mod:`qatlab.checkpoint` and :mod:`qatlab.conversion` under it.

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
- ``model_int8.pte`` (PT2E, unless ``--no-pte``): the XNNPACK program, for ExecuTorch. A file
  an earlier run lowered from the same converted program (its digest in ``model_int8.pte.json``)
  is kept, not lowered again (``pte_reused`` in ``metrics.json``).
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
import json
import math
import sys
from dataclasses import dataclass, fields

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
    wrap_ddp,  # noqa: F401
)
from .qat_run import (  # noqa: F401  (moved from this module; part of its API since notebook 08)
    PREDICTION_KEYS,
    RunData,
    autocast,
    build_qat_model,
    keep_fake_quant_fp32,
    load_fp32_model,
    load_run_data,
    resolve_device,
    run,
    save_predictions,
    scale_layout,
    scale_vector,
    shift_images,
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
