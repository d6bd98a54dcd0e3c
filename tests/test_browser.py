"""The widgets work in JupyterLab, proven by a real browser.

Starts JupyterLab headless on 127.0.0.1 (random free port, token auth on) over a
scratch copy of notebooks/, drives Debian's chromium with Playwright: opens notebook
01, runs all cells, moves the first widget slider with the keyboard, asserts the
plot image in that widget's output changed, and saves a screenshot to
``build/screenshots/01_widget.png`` in the checkout.
JupyterLab, its kernels and the browser are stopped in every case, and the test
asserts that none of the processes it started is left.

Skipped when /usr/bin/chromium is missing, unless ``QATLAB_REQUIRE_BROWSER=1`` (CI).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "01_fake_quant_math.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_TIMEOUT = 150  # seconds for Run All Cells (notebook 01 runs real work, ≈ 60 s on a busy machine)

# JupyterLab settings for the scratch profile: no news/update toasts over the page,
# every cell kept in the DOM so nothing needs scrolling into existence, and the
# notebook's kernel started without the "Select Kernel" dialog.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none", "autoStartDefaultKernel": True},
}


def browser_available():
    if CHROMIUM.exists():
        return True
    if os.environ.get("QATLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{CHROMIUM} is missing and QATLAB_REQUIRE_BROWSER=1 (install Debian's chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set QATLAB_REQUIRE_BROWSER=1 to fail instead")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """PIDs of every live (non-zombie) process below ``pid``, read from /proc."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids):
    """The pids of ``pids`` that still run (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            out.add(pid)
    return out


def kill_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@contextmanager
def jupyter_lab(scratch, build):
    """Start JupyterLab over ``scratch/notebooks`` with ``QATLAB_BUILD=build``; yield
    (base url, token, process, set of the pids it started: filled in on exit).

    Stops it on exit in every case: a polite /api/shutdown (which shuts its kernels
    down), then SIGTERM and SIGKILL to its process group and to any kernel left.
    """
    token, port = secrets.token_hex(16), free_port()
    for name, value in LAB_SETTINGS.items():
        path = scratch / "lab-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = dict(os.environ,
               QATLAB_BUILD=str(build),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               JUPYTERLAB_SETTINGS_DIR=str(scratch / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(scratch / "lab-workspaces"),
               JUPYTER_RUNTIME_DIR=str(scratch / "runtime"),
               JUPYTER_CONFIG_DIR=str(scratch / "config"),
               IPYTHONDIR=str(scratch / "ipython"),
               MPLCONFIGDIR=str(scratch / "mpl"))
    env.pop("QATLAB_HEADLESS", None)  # a person's JupyterLab: live widgets (qatlab.interactive)
    jupyter = Path(sys.executable).parent / "jupyter"
    cmd = [str(jupyter), "lab", "--no-browser", f"--ServerApp.token={token}", f"--ServerApp.port={port}",
           "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", "--allow-root",
           f"--notebook-dir={scratch / 'notebooks'}", "--LabApp.news_url=None",
           "--ServerApp.terminals_enabled=False"]
    log = open(scratch / "jupyter.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    started = set()
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}: "
                                   f"{(scratch / 'jupyter.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("JupyterLab did not answer within 60 s")
            time.sleep(0.5)
        yield base, token, proc, started
    finally:
        started |= {proc.pid} | descendants(proc.pid)  # the server and its kernels
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=5).close()
            proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            left = alive(started - {proc.pid})
            if left:  # kernels run in their own session: stop them by pid
                kill_all(left, sig)
                deadline = time.time() + 10
                while alive(left) and time.time() < deadline:
                    time.sleep(0.2)
        log.close()


def kernel_states(base, token):
    """Execution state of each running kernel, from the server's REST API."""
    try:
        with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=5) as r:
            return [k["execution_state"] for k in json.load(r)]
    except OSError:
        return []


def wait_until(predicate, timeout, what, interval=0.5):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def screenshot_path():
    # always the checkout's build/screenshots/, also when QATLAB_BUILD points elsewhere
    from qatlab.files import repo_root

    return repo_root() / "build" / "screenshots" / "01_widget.png"


