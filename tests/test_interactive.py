"""qatlab.interactive: live ipywidgets.interact with a front end, one static call without one."""

import pytest
from ipywidgets import Checkbox, FloatSlider, IntSlider, fixed

from qatlab import interactive


def test_headless_calls_the_function_once_with_the_start_values(monkeypatch, capsys):
    monkeypatch.setenv("QATLAB_HEADLESS", "1")
    calls = []

    def show(data, bits=4, mode="minmax", scale=1.0, on=False):
        calls.append((data, bits, mode, scale, on))
        return "drawn"

    out = interactive.interact(show, data=fixed([1, 2]), bits=IntSlider(value=3, min=2, max=8),
                               mode=["histogram", "minmax"], scale=FloatSlider(value=0.5), on=Checkbox(True))
    assert out == "drawn" and calls == [([1, 2], 3, "minmax", 0.5, True)]  # a list starts at the default
    printed = capsys.readouterr().out
    assert "bits=3" in printed and "JupyterLab" in printed and "data=" not in printed


def test_start_values_match_what_ipywidgets_starts_at():
    from ipywidgets import interactive as live

    def f(a, b, c=7, d="x"):
        return a

    controls = dict(a=(0, 10), b=(0.0, 1.0, 0.1), c=(1, 9), d=["y", "x"])
    w = live(f, **controls)
    assert interactive.start_values(f, **controls) == {k: v for k, v in w.kwargs.items()}


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("1", True), ("yes", True)])
def test_headless_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("QATLAB_HEADLESS", value)
    assert interactive.headless() is expected


def test_live_mode_builds_real_widgets(monkeypatch):
    monkeypatch.delenv("QATLAB_HEADLESS", raising=False)
    calls = []
    w = interactive.interact(lambda x=2: calls.append(x), x=(0, 4))
    assert calls == [2] and hasattr(w, "widget")  # ipywidgets' interact returns the function, with .widget


def test_bad_input():
    with pytest.raises(TypeError, match="callable"):
        interactive.start_values(3, x=1)
