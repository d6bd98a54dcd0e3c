"""One QAT run, as ``python -m qatlab.train_qat`` makes it: data and model, the training loop, convert and ship.

:mod:`qatlab.train_qat` is the command line (flags, :class:`~qatlab.train_qat.Config`, ``main``);
this module does the work for one validated config on every process (rank):

- :func:`load_run_data`, :func:`load_fp32_model`, :func:`build_qat_model`: your model and data
  (:mod:`qatlab.user_spec`) or a course baseline, prepared with PT2E or eager
  (:mod:`qatlab.conversion`, :mod:`qatlab.qat`);
- :func:`run`: the training loop, which follows :class:`qatlab.recipe.QATRecipe` step by step,
  under DistributedDataParallel when ``torchrun`` started it (:mod:`qatlab.distributed`), with
  atomic checkpoints (:mod:`qatlab.checkpoint`);
- :func:`_finish`: rank 0's state on every rank, convert, score fake-quant / int8 / PTQ, the
  ``.pte``, ``predictions.pt`` and ``metrics.json``.

Taught in 08_qat_at_scale and 10_qat_your_own_model.
"""

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

from .checkpoint import FORMAT, checkpoint_path, cpu_state_dict, load_checkpoint, save_checkpoint
from .conversion import (
    convert_int8,
    export_pte,
    prepare_pt2e,
    ptq_int8,
    quiet_eager_api,
    save_int8_model,
)
from .distributed import (
    broadcast_state,
    capture_rng,
    gather_to_rank0,
    init_distributed,
    max_rel_diff,
    restore_rng,
    state_digest,
    wrap_ddp,
)
from .files import shown_path
from .recipe import fake_quant_modules, freeze_state, predict_fake_quant, restore_freeze_state
from .scaling import combine_scaling, measure_scaling


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
        _log(d, f"resumed from {shown_path(ckpt_file)} at step {start_step}")
    elif cfg.resume:
        _log(d, f"no checkpoint at {shown_path(ckpt_file)}: starting at step 0")
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
            _log(d, f"checkpoint step {step} -> {shown_path(ckpt_file)} ({time.perf_counter() - t:.2f} s)")

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
           "pte_top1_agreement_vs_int8": None, "pte_max_abs_diff_vs_int8": None, "pte_reused": None}
    if not eager and cfg.pte:
        from .deploy import run_executorch
        from .noise import native_stderr_filtered

        pte_path = os.path.join(out, "model_int8.pte")
        # the same converted program as an earlier run's (same graph, weights, versions) keeps its file:
        # lowering is the slowest step of shipping (qatlab.deploy.program_digest)
        summary = export_pte(shipped, pte_path, reuse=True)
        with native_stderr_filtered():
            pte_logits = run_executorch(pte_path, test_loader, threads=max(1, torch.get_num_threads()))
        vs_int8 = parity(pte_logits, int8_logits)
        pte.update(pte_file=str(pte_path), pte_acc=_top1(pte_logits, labels),
                   pte_top1_agreement_vs_fake_quant=parity(pte_logits, fq_logits)["top1_agreement"],
                   pte_top1_agreement_vs_int8=vs_int8["top1_agreement"],
                   pte_max_abs_diff_vs_int8=vs_int8["max_abs_diff"],
                   pte_delegated_nodes=summary.delegated_nodes, pte_non_delegated_nodes=summary.non_delegated_nodes,
                   pte_max_batch=summary.max_batch, pte_reused=summary.reused)
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
                f"{pte['pte_top1_agreement_vs_fake_quant']:.2f} % ({sizes['pte_bytes']} bytes"
                + ("; kept from an earlier run: the same program)" if pte["pte_reused"] else ")")
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
