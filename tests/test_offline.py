"""Proof that the test run needs no network: under `scripts/offline` the tests run in a
network namespace whose only interface is loopback. This checks that claim for real."""

import errno
import os
import socket
from pathlib import Path

import pytest

proof = pytest.mark.skipif(os.environ.get("QATLAB_OFFLINE_PROOF") != "1",
                           reason="not running under scripts/offline as root (no network namespace)")


@proof
def test_only_loopback_interface_exists():
    # /proc/net/dev lists this network namespace's interfaces (sysfs may show the host's)
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    assert sorted(line.split(":")[0].strip() for line in lines) == ["lo"]


@proof
def test_outside_addresses_are_unreachable():
    for addr in [("1.1.1.1", 443), ("8.8.8.8", 53)]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        with pytest.raises(OSError) as info:
            s.connect(addr)
        s.close()
        assert info.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH), info.value


@proof
def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=2)
    client.close()
    server.close()
