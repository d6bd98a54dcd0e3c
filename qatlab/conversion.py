"""From a QAT model to int8: prepare (PT2E), convert, the PTQ comparison, and the files a run ships.

Taught in 04_qat_training (prepare, convert) and 05_deployment (the ``.pte``); used by
:mod:`qatlab.train_qat`. Both APIs:

- **PT2E** (the current one): :func:`prepare_pt2e` exports the fp32 model and inserts
  fake-quantizers with ExecuTorch's ``XNNPACKQuantizer`` (symmetric per-channel weights of
  2 to 8 bits held in int8, 8-bit activations); :func:`convert_int8` runs ``move_exported_model_to_eval`` and ``convert_pt2e`` on
  a CPU copy; :func:`export_pte` lowers the result to an XNNPACK ``.pte``.
- **eager** (``torch.ao.quantization``, legacy): ``fuse_model`` / ``prepare_qat`` /
  ``convert`` with :func:`qatlab.qat.make_qconfig`.

:func:`ptq_int8` quantizes the same fp32 weights without training, with the same quantizer
settings (PT2E: the same XNNPACK config with ``is_qat=False``, which changes only the
observers' update rule; eager: the same qconfig without fake-quant), for the QAT vs PTQ row.
"""

import contextlib
import copy

from .patterns import pattern_cache
from .provenance import shared_provenance


def pt2e_weight_qrange(weight_bits=8):
    """``(weight_qmin, weight_qmax)`` that :func:`prepare_pt2e` gives XNNPACK's quantizer for ``weight_bits``.

    8 bits: XNNPACK's own default, the restricted range ``(-127, 127)`` (symmetric about 0).
    Below 8: :func:`qatlab.qat.weight_qrange`, ``(-2^(b-1), 2^(b-1) - 1)``, the range
    :mod:`qatlab.ptq` rounds to, so a ``b``-bit weight is an int8 value restricted to ``2^b``
    levels and XNNPACK's int8 kernels run it unchanged. Taught in 10_qat_your_own_model.

    >>> pt2e_weight_qrange(8), pt2e_weight_qrange(4), pt2e_weight_qrange(2)
    ((-127, 127), (-8, 7), (-2, 1))
    """
    from .qat import weight_qrange

    qmin, qmax = weight_qrange(weight_bits)  # validates: an int in 2..8
    return (-127, 127) if weight_bits == 8 else (qmin, qmax)


def _make_kernel_qparams_fake_quantize():
    """Build :class:`KernelQParamsFakeQuantize` (on first use: it subclasses a torchao class)."""
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    from .fast_fake_quant import FastForward

    class KernelQParamsFakeQuantize(FastForward, FusedMovingAvgObsFakeQuantize):
        """torchao's ``FusedMovingAvgObsFakeQuantize`` whose ``calculate_qparams`` returns the scale and
        zero-point the fused kernel trained with (its buffers), not its inner observer's.

        The fused kernel (``torch.fused_moving_avg_obs_fake_quant``) chooses a symmetric scale as
        ``max(|min| / 2^(b-1), max / (2^(b-1) - 1))`` ("divides by 8 or 7" at 4 bits); the observer's
        ``calculate_qparams``, which ``convert_pt2e`` calls, divides ``max|w|`` by
        ``(qmax - qmin) / 2`` (7.5 at 4 bits). So without this class the converted model rounds
        every weight on a grid whose step is up to 1/7 larger or smaller (3 bits), 1/15 (4 bits) or 1/3
        (2 bits) than the one QAT trained on, and its
        predictions drift from the fake-quant model's (notebook 10 measures it). torchao fixes the same mismatch upstream with a ``use_kernel_params`` flag
        (pytorch/ao#4824, after torchao 0.18).

        Its ``forward`` (:class:`qatlab.fast_fake_quant.FastForward`) computes the same numbers as
        torchao's; on a per-tensor CPU float32 input the fake quantization runs as vectorized tensor
        ops (:mod:`qatlab.fast_fake_quant`,
        bit for bit torch's kernel, several times faster). Taught in 10_qat_your_own_model.
        """

        def calculate_qparams(self):
            return self.scale.detach().clone(), self.zero_point.detach().clone()

    KernelQParamsFakeQuantize.__module__ = __name__
    KernelQParamsFakeQuantize.__qualname__ = "KernelQParamsFakeQuantize"
    return KernelQParamsFakeQuantize


_LAZY = {}


