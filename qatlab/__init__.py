"""qatlab: a small, hand-written helper library behind the QAT teaching notebooks.

``import qatlab`` does nothing visible and imports nothing heavy: every public
name below is loaded on first use (PEP 562), so ``import qatlab`` stays fast
and has no side effects (no seeding, no threads set, no files written).

Where each name is taught:

- 00_start_here: ``set_threads``, ``load_dataset``, ``SmallCNN``, ``train``, ``evaluate``,
  ``set_seed``, ``load_baseline``, ``record``, ``cmp``
- 01_fake_quant_math: ``choose_qparams``, ``quantize``, ``dequantize``, ``fake_quantize``
- 02_observers: ``qatlab.observers``
- 03_fusion: ``fold_bn``
- 04_qat_training: ``qatlab.qat``
- 05_deployment: ``qatlab.deploy``
- 06_when_qat_pays_off: ``TinyMobileNet``, ``qatlab.sensitivity``
- 07_qat_transformers: ``TinyViT``, ``qatlab.groupwise``
- 08_qat_at_scale: ``qatlab.train_qat`` (``python -m qatlab.train_qat``), ``qatlab.distributed``
- 09_integer_kernels: ``qatlab.integer``
- your own model: ``qatlab.recipe`` (``QATRecipe``), ``qatlab.qat_cost``,
  ``python -m qatlab.train_qat --model ... --data ...`` (``qatlab.user_spec``, ``qatlab.conversion``)
- 11_strongest_ptq: ``qatlab.equalize``, ``qatlab.bias_correction``, ``qatlab.adaround``,
  ``qatlab.ptq``, ``qatlab.gptq``
- 12_qat_language_model: ``qatlab.lm``
"""

from importlib import import_module
from importlib.util import find_spec

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # results and comparisons
    "begin_notebook": "results",
    "record": "results",
    "cmp": "results",
    # data, model, training
    "load_dataset": "data",
    "SmallCNN": "models",
    "TinyMobileNet": "models",
    "TinyViT": "models",
    "train": "training",
    "evaluate": "training",
    "predict": "training",
    "set_seed": "training",
    "get_device": "training",
    "load_baseline": "baseline",
    "load_baseline_and_data": "baseline",
    "train_baseline": "baseline",
    "save_checkpoint": "baseline",
    # the course's QAT recipe (04, 05, 06, 08, 10, python -m qatlab.train_qat)
    "QATRecipe": "recipe",
    # statistics of comparisons
    "accuracy_se": "stats",
    "mcnemar": "stats",
    "compare_runs": "stats",
    "welch_t": "stats",
    "paired_t": "stats",
    "tost": "stats",
    "recovered_fraction_ci": "stats",
    # quiet logs (every notebook's setup cell)
    "silence_noise": "noise",
    # threads: as many as the CPUs this process may use (affinity, cgroup quota, QATLAB_THREADS)
    "set_threads": "threads",
    # paths
    "build_dir": "files",
    "data_dir": "files",
    # quantization primitives (notebook 01)
    "choose_qparams": "quant",
    "quantize": "quant",
    "dequantize": "quant",
    "fake_quantize": "quant",
    # fusion (notebook 03)
    "fold_bn": "fusion",
}


def _is_submodule(name):
    """Every module of the package is reachable as ``qatlab.<name>`` without importing it first."""
    return name.isidentifier() and not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None


__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS and _is_submodule(name):
        return import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'qatlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
