"""Check qatlab's cross-layer equalization against Brevitas's ``EqualizeGraph``, in a throwaway environment.

Brevitas 0.13 requires ``setuptools < 81`` and so does not install beside this course's pinned
environment; run it in a separate venv that borrows the course's torch::

    python3.11 -m venv /tmp/ref
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/ref/lib/python3.11/site-packages/course.pth
    /tmp/ref/bin/pip install brevitas==0.13.4
    PYTHONPATH=$PWD /tmp/ref/bin/python scripts/cle_vs_brevitas.py

For both BN-folded baselines it equalizes with :func:`qatlab.equalize.equalize_model` and with
Brevitas (``merge_bias=False``: Brevitas can also fold the bias into the range, which Nagel et
al.'s formula does not), prints the largest relative difference of every conv weight and the
output change of each, and a verdict (agree: every weight within 1e-3 relative).
"""

import copy
import sys

import torch
import torch.fx


def main():
    from brevitas.graph.equalize import EqualizeGraph

    from qatlab import equalize
    from qatlab.baseline import load_baseline
    from qatlab.fusion import fold_model_bn

    torch.manual_seed(0)
    worst = 0.0
    for name in ("smallcnn", "tinymobilenet"):
        fp = fold_model_bn(load_baseline(model=name))
        ours = equalize.equalize_model(copy.deepcopy(fp), iterations=100)
        theirs = EqualizeGraph(iterations=100, threshold=1e-7, merge_bias=False).apply(
            torch.fx.symbolic_trace(copy.deepcopy(fp)))
        x = torch.randn(8, 1, 28, 28)
        with torch.no_grad():
            print(f"{name}: output change ours {(ours(x) - fp(x)).abs().max().item():.1e}, "
                  f"Brevitas {(theirs(x) - fp(x)).abs().max().item():.1e}")
        mods = dict(theirs.named_modules())
        for n, m in ours.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                t = mods[n]
                rel = ((m.weight - t.weight).abs().max() / t.weight.abs().max()).item()
                worst = max(worst, rel)
                print(f"  {n}: largest weight difference {rel:.1e} of the layer's range")
    verdict = "AGREE" if worst < 1e-3 else "DISAGREE"
    print(f"VERDICT: {verdict}: qatlab.equalize vs Brevitas EqualizeGraph, worst relative weight difference {worst:.1e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
