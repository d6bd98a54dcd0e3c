"""Prose that cannot go stale.

Machines differ (one has AVX-512 VNNI, the next only AVX2), so a notebook's markdown must
explain *why* in terms that hold on any machine, and anything about this machine or this run
(CPU features, "N× faster", which engine, runtime or observer wins) must be printed from the
measured values. This file checks what can be checked mechanically:

1. the markdown cells of every ``notebooks/*.ipynb`` against a denylist of machine-dependent
   statements typed as fixed text (:data:`MACHINE_FACTS`);
2. every notebook (markdown and code) and the README against text about how the project was
   made (:data:`MAKING_OF`): a reader has no "seed article" and no "issue";
3. executed notebooks (from ``make run`` or this session's notebook runs): every verdict the
   code prints must agree with the number printed beside it (:func:`verdict_contradictions`).

The patterns are deliberately narrow. "Without a dot-product instruction, int8 must widen to
int16" explains why and passes; "this machine has no VNNI" or "x86 is 2× faster" fails.
"""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

_HW = r"(?:AVX[- ]?512(?:[ _-]?VNNI)?|AVX[- ]?VNNI|AVX2|AVX|VNNI|AMX|dotprod|dot[- ]product instructions?|NEON|SSE4?)"
_MACHINE = r"(?:this|your|our|the (?:CI|test)) (?:machine|CPU|computer|host|laptop|server|box)"
_NAMES = (r"(?:x86|fbgemm|FBGEMM|onednn|oneDNN|qnnpack|QNNPACK|XNNPACK|ExecuTorch|ONNX Runtime|ORT|"
          r"eager(?: int8)?|PT2E|int8|fp32|MinMax|min/max|histogram|percentile|moving[- ]average|"
          r"per-channel|per-tensor|LSQ|QAT|PTQ)")

#: (name, pattern, why): machine- or run-dependent facts that must be printed, not typed
MACHINE_FACTS = [
    ("hardware feature of this machine",
     re.compile(rf"\b{_MACHINE}\b[^.!?\n;]{{0,60}}?\b(?:has|have|had|lacks?|supports?|offers?|"
                rf"comes? with|(?:does|did)(?: not|n't) have)\b[^.!?\n]{{0,30}}?\b{_HW}", re.I),
     "print the CPU flags (qatlab.deploy.cpu_flags) and the verdict from them"),
    ("hardware feature of this machine",
     re.compile(rf"\b{_HW}\b[^.!?\n;]{{0,40}}?\b(?:on|in) {_MACHINE}\b", re.I),
     "print the CPU flags (qatlab.deploy.cpu_flags) and the verdict from them"),
    ("result on this machine",
     re.compile(rf"\b(?:on|in) {_MACHINE}\b[^.!?\n;]{{0,40}}?\b(?:beats?|wins?|outperforms?|"
                rf"(?:is|are|was|were|runs?|ran) (?:clearly |much |a bit |slightly )?(?:faster|slower))\b", re.I),
     "print the measured comparison and the verdict from it"),
    ("typed speed ratio",
     re.compile(r"\b\d+(?:\.\d+)?\s*(?:×|x)\s+(?:faster|slower|speed-?up)\b", re.I),
     "compute the ratio and print 'faster'/'slower' from it"),
    ("typed speed ratio",
     re.compile(r"\bspeed-?up of (?:about |roughly |~)?\d", re.I),
     "compute the ratio and print it"),
    ("typed winner",
     re.compile(rf"\b{_NAMES}\b[^.!?\n;:,]{{0,40}}?\b(?:wins|won|beats|beat|outperforms|outperformed)\b"),
     "print which one wins from the measured values (and the test that says it is beyond noise)"),
    ("typed winner",
     re.compile(rf"\b{_NAMES}\b (?:is|was|runs|ran|comes out|came out) (?:clearly |much |a bit |slightly )?"
                rf"(?:the )?(?:faster|slower|fastest|slowest|best|worst|more accurate|less accurate)\b"),
     "print which one is faster/better from the measured values"),
    ("typed drift comparison",
     re.compile(rf"\b{_NAMES}\b[^.!?\n]{{0,30}}?\b(?:drifts?|deviates?|differs?) (?:further|more|less)\b"),
     "print both drifts and the comparison from them"),
]

#: text about how the project was made, which a reader cannot know about
MAKING_OF = [
    re.compile(r"\bseed article\b", re.I),
    re.compile(r"\bthe original PyTorch (?:QAT )?(?:article|blog(?: post)?|tutorial)\b", re.I),
    re.compile(r"\b(?:the|this|that) issue (?:asked|asks|set|sets|says|said|wants|wanted|requires|required|"
               r"demands|calls for)\b", re.I),
    re.compile(r"\bissue #?\d+\b", re.I),
    re.compile(r"\bnot fixed yet\b", re.I),
    re.compile(r"\bthe lead\b(?! (?:time|pipe|acid|ing))", re.I),
    re.compile(r"\bthis session\b", re.I),
    re.compile(r"\b(?:the|our) brief\b", re.I),
    re.compile(r"\bthe (?:reviewers?|newcomer who)\b", re.I),
]


