"""A Jupyter kernel client that cannot sleep through a message: what ``make run`` and the papermill tests execute with.

**The hang it prevents.** papermill (through nbclient) waits for a cell's ``execute_reply`` with
one ``await socket.poll(timeout)`` on the shell channel's ``zmq.asyncio`` socket
(``jupyter_client``'s ``AsyncZMQSocketChannel.get_msg``). ZeroMQ signals new messages through
a file descriptor that is *edge-triggered* (libzmq's ``zmq_getsockopt``, ``ZMQ_FD``: it only
tells that the socket's state may have changed), and here that wakeup can go missing: found
with ``scripts/stress_kernels --live-widgets`` on notebook 01 beside a CPU-burning process and
traced message by message, the
kernel sent the reply of the ``interact(...)`` cell (about twenty widget messages on iopub at
the same moment) with its header dated right after the cell ran, and the client's ``poll``
returned it only when its timeout ran out, 45 s later with a 45 s limit (60 s with a 60 s
limit, 124 s with 120 s: the delay follows the client's timeout, not the kernel). With no time limit, the client waits forever for a reply it already has:
a kernel idle in its event loop and a client waiting, the hang of a papermill run.

**The fix.** :class:`SlicedPollChannel` waits in slices of :data:`POLL_SLICE` seconds: each
slice is a fresh ``poll``, which looks at the socket's state again, so a lost wakeup costs at
most one slice. The overall timeout means what it meant before. :class:`KernelManager` is
jupyter_client's ``AsyncKernelManager`` with a client (:class:`KernelClient`) whose shell, iopub,
stdin and control channels are sliced; ``qatlab.runner.execute`` passes it to papermill as
``kernel_manager_class``.
"""

import time
from queue import Empty

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import DottedObjectName, Type

POLL_SLICE = 0.5   # seconds: the longest a missed wakeup can delay a message


class SlicedPollChannel(AsyncZMQSocketChannel):
    """``get_msg(timeout)`` that polls in slices of :data:`POLL_SLICE` s until ``timeout`` (``None``: no limit)."""

    async def get_msg(self, timeout=None):
        """The next message; ``queue.Empty`` once ``timeout`` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE if deadline is None else deadline - time.monotonic()
            try:
                return await super().get_msg(timeout=max(0.0, min(POLL_SLICE, left)))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class KernelClient(AsyncKernelClient):
    """jupyter_client's async kernel client with :class:`SlicedPollChannel` channels."""

    shell_channel_class = Type(SlicedPollChannel)
    iopub_channel_class = Type(SlicedPollChannel)
    stdin_channel_class = Type(SlicedPollChannel)
    control_channel_class = Type(SlicedPollChannel)


class KernelManager(AsyncKernelManager):
    """jupyter_client's async kernel manager, whose clients are :class:`KernelClient`."""

    client_class = DottedObjectName("qatlab.kernels.KernelClient")
    client_factory = Type(KernelClient)
