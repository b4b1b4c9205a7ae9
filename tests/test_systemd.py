"""`systemd.notify`: sd_notify datagrams to `$NOTIFY_SOCKET`, which may be a path or an abstract `@name`;
a missing socket costs a warning, never the process. (The datagrams a running `manaproxy serve` sends
are checked in test_lifecycle.py.)"""

from __future__ import annotations

import socket
import uuid

from manaproxy.systemd import notify


def test_sd_notify_reaches_an_abstract_socket_and_survives_a_missing_one(monkeypatch, caplog):
    """systemd may hand out `@name` (abstract namespace); a socket that is gone only logs a warning."""
    name = f"manaproxy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # nobody listens any more
    assert not notify("STOPPING=1")
    assert "sd_notify STOPPING failed" in caplog.text
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")
