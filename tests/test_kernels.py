"""qatlab.kernels: a kernel client whose wait for a message survives a lost wakeup."""

import asyncio
import time
from queue import Empty

import pytest
from jupyter_client.channels import AsyncZMQSocketChannel

from qatlab import kernels


def run(coro):
    return asyncio.run(coro)


def test_a_message_whose_wakeup_was_lost_is_read_within_a_slice(monkeypatch):
    """The failure as measured: the message is in the socket, but the poll only sees it when its
    own timeout ends. One unsliced wait of 30 s would take 30 s; the sliced one takes one slice."""
    arrived = time.monotonic()

    async def lost_wakeup(self, timeout=None):
        await asyncio.sleep(timeout)          # the poll sleeps through the message...
        if time.monotonic() >= arrived:       # ...and finds it when its timeout ends
            return {"msg_type": "execute_reply"}
        raise Empty

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", lost_wakeup)
    channel = kernels.SlicedPollChannel.__new__(kernels.SlicedPollChannel)
    t = time.monotonic()
    assert run(channel.get_msg(timeout=30))["msg_type"] == "execute_reply"
    assert time.monotonic() - t < 2 * kernels.POLL_SLICE + 0.5
    t = time.monotonic()
    assert run(channel.get_msg(timeout=None))["msg_type"] == "execute_reply"   # no limit: still one slice
    assert time.monotonic() - t < 2 * kernels.POLL_SLICE + 0.5


def test_the_overall_timeout_still_holds(monkeypatch):
    slices = []

    async def nothing(self, timeout=None):
        slices.append(timeout)
        await asyncio.sleep(timeout)
        raise Empty

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", nothing)
    channel = kernels.SlicedPollChannel.__new__(kernels.SlicedPollChannel)
    t = time.monotonic()
    with pytest.raises(Empty):
        run(channel.get_msg(timeout=1.2))
    assert 1.2 <= time.monotonic() - t < 2.0
    assert len(slices) >= 3 and max(slices) <= kernels.POLL_SLICE
    slices.clear()
    with pytest.raises(Empty):
        run(channel.get_msg(timeout=0))     # a zero timeout is one non-blocking look, as before
    assert slices == [0.0]


def test_the_manager_makes_sliced_clients():
    km = kernels.KernelManager(kernel_name="python3")
    client = km.client()
    assert isinstance(client, kernels.KernelClient)
    for name in ("shell", "iopub", "stdin", "control"):
        assert getattr(client, f"{name}_channel_class") is kernels.SlicedPollChannel, name
