"""The map of the course: which notebooks a reader needs for which goal, and how long each takes.

Taught in 00_start_here (it prints the map); the README's "Map of the course" table is
``python -m qatlab.course`` (a test checks the two agree).

Two paths: the **core path** (00-05, then 10) takes a reader from the arithmetic of fake
quantization to QAT and an int8 file an edge runtime runs, and ends with the capstone, 10: the
recipe on their own model through ``python -m qatlab.train_qat --model MODULE:CALLABLE --data
MODULE:CALLABLE``; the **deep dives** answer one question each. A reading time is the words of the notebook's text and code at
:data:`WORDS_PER_MINUTE`, rounded up to 5 minutes; running the notebook adds its run time.
"""

import json
import math
import re
import sys
from pathlib import Path

WORDS_PER_MINUTE = 150  # technical prose with code: slower than the ~240 of plain reading

# stem -> (path, read this if ...)
MAP = {
    "00_start_here": ("core", "you start here: the environment, the data, the fp32 baseline, a first int8 model, "
                      "and how to tell a real difference from noise"),
    "01_fake_quant_math": ("core", "you want the arithmetic every later notebook relies on: scale, zero-point, "
                           "rounding, clamping, the straight-through estimator"),
    "02_observers": ("core", "you need to know where scale and zero-point come from, and why calibration "
                     "data and outliers matter"),
    "03_fusion": ("core", "your model has BatchNorm: folding, fusion, and why QAT keeps BN alive"),
    "04_qat_training": ("core", "you want to run QAT in torch's eager API and in PT2E, and compare it with "
                        "PTQ fairly"),
    "05_deployment": ("core", "you want an int8 file an edge runtime runs (ExecuTorch, ONNX Runtime), "
                      "measured and parity-checked, and the recipe for your own model"),
    "10_qat_your_own_model": ("core", "you want to QAT and ship your own model: a residual network through "
                              "train_qat's entry point, compared over seeds with the strongest PTQ and an fp32 "
                              "fine-tune, a parity-checked .pte, and what a QAT step costs"),
    "06_when_qat_pays_off": ("deep dive", "you must decide whether QAT is worth its cost for a bit width or an "
                             "architecture, or your QAT run collapses"),
    "07_qat_transformers": ("deep dive", "your model is a transformer: group-wise int4/int2 weights and "
                            "torchao's QATConfig"),
    "08_qat_at_scale": ("deep dive", "you train on several processes or machines: torchrun, DDP, observers "
                        "across ranks, resuming a killed run"),
    "09_integer_kernels": ("deep dive", "your int8 model disagrees with its fake-quant twin, or you want to "
                           "know what an int8 kernel computes"),
    "11_strongest_ptq": ("deep dive", "you want the strongest post-training baseline (CLE, bias correction, "
                         "AdaRound, GPTQ) before you pay for training"),
    "12_qat_language_model": ("deep dive", "your model is a language model: QAT, QAT + LoRA and distillation "
                              "with torchao, and a .pte that generates text"),
}


def _words(text):
    return len(re.findall(r"\w+", text))


def reading_minutes(path):
    """Minutes to read the notebook at ``path``: its words at :data:`WORDS_PER_MINUTE`, rounded up
    to a multiple of 5.

    >>> from qatlab.files import repo_root
    >>> reading_minutes(repo_root() / "notebooks" / "00_start_here.ipynb") % 5
    0
    """
    nb = json.loads(Path(path).read_text())
    words = sum(_words("".join(c["source"])) for c in nb["cells"])
    return 5 * max(1, math.ceil(words / WORDS_PER_MINUTE / 5))


def course_map(notebooks_dir=None):
    """Rows ``(stem, title, path, minutes, read_if)`` in course order (core path first).

    Every numbered notebook must be on the map, and the map must name no missing notebook.
    """
    from .files import repo_root

    folder = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    stems = sorted(p.stem for p in folder.glob("[0-9][0-9]_*.ipynb"))
    missing, unknown = sorted(set(MAP) - set(stems)), sorted(set(stems) - set(MAP))
    if missing or unknown:
        raise ValueError(f"the course map and notebooks/ disagree: on the map but missing {missing}, "
                         f"present but not on the map {unknown}")
    rows = []
    for stem in sorted(stems, key=lambda s: (MAP[s][0] != "core", s)):
        path = folder / f"{stem}.ipynb"
        title = json.loads(path.read_text())["cells"][0]["source"][0].lstrip("# ").strip()
        rows.append((stem, title, MAP[stem][0], reading_minutes(path), MAP[stem][1]))
    return rows


def format_markdown(rows, link_prefix="notebooks/"):
    """The map as a markdown table (the README's, and notebook 00's)."""
    lines = ["| notebook | path | reading time | read this if |", "|---|---|---|---|"]
    lines += [f"| [{title}]({link_prefix}{stem}.ipynb) | {path} | about {minutes} min | {read_if} |"
              for stem, title, path, minutes, read_if in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_markdown(course_map()))
    sys.exit(0)
