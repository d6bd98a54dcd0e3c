"""Silence log lines that teach nothing, so the warnings a notebook shows are the ones that matter.

Every notebook calls :func:`silence_noise` once in its setup cell. It never hides
``warnings.warn`` categories a lesson relies on (torch's deprecation of the eager
API is shown once, on purpose, in 04_qat_training); it only lowers the level of
library loggers whose messages are about the libraries' own internals.
"""

import logging

# logger name -> why its messages are noise for a reader of these notebooks
NOISY_LOGGERS = {
    # torchao registers its KernelPreference enum with torch's pytree; torch 2.14 logs a
    # deprecation of that internal call at import time, once per process.
    "torch.utils._pytree": "torchao's KernelPreference register_constant() deprecation at import",
}


def silence_noise(level=logging.ERROR):
    """Raise the level of the loggers in :data:`NOISY_LOGGERS` to ``level``; return their names.

    Call it before importing torchao or ExecuTorch. Taught in 00_start_here.

    >>> "torch.utils._pytree" in silence_noise()
    True
    """
    if not isinstance(level, int) or isinstance(level, bool):
        raise TypeError(f"level must be a logging level (int), got {level!r}")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return sorted(NOISY_LOGGERS)