def __getattr__(name):
    # PEP 562: KernelQParamsFakeQuantize is made on first use, so importing this module imports no torchao
    if name == "KernelQParamsFakeQuantize":
        if name not in _LAZY:
            _LAZY[name] = _make_kernel_qparams_fake_quantize()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _with_kernel_qparams(spec):
    """``spec`` with its fused fake-quantizer swapped for :class:`KernelQParamsFakeQuantize` (same arguments)."""
    import dataclasses

    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    ctr = getattr(spec, "observer_or_fake_quant_ctr", None)
    if getattr(getattr(ctr, "p", None), "func", None) is not FusedMovingAvgObsFakeQuantize:
        return spec
    fq = __getattr__("KernelQParamsFakeQuantize")
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=fq.with_args(*ctr.p.args, **ctr.p.keywords))


ACT_OBSERVERS = ("histogram", "minmax")


def xnnpack_quantizer(is_qat=True, weight_bits=8, act_observer="histogram"):
    """ExecuTorch's ``XNNPACKQuantizer`` with its symmetric config: per-channel ``weight_bits``-bit weights
    (:func:`pt2e_weight_qrange`), 8-bit per-tensor affine activations; QAT (fake-quantizers) or PTQ
    (observers: per-channel min/max for weights; for activations XNNPACK's ``HistogramObserver``,
    or a ``MinMaxObserver`` with ``act_observer="minmax"``, notebook 02's two PTQ choices).

    For QAT every fused fake-quantizer is a :class:`KernelQParamsFakeQuantize`, so ``convert_pt2e``
    uses the scales the model was trained with. Taught in 10_qat_your_own_model.
    """
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    if act_observer not in ACT_OBSERVERS:
        raise ValueError(f"act_observer must be one of {', '.join(ACT_OBSERVERS)}, got {act_observer!r}")
    qmin, qmax = pt2e_weight_qrange(weight_bits)
    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat, weight_qmin=qmin,
                                               weight_qmax=qmax)
    if not is_qat and act_observer == "minmax":
        from torchao.quantization.pt2e import MinMaxObserver

        act = dataclasses.replace(config.input_activation,
                                  observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    if is_qat:
        config = dataclasses.replace(config, **{
            field: _with_kernel_qparams(getattr(config, field))
            for field in ("input_activation", "output_activation", "weight")})
    return XNNPACKQuantizer().set_global(config)


def prepare_pt2e(model, input_shape, is_qat=True, weight_bits=8, act_observer="histogram"):
    """``torch.export`` (batch dimension dynamic) → ``prepare_qat_pt2e`` with XNNPACK's QAT config.

    The same steps as notebook 04, on the CPU; ``input_shape`` is one input's shape without
    the batch dimension. With ``is_qat=False``: ``prepare_pt2e`` for PTQ calibration (eval
    form). ``weight_bits`` (2..8) sets the per-channel weights' integer range
    (:func:`pt2e_weight_qrange`, passed as ``weight_qmin`` / ``weight_qmax`` to
    ``get_symmetric_quantization_config``); activations stay 8-bit, XNNPACK's width (PTQ: observed
    by ``act_observer``, see :func:`xnnpack_quantizer`). The result
    takes ``.train()`` / ``.eval()`` (:func:`qatlab.qat.allow_train_eval`) and records
    ``input_shape`` and ``weight_bits``. Taught in 04_qat_training (8 bits) and
    10_qat_your_own_model (fewer).
    """
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e as prepare_ptq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from .qat import allow_train_eval

    quantizer = xnnpack_quantizer(is_qat, weight_bits, act_observer)  # checks the arguments before exporting
    model = model.cpu().train(is_qat)
    example = (torch.zeros(2, *input_shape),)  # zeros: exporting draws no random numbers
    with pattern_cache(), shared_provenance():
        exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        prepared = allow_train_eval((prepare_qat_pt2e if is_qat else prepare_ptq)(exported, quantizer))
    prepared.input_shape = tuple(input_shape)
    prepared.weight_bits = weight_bits
    return prepared.train() if is_qat else prepared.eval()


@contextlib.contextmanager
def quiet_eager_api():
    """torch.ao's eager API warns that it is deprecated on every call (shown once in notebook 04)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield



def ptq_int8(fp32_model, calib_batches, *, api, input_shape=None, weight_bits=8, activation_bits=8,
             act_observer="histogram"):
    """Post-training quantization of ``fp32_model`` (left untouched): calibrate on ``calib_batches``, convert.

    ``calib_batches`` is an iterable of input tensors (or ``(input, label)`` pairs).
    ``api="pt2e"``: :func:`prepare_pt2e` with ``is_qat=False`` and ``weight_bits``, calibrate,
    ``convert_pt2e`` (activations 8-bit: ``activation_bits`` other than 8 is a ``ValueError``;
    ``act_observer``: ``"histogram"``, XNNPACK's, or ``"minmax"``);
    ``api="eager"``: ``fuse_model(is_qat=False)``, ``prepare`` with
    ``make_qconfig(weight_bits, activation_bits, fake_quant=False)``, calibrate, ``convert``.
    Returns the int8 model (CPU, eval). Taught in 04_qat_training.
    """
    import torch

    if api not in ("pt2e", "eager"):
        raise ValueError(f"api must be 'pt2e' or 'eager', got {api!r}")
    model = copy.deepcopy(fp32_model).cpu().eval()

    def calibrate(m):
        with torch.no_grad():
            for batch in calib_batches:
                m(batch[0] if isinstance(batch, list | tuple) else batch)

    if api == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from .qat import allow_train_eval

        if input_shape is None:
            raise ValueError("ptq_int8(api='pt2e') needs input_shape (one input's shape, no batch dimension)")
        if activation_bits != 8:
            raise ValueError(f"ptq_int8(api='pt2e') quantizes activations to 8 bits (XNNPACK's width), "
                             f"got activation_bits={activation_bits!r}")
        prepared = prepare_pt2e(model, input_shape, is_qat=False, weight_bits=weight_bits,
                                act_observer=act_observer)
        calibrate(prepared)
        with pattern_cache(), shared_provenance():
            converted = allow_train_eval(convert_pt2e(prepared)).eval()
        converted.input_shape = tuple(input_shape)
        return converted
    from torch.ao.quantization import convert, prepare

    from .qat import make_qconfig

    with quiet_eager_api():
        model.fuse_model(is_qat=False)
        model.qconfig = make_qconfig(weight_bits, activation_bits, fake_quant=False)
        prepare(model, inplace=True)
        calibrate(model)
        return convert(model, inplace=True).eval()


def export_pte(converted, path, max_batch=64, reuse=False):
    """Lower a ``convert_pt2e`` model to an XNNPACK ``.pte`` at ``path`` (atomically); return the summary.

    The batch dimension is dynamic up to ``max_batch`` (:func:`qatlab.deploy.export_executorch`),
    the input shape is the one :func:`prepare_pt2e` recorded. ``reuse=True`` keeps an existing
    ``path`` whose stored program digest matches this program (the summary says ``reused``).
    Taught in 05_deployment.
    """
    import torch

    from .deploy import export_executorch

    example = (torch.zeros(2, *converted.input_shape),)
    return export_executorch(converted, example, path, delegate="xnnpack", max_batch=max_batch, reuse=reuse)


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

        with pattern_cache(), shared_provenance():
            m = move_exported_model_to_eval(m)
            m.training = False
            converted = allow_train_eval(convert_pt2e(m)).eval()
        # a deepcopy of a GraphModule drops extra attributes: the caller's model carries it, or its copy does not
        converted.input_shape = getattr(model, "input_shape", None)
        return converted
    from torch.ao.quantization import convert

    with quiet_eager_api():
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
        with shared_provenance():
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
    name (a baseline's, or your ``MODULE:CALLABLE``, called again) and bit widths and loads the
    saved ``state_dict`` with ``weights_only=True``. ``model_int8.pt2`` (PT2E):
    ``torch.export.load``. Taught in 08_qat_at_scale.
    """
    import torch

    if str(path).endswith(".pt2"):
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

        return torch.export.load(str(path)).module()

    from .baseline import make_model
    from .qat import make_qconfig, prepare_eager_qat
    from .user_spec import is_spec, load_user_model

    with quiet_eager_api():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        meta = saved["meta"]
        if is_spec(meta["model"]):
            model = load_user_model(meta["model"]).train()
            shape = tuple(meta["input_shape"])
        else:
            model = make_model(meta["model"]).train()
            shape = (model.in_channels, model.input_size, model.input_size)
        prepare_eager_qat(model, make_qconfig(meta["weight_bits"], meta["activation_bits"]))
        # give the observers a shape (then overwritten); zeros, so no random numbers are drawn
        model(torch.zeros(2, *shape))
        int8 = convert_int8(model)
        int8.load_state_dict(saved["state_dict"])
    return int8.eval()