#: a statement that asks, defines or conditions ("whether QAT beats PTQ", "below 1 means
#: int8 is faster", "MinMax is best when ...") is not a typed fact
_HEDGE_BEFORE = re.compile(r"\b(?:whether|if|where|when|how much|how to tell|means|meaning|would|could|should|"
                           r"unless|until|expect(?:ed|s)? to|claims?|claimed)\b[^.!?\n;]*$", re.I)
_HEDGE_AFTER = re.compile(r"^\s*(?:when|if|unless|only if|back|depends)\b", re.I)


def machine_fact_findings(text):
    """``[(name, phrase, why)]`` for every machine-dependent statement in ``text``.

    >>> machine_fact_findings("Without a dot-product instruction, int8 must widen to int16.")
    []
    >>> [f[1] for f in machine_fact_findings("This machine has AVX-512 VNNI, so x86 is 2.8x faster.")]
    ['This machine has AVX-512 VNNI', '2.8x faster']
    >>> machine_fact_findings("We measure whether QAT beats PTQ; below 1 means int8 is faster.")
    []
    """
    text = re.sub(r'"[^"\n]{0,80}"|“[^”\n]{0,80}”', " ", text)  # quoted phrases are not claims
    found = []
    for name, pattern, why in MACHINE_FACTS:
        for m in pattern.finditer(text):
            if _HEDGE_BEFORE.search(text[max(0, m.start() - 60):m.start()]) or \
                    _HEDGE_AFTER.match(text[m.end():m.end() + 12]):
                continue
            found.append((name, m.group(0), why))
    return found


def making_of_findings(text):
    """Phrases in ``text`` that talk about how the project was made.

    >>> making_of_findings("The issue asked for qparams within one step of the seed article's.")
    ['seed article', 'The issue asked']
    >>> making_of_findings("The issue with MinMax is one outlier.")
    []
    """
    return [m.group(0) for p in MAKING_OF for m in p.finditer(text)]


def _strip_code(markdown):
    """Markdown without fenced code, inline code and link targets (URLs are not prose)."""
    markdown = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    markdown = re.sub(r"`[^`]*`", " ", markdown)
    return re.sub(r"\]\([^)]*\)", "]", markdown)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_markdown_states_no_machine_dependent_fact_as_fixed_text(path):
    nb = nbformat.read(path, as_version=4)
    problems = [f"{path.name} cell {i}: {name}: {phrase!r} ({why})"
                for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
                for name, phrase, why in machine_fact_findings(_strip_code(cell.source))]
    assert not problems, ("machine-dependent facts typed into markdown; print them from the "
                          "measured values instead:\n" + "\n".join(problems))


@pytest.mark.parametrize("path", NOTEBOOKS + [ROOT / "README.md"],
                         ids=[p.stem for p in NOTEBOOKS] + ["README"])
def test_no_text_about_how_the_project_was_made(path):
    if path.suffix == ".md":
        cells = [(0, path.read_text(encoding="utf-8"))]
    else:
        cells = [(i, c.source) for i, c in enumerate(nbformat.read(path, as_version=4).cells)]
    problems = [f"{path.name} cell {i}: {phrase!r}" for i, text in cells
                for phrase in making_of_findings(text)]
    assert not problems, ("text about how the project was made (a reader has none of it; cite a "
                          "public source instead):\n" + "\n".join(problems))


# --- executed notebooks: printed verdicts agree with printed numbers ---------------------

_NUM = r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)"


def _side(printed, bar):
    """Is the printed number above ``bar``? ``None`` when its rounding straddles the bar.

    A value printed as ``2.0`` may be 1.96 or 2.04: either verdict agrees with it.
    """
    value = float(printed)
    if "e" not in printed.lower():
        digits = len(printed.split(".")[1]) if "." in printed else 0
        if abs(value - bar) <= 0.5 * 10 ** -digits:
            return None
    return value > bar


def _agrees(printed, bar, says_above):
    side = _side(printed, bar)
    return side is None or side == says_above


#: (what, pattern, check(match) -> error text or None)
VERDICTS = [
    ("p-value vs verdict",
     re.compile(rf"\bp = {_NUM}\s*->\s*(a real difference|within noise|no difference detected)"),
     lambda m: None if _agrees(m[1], 0.05, m[2] != "a real difference") else
     f"p = {m[1]} but the verdict says {m[2]!r} (the bar is p < 0.05)"),
    ("ratio vs faster/slower",
     re.compile(rf"\b{_NUM}\s*(?:×|x)\s+(faster|slower)\b"),
     lambda m: None if float(m[1]) >= 1 else
     f"{m[1]}x {m[2]}: a ratio below 1 means the opposite verdict"),
    ("distance in SE vs within/beyond",
     re.compile(rf"= {_NUM} SE\b[^\n]*?->\s*(within|beyond) 2 SE"),
     lambda m: None if _agrees(m[1], 2, m[2] == "beyond") else
     f"{m[1]} SE but the verdict says {m[2]!r} 2 SE"),
    ("|diff| / SE vs verdict",
     re.compile(rf"\|diff\| / SE = {_NUM} -> (A beats B|B beats A|no difference beyond 2 SE)"),
     lambda m: None if _agrees(m[1], 2, m[2] != "no difference beyond 2 SE") else
     f"|diff|/SE = {m[1]} but the verdict says {m[2]!r}"),
    ("gains/loses vs sign",
     re.compile(rf"\b(better|worse) by {_NUM} dB"),
     lambda m: None if float(m[2]) >= 0 else f"{m[1]} by a negative amount ({m[2]} dB)"),
]


