"""Helpers the test modules share: request bodies and raw HTTP exchanges a client library would refuse."""

from __future__ import annotations

import asyncio
from typing import Any

CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"


def chat(model: str = "mana/x", *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send `request` verbatim and read to EOF (the request should say `Connection: close`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def raw_post(target: str | bytes, body: bytes, *, headers: dict[str, str] | None = None) -> bytes:
    """A `POST` request with `target` as the request target, exactly as given (dot segments and all)."""
    if isinstance(target, str):
        target = target.encode()
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [
        f"{name}: {value}".encode() for name, value in {"Content-Type": "application/json", **(headers or {})}.items()
    ]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP/1.1 response without chunking."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def raw_response(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send `request` verbatim and read one whole response (by its Content-Length), not waiting for EOF:
    after refusing a body the server may linger, reading what the client still sends, before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return head + await reader.readexactly(length)
    finally:
        writer.close()


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB (VmRSS, VmHWM)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def open_files_limit(pid: int) -> tuple[str, str]:
    """(soft, hard) limit on open files of a process, as /proc/PID/limits shows them."""
    with open(f"/proc/{pid}/limits") as limits:
        line = next(text for text in limits if text.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return soft, hard
