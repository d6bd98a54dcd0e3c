"""From a QAT model to int8: prepare (PT2E), convert, the PTQ comparison, and the files a run ships.

Taught in 04_qat_training (prepare, convert) and 05_deployment (the ``.pte``); used by
:mod:`qatlab.train_qat`. Both APIs:

- **PT2E** (the current one): :func:`prepare_pt2e` exports the fp32 model and inserts
  fake-quantizers with ExecuTorch's ``XNNPACKQuantizer`` (symmetric int8, per-channel
  weights); :func:`convert_int8` runs ``move_exported_model_to_eval`` and ``convert_pt2e`` on
  a CPU copy; :func:`export_pte` lowers the result to an XNNPACK ``.pte``.
- **eager** (``torch.ao.quantization``, legacy): ``fuse_model`` / ``prepare_qat`` /
  ``convert`` with :func:`qatlab.qat.make_qconfig`.

:func:`ptq_int8` quantizes the same fp32 weights without training, with the same quantizer
settings (PT2E: the same XNNPACK config with ``is_qat=False``, which changes only the
observers' update rule; eager: the same qconfig without fake-quant), for the QAT vs PTQ row.
"""

import contextlib
import copy


def prepare_pt2e(model, input_shape, is_qat=True):
    """``torch.export`` (batch dimension dynamic) → ``prepare_qat_pt2e`` with XNNPACK's QAT config.

    The same steps as notebook 04, on the CPU; ``input_shape`` is one input's shape without
    the batch dimension. With ``is_qat=False``: ``prepare_pt2e`` for PTQ calibration (eval
    form). The result takes ``.train()`` / ``.eval()`` (:func:`qatlab.qat.allow_train_eval`)
    and records ``input_shape``. Taught in 04_qat_training.
    """
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e as prepare_ptq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from .qat import allow_train_eval

    model = model.cpu().train(is_qat)
    example = (torch.zeros(2, *input_shape),)  # zeros: exporting draws no random numbers
    exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat))
    prepared = allow_train_eval((prepare_qat_pt2e if is_qat else prepare_ptq)(exported, quantizer))
    prepared.input_shape = tuple(input_shape)
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



def ptq_int8(fp32_model, calib_batches, *, api, input_shape=None, weight_bits=8, activation_bits=8):
    """Post-training quantization of ``fp32_model`` (left untouched): calibrate on ``calib_batches``, convert.

    ``calib_batches`` is an iterable of input tensors (or ``(input, label)`` pairs).
    ``api="pt2e"``: :func:`prepare_pt2e` with ``is_qat=False``, calibrate, ``convert_pt2e``;
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
        prepared = prepare_pt2e(model, input_shape, is_qat=False)
        calibrate(prepared)
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


def export_pte(converted, path, max_batch=64):
    """Lower a ``convert_pt2e`` model to an XNNPACK ``.pte`` at ``path`` (atomically); return the summary.

    The batch dimension is dynamic up to ``max_batch`` (:func:`qatlab.deploy.export_executorch`),
    the input shape is the one :func:`prepare_pt2e` recorded. Taught in 05_deployment.
    """
    import torch

    from .deploy import export_executorch

    example = (torch.zeros(2, *converted.input_shape),)
    return export_executorch(converted, example, path, delegate="xnnpack", max_batch=max_batch)


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