def verdict_contradictions(text):
    """Verdicts in printed ``text`` that contradict the number printed with them.

    >>> verdict_contradictions("paired: 6 only A; p = 0.125 -> within noise")
    []
    >>> verdict_contradictions("exact p = 0.01 -> no difference detected (at 5 %)")
    ["p-value vs verdict: p = 0.01 but the verdict says 'no difference detected' (the bar is p < 0.05)"]
    >>> verdict_contradictions("exact p = 0.01 -> within noise (at 5 %)")
    ["p-value vs verdict: p = 0.01 but the verdict says 'within noise' (the bar is p < 0.05)"]
    >>> verdict_contradictions("int8 is 0.85x faster than fp32 here")
    ['ratio vs faster/slower: 0.85x faster: a ratio below 1 means the opposite verdict']
    """
    found = []
    for what, pattern, check in VERDICTS:
        for m in pattern.finditer(text):
            error = check(m)
            if error:
                found.append(f"{what}: {error}")
    return found


def _outputs_text(nb):
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                yield i, out.get("text", "")
            elif "text/plain" in out.get("data", {}):
                yield i, out["data"]["text/plain"]


def executed_notebooks(extra_dirs=()):
    dirs = [ROOT / "build" / "executed", *extra_dirs]
    return sorted({p for d in dirs if d.is_dir() for p in d.glob("[0-9][0-9]_*.ipynb")})


def test_every_verdict_pattern_catches_its_contradiction():
    bad = ["p = 0.2 -> a real difference", "0.5x slower", "= 2.6 SE of one accuracy -> within 2 SE",
           "|diff| / SE = 1.1 -> A beats B", "worse by -1.0 dB", "|diff| / SE = 2.01 -> no difference beyond 2 SE",
           "|diff| / SE = 1.94 -> A beats B", "p = 0.051 -> a real difference"]
    for text in bad:
        assert verdict_contradictions(text), text
    good = ["p = 0.01 -> a real difference", "1.8x slower", "= 1.2 SE of one accuracy -> within 2 SE",
            "|diff| / SE = 3.0 -> A beats B", "worse by 2.3 dB",
            # printed values whose rounding straddles the bar: either verdict can be right
            "|diff| / SE = 2.0 -> B beats A", "|diff| / SE = 2.0 -> no difference beyond 2 SE",
            "= 2.0 SE of one accuracy -> beyond 2 SE", "p = 0.05 -> a real difference"]
    assert not [t for t in good if verdict_contradictions(t)]


def test_printed_verdicts_agree_with_printed_numbers():
    """The notebooks `make run` executed (each papermill test checks its own run as it ends:
    tests/conftest.py, assert_verdicts_agree)."""
    paths = executed_notebooks()
    if not paths:
        pytest.skip("no executed notebooks in build/executed (make run)")
    problems = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for i, text in _outputs_text(nb):
            problems += [f"{path} cell {i}: {p}" for p in verdict_contradictions(text)]
    assert not problems, "printed verdicts contradict their numbers:\n" + "\n".join(problems)


@pytest.mark.parametrize("text", [
    "This machine has no VNNI, so int8 is slow here.",
    "int8 is slow because there is no VNNI on this CPU.",
    "Measured here, qnnpack is 2x faster than x86 at batch 1.",
    "ORT drifts further than ExecuTorch.",
    "The histogram observer wins on every layer.",
    "On this machine XNNPACK int8 is slower than fp32.",
    "XNNPACK is faster than eager int8.",
])
def test_machine_dependent_statements_are_caught(text):
    assert machine_fact_findings(text), text


@pytest.mark.parametrize("text", [
    "Without a dot-product instruction, int8 must widen to int16, so each multiply costs more.",
    "VNNI adds groups of four int8 products straight into int32.",
    "Whether int8 is faster depends on the kernels and the CPU; the cell below prints the verdict.",
    "How to tell whether QAT beats PTQ, and how much QAT wins back at 4 bits.",
    "MinMax is best when its largest values are real data.",
    'why "int8 is faster" depends on the kernels',
    "Each extra bit halves the step: about 6.02 dB.",
])
def test_explanations_of_why_pass(text):
    assert not machine_fact_findings(text), machine_fact_findings(text)