def run_all_and_move_slider(page, base, token, notebook, shot):
    """The browser part: returns a dict of what it saw (for the test's asserts)."""
    page.goto(f"{base}/lab/tree/{notebook}?token={token}", wait_until="domcontentloaded")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    # kernel ready: the server reports the notebook's kernel idle
    wait_until(lambda: kernel_states(base, token) == ["idle"], 90, "the notebook's kernel to start")

    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    def finished():
        prompts = [p.strip() for p in page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()]
        idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0 \
            and kernel_states(base, token) == ["idle"]
        failed = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                              ).get_by_text("Traceback").count() > 0
        # the kernel is idle again, nothing is queued, and the last cell ran (or one failed)
        return (idle and prompts and "[*]:" not in prompts
                and (re.fullmatch(r"\[\d+\]:", prompts[-1]) or failed))

    start = time.time()
    wait_until(finished, RUN_TIMEOUT, "Run All Cells to finish (kernel idle, last prompt '[n]:')")
    seconds = time.time() - start
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                          ).all_inner_texts()
    tracebacks = [t for t in errors if "Traceback" in t]
    assert not tracebacks, f"cells failed in JupyterLab: {tracebacks[0][-1500:]}"
    # a widget that did not render shows as text: fail now with that text, not on a timeout
    assert page.get_by_text("Error displaying widget").count() == 0, "the page shows 'Error displaying widget'"
    raw = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "interactive(" in t]
    assert not raw, f"a widget shows as its text repr: {raw[0][:300]}"

    slider = page.locator(".jp-OutputArea-output .widget-slider .noUi-handle").first
    slider.wait_for(timeout=30_000)
    widget = slider.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' widget-interact ')][1]")
    image = widget.locator(".widget-output img").first
    image.wait_for(timeout=30_000)
    before_src, before_value = image.get_attribute("src"), slider.get_attribute("aria-valuenow")
    slider.scroll_into_view_if_needed()
    slider.focus()
    page.keyboard.press("ArrowRight")

    def redrawn():
        if image.count() == 0:
            return None
        src = image.get_attribute("src")
        return src if src and src != before_src else None

    after_src = wait_until(redrawn, 60, "the widget's plot to change after moving the slider")
    after_value = slider.get_attribute("aria-valuenow")
    page.wait_for_timeout(500)  # let the output finish painting before the screenshot
    widget.evaluate("e => e.scrollIntoView({block: 'center'})")
    page.wait_for_timeout(300)
    png = page.screenshot(full_page=False)
    from qatlab.files import atomic_path

    with atomic_path(shot) as tmp:
        tmp.write_bytes(png)
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    return {"seconds": seconds, "tracebacks": tracebacks, "before": before_src, "after": after_src,
            "value": (before_value, after_value),
            "error_widgets": page.get_by_text("Error displaying widget").count(),
            "raw_reprs": [t for t in outputs if "interactive(" in t],
            "sliders": page.locator(".widget-slider").count()}


def page_state(page):
    """Prompts and kernel status, for error messages."""
    try:
        prompts = [p.strip() for p in page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()]
        status = page.locator(".jp-Notebook-ExecutionIndicator").evaluate_all(
            "els => els.map(e => e.getAttribute('data-status'))")
        return f"prompts {prompts}, execution indicator {status}, url {page.url}"
    except Exception as e:  # the page may be gone
        return f"unavailable ({type(e).__name__}: {e})"


def drive(notebook_src, scratch, build, shot):
    """Copy ``notebook_src`` (a notebooks folder) to ``scratch`` and drive ``NOTEBOOK`` in it."""
    from playwright.sync_api import sync_playwright

    shutil.copytree(notebook_src, scratch / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    ours_before = descendants(os.getpid())
    started = set()
    try:
        with jupyter_lab(scratch, build) as (base, token, _proc, lab_started):
            try:
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=CHROMIUM_ARGS)
                    try:
                        started |= descendants(os.getpid()) - ours_before - lab_started
                        page = browser.new_page(viewport={"width": 1400, "height": 1000})
                        page.set_default_timeout(30_000)
                        try:
                            seen = run_all_and_move_slider(page, base, token, NOTEBOOK, shot)
                        except Exception as e:  # keep what the page showed, for debugging
                            failed_shot = shot.with_name(shot.stem + "_failed.png")
                            failed_shot.parent.mkdir(parents=True, exist_ok=True)
                            page.screenshot(path=str(failed_shot), full_page=True)
                            e.add_note(f"page state: {page_state(page)}; screenshot {failed_shot}")
                            raise
                    finally:
                        started |= descendants(os.getpid()) - ours_before
                        browser.close()
            finally:
                started |= lab_started
    finally:
        started |= descendants(os.getpid()) - ours_before
        deadline = time.time() + 15
        while alive(started) and time.time() < deadline:
            time.sleep(0.2)
        left = alive(started)
        kill_all(left, signal.SIGKILL)
    assert not left, f"processes left behind (killed now): {sorted(left)}"
    return seen


@pytest.mark.browser
def test_widget_slider_redraws_plot_in_jupyterlab(tmp_path, browser_build):
    """The kernel writes into the session's shared scratch build (tests/conftest.py), so the
    baseline checkpoint notebook 01 loads is trained at most once per test session."""
    browser_available()
    assert (ROOT / "notebooks" / NOTEBOOK).exists(), f"notebooks/{NOTEBOOK} is missing"
    shot = screenshot_path()
    shot.unlink(missing_ok=True)
    start = time.time()
    seen = drive(ROOT / "notebooks", tmp_path, browser_build, shot)
    print(f"browser test: Run All {seen['seconds']:.1f} s, total {time.time() - start:.1f} s, "
          f"slider {seen['value'][0]} -> {seen['value'][1]}, screenshot {shot}")
    assert not seen["tracebacks"], f"cells failed in JupyterLab: {seen['tracebacks']}"
    assert seen["error_widgets"] == 0, "the page shows 'Error displaying widget'"
    assert not seen["raw_reprs"], f"a widget shows as text: {seen['raw_reprs'][:1]}"
    assert seen["sliders"] >= 1
    assert seen["value"][0] != seen["value"][1], f"the slider did not move: {seen['value']}"
    assert seen["before"].startswith("data:image/png") and seen["after"].startswith("data:image/png")
    assert seen["before"] != seen["after"]
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
