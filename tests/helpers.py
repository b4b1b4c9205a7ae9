"""What the test modules share (fixtures live in conftest.py, fake upstreams in fakes.py):

- the config builder and the proxy under test: `build_config`, `google_spec`, `Proxy`, `ProxyTestServer`,
  `probe_tasks`;
- request bodies and the ways to send them: `CHAT`, `chat`, `ask`, `post_chat`, `two_entry_proxy`, and raw
  HTTP exchanges a client library would refuse to send (`raw_exchange`, `raw_response`, `raw_post`,
  `split_response`);
- what comes back: `assert_openai_error`, `events_of`, `error_event_of`, `sse_data`;
- metrics (`value`, `exists`, `scrape`, `varied_traffic`, `promtool`, `run_promtool`), the request log
  line (`FIELDS`, `parse_logfmt`, `logged_attempts`) and a process's resources (`rss_mib`, `open_files_limit`);
- bodies several modules send and read back: `big_request` (a chat request of any size), `AUDIO` and
  `form_part` (a multipart upload and one of its fields as the upstream received it);
- issue 16's cases, run by an SDK with its own retries direct and through manaproxy: `RETRY_CASES`,
  `direct_and_through`, the table's `Outcome` and `Row`, `print_table`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import openai
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from manaproxy.config import Config
from manaproxy.gateway import GATEWAY, Gateway
from manaproxy.reload import RELOADER, Reloader
from manaproxy.server import Runner

from .fakes import (
    NO_IMAGES,
    FakeGemini,
    FakeUpstream,
    Restarting,
    by_body,
    chat_answer,
    chat_chunks,
    chat_completion,
    closed_port_url,
    has_image,
    is_embedding,
    json_reply,
    sse_reply,
    status_reply,
)

CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"
ERROR_FIELDS = {"message", "type", "param", "code"}
# Timeouts for a chain entry whose timing a test provokes: every wait fails in well under a second.
FAST = {"connect": 0.5, "first_byte": 0.3, "idle": 0.3, "total": 2}
# Health settings under which probes run many times a second.
FAST_PROBES = {"probe_interval_seconds": 0.05, "probe_timeout_seconds": 1.0, "failure_threshold": 1}


# -- the config and the proxy under test -----------------------------------------------------------------


def build_config(
    providers: Mapping[str, FakeUpstream | str | Mapping[str, Any]],
    aliases: Mapping[str, Sequence[str] | Mapping[str, Any]] | None = None,
    *,
    default: str | None = None,
    health: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
) -> str:
    """YAML text for a config. A provider given as a FakeUpstream or URL becomes `{base_url: ...}`."""
    provider_specs: dict[str, Any] = {}
    for name, spec in providers.items():
        if isinstance(spec, FakeUpstream):
            provider_specs[name] = {"base_url": spec.base_url}
        elif isinstance(spec, str):
            provider_specs[name] = {"base_url": spec}
        else:
            provider_specs[name] = {
                key: (value.base_url if isinstance(value, FakeUpstream) else value) for key, value in spec.items()
            }
    alias_specs = {
        name: ({"chain": list(spec)} if not isinstance(spec, Mapping) else dict(spec))
        for name, spec in (aliases or {}).items()
    }
    raw: dict[str, Any] = {"providers": provider_specs, "aliases": alias_specs}
    if default is not None:
        raw["default"] = default
    # Tests want breakers that do not open behind their back unless they ask for it.
    raw["health"] = {"failure_threshold": 100, "backoff_seconds": 60, **(health or {})}
    if server is not None:
        raw["server"] = dict(server)
    return yaml.safe_dump(raw, sort_keys=False)


class ProxyTestServer(TestServer):
    """aiohttp's test server running the app on manaproxy's own `Runner`, as `manaproxy serve` does."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return Runner(self.app, **kwargs)


@dataclass
class Proxy:
    """A manaproxy application served on loopback (the `make_proxy` fixture), and what a test reads of it."""

    client: TestClient[web.Request, web.Application]
    app: web.Application
    registry: CollectorRegistry
    config: Config

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def reloader(self) -> Reloader:
        return self.app[RELOADER]

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("/v1"))

    @property
    def root_url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    @property
    def port(self) -> int:
        port = self.client.server.port
        assert port is not None
        return port

    def sdk(self, **options: Any) -> openai.AsyncOpenAI:
        """The official SDK pointed at this proxy, without its own retries (a test sees every answer)."""
        return openai.AsyncOpenAI(**{"base_url": self.base_url, "api_key": "unused", "max_retries": 0, **options})

    def reload_to(self, tmp_path: Path, text: str) -> bool:
        """Write `text` as the config file and reload it, as SIGHUP does."""
        path = tmp_path / "aliases.yaml"
        path.write_text(text)
        return self.reloader.reload(str(path))


GOOGLE_KEY = "test-key-1"


def google_spec(fake: FakeGemini, **extra: Any) -> dict[str, Any]:
    """Settings of a `google` provider served by `fake` (more settings in `extra`)."""
    return {"kind": "google", "base_url": fake.base_url, "api_key": GOOGLE_KEY, **extra}


def probe_tasks() -> list[asyncio.Task[Any]]:
    """The probe tasks (`manaproxy-probe-<provider>`) running now."""
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("manaproxy-probe")]


MakeUpstream = Callable[..., Awaitable[FakeUpstream]]
MakeProxy = Callable[..., Awaitable[Proxy]]


# -- requests ----------------------------------------------------------------------------------------------


def chat(model: str = "mana/x", *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def ask(proxy: Proxy, body: Mapping[str, Any] | None = None) -> str:
    """Post a chat request (`chat()` unless given) that must be answered; the target that answered it."""
    resp = await proxy.client.post(CHAT, json=body if body is not None else chat())
    assert resp.status == 200, await resp.text()
    await resp.read()
    return str(resp.headers["X-Mana-LLM-Resolved"])


async def post_chat(proxy: Proxy, body: Any, *, status: int = 200) -> bytes:
    """Post a chat request, check its status, return the whole body."""
    resp = await proxy.client.post(CHAT, json=body)
    data = await resp.read()
    assert resp.status == status, data
    return data


async def two_entry_proxy(
    make_upstream: MakeUpstream,
    make_proxy: MakeProxy,
    *,
    a_spec: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    **proxy_kwargs: Any,
) -> tuple[FakeUpstream, FakeUpstream, Proxy]:
    """Alias mana/x = [a/m1, b/m2]: `a` is the entry under test (`a_spec`: its extra settings), `b` stands by.

    Both answer chat requests as asked (SSE to a stream request, JSON otherwise) until the test scripts them.
    """
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = chat_answer("m1")
    b.default = chat_answer("m2")
    providers = {"a": {"base_url": a, **(a_spec or {})}, "b": b}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1", "b/m2"]}, health=health), **proxy_kwargs)
    return a, b, proxy


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


# -- answers -------------------------------------------------------------------------------------------------


async def assert_openai_error(resp: Any, status: int, code: str | None = None, *, param: str | None = None) -> dict:
    """`resp` is manaproxy's own OpenAI-shaped error with this status (and code/param when given)."""
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == ERROR_FIELDS
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def events_of(body: bytes) -> list[bytes]:
    """The SSE events of a relayed stream."""
    return [event for event in body.split(b"\n\n") if event]


def error_event_of(body: bytes) -> dict[str, Any]:
    """The final event must be our error event; return its `error` object."""
    last = events_of(body)[-1]
    assert last.startswith(b"data: "), last
    error = orjson.loads(last[len(b"data: ") :])["error"]
    assert set(error) == ERROR_FIELDS
    return error


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE text, decoded (`"[DONE]"` for the end marker)."""
    return [
        orjson.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
        for line in text.split("\n")
        if line.startswith("data: ")
    ]


# -- metrics -------------------------------------------------------------------------------------------------


def value(proxy: Proxy, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (a counter that never moved)."""
    return proxy.registry.get_sample_value(name, labels) or 0.0


def exists(proxy: Proxy, name: str, **labels: str) -> bool:
    return proxy.registry.get_sample_value(name, labels) is not None


async def scrape(proxy: Proxy) -> str:
    resp = await proxy.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return await resp.text()


async def varied_traffic(make_upstream: MakeUpstream, make_proxy: MakeProxy) -> Proxy:
    """A proxy shaped like the seed deployment (ollama, google, groq) after a mix of traffic.

    `google` is an openai-kind fake here: the dashboard's `{provider="google"}` queries need its series.
    """
    ollama = await make_upstream("ollama")
    google = await make_upstream("google")
    ollama.default = chat_answer("gemma3:4b", usage=(12, 30))
    google.default = chat_answer("gemini-2.0-flash", usage=(8, 21))
    providers = {
        "ollama": {"base_url": ollama, "timeouts": FAST, "max_concurrent": "auto"},  # the local GPU
        "google": google,
        "groq": {"base_url": closed_port_url(), "timeouts": FAST},
        "openrouter": {"base_url": closed_port_url(), "api_key": ""},
    }
    aliases = {
        "mana/long-form": ["groq/llama-3.3-70b-versatile", "ollama/gemma3:4b"],
        "mana/fast-text": ["openrouter/meta/llama-3.1-8b", "google/gemini-2.0-flash"],
        "mana/local": ["ollama/gemma3:4b"],
        "mana/hedged": {"chain": ["ollama/gemma3:4b", "google/gemini-2.0-flash"], "hedge_after": 0.05},
        "mana/cached": {"chain": ["ollama/gemma3:4b"], "cache": True},
    }
    proxy = await make_proxy(build_config(providers, aliases, default="mana/fast-text"))
    ollama.queue(json_reply(chat_completion("gemma3:4b"), delay=0.5))  # late: the hedge to google wins
    await post_chat(proxy, chat("mana/hedged"))
    for stream in (False, True):
        await post_chat(proxy, chat("mana/long-form", stream=stream))
        await post_chat(proxy, chat("mana/fast-text", stream=stream))
        await post_chat(proxy, chat("gemma3:4b", stream=stream))
        await post_chat(proxy, chat("google/gemini-2.0-flash", stream=stream))
        await post_chat(proxy, {"messages": [], "stream": stream})  # the default alias
        await post_chat(proxy, chat("mana/missing", stream=stream), status=404)
    for _ in range(2):  # a miss, then a hit (the memory backend)
        await post_chat(proxy, chat("mana/cached"))
    await post_chat(proxy, chat("groq/llama-3.3-70b-versatile"), status=503)  # the chain runs out
    ollama.queue(status_reply(400, "bad request"))
    await post_chat(proxy, chat("mana/local"), status=400)
    ollama.queue(sse_reply(chat_chunks("gemma3:4b", ["a", "b", "c"]), cut_after=2))
    await post_chat(proxy, chat("mana/local", stream=True))
    resp = await proxy.client.post(CHAT, data=b"{not json")
    assert resp.status == 400
    for path in ("/health", "/v1/health", "/v1/aliases", "/v1/models", "/nowhere"):
        await (await proxy.client.get(path)).read()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "aliases.yaml")
        path.write_text(build_config(providers, aliases, default="mana/fast-text"))
        assert proxy.reloader.reload(str(path))
        path.write_text("providers: {}\n")
        assert not proxy.reloader.reload(str(path))
    return proxy


def promtool() -> str:
    """The promtool binary, or skip the test."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed")
    return path


def run_promtool(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, input=input, capture_output=True, text=True, timeout=20, check=False
    )


# -- the request log line ----------------------------------------------------------------------------------

FIELDS = [
    "request_id",
    "endpoint",
    "model",
    "resolved",
    "attempts",
    "status",
    "stream",
    "outcome",
    "ttfb_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "client",
    "cache",
]

_PAIR_RE = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]+)(?: |$)')
_UNESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the whole line must be `key=value` pairs; quoted values are unescaped."""
    pairs: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _PAIR_RE.match(line, position)
        assert match is not None, f"not logfmt at {line[position:]!r}"
        key, raw = match.groups()
        if raw.startswith('"'):
            raw = re.sub(
                r"\\(u[0-9a-f]{4}|U[0-9a-f]{8}|.)",
                lambda m: _UNESCAPES.get(m.group(1)) or chr(int(m.group(1)[1:], 16)),
                raw[1:-1],
            )
        pairs[key] = raw
        position = match.end()
    return pairs


def logged_attempts(text: str) -> list[tuple[str, str]]:
    """The log's `attempts=` read as deploy/README.md documents it: items split on `,`, each split on its
    last `:`, each part percent-decoded."""
    return [tuple(unquote(part) for part in item.rsplit(":", 1)) for item in text.split(",")]  # type: ignore[misc]


# -- a process's resources ---------------------------------------------------------------------------------


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


# -- bodies several modules send and read back ----------------------------------------------------------------


def big_request(size: int, model: str = "mana/x") -> bytes:
    """A chat request whose one message is `size` bytes of text, `model` last (as the openai SDK orders it)."""
    text = b"abcdefghij" * (size // 10)
    return (
        b'{"messages": [{"role": "user", "content": "'
        + text
        + b'"}], "seed": 123456789012345678901234567890, "model": "'
        + model.encode()
        + b'"}'
    )


AUDIO = os.urandom(50_000) + b"\r\n--not-the-boundary\r\n" + os.urandom(1000)


def form_part(body: bytes, name: str) -> bytes:
    """The value of the form field `name` in a multipart body (the fake records bodies as bytes)."""
    marker = f'name="{name}"'.encode()
    start = body.index(marker)
    value_start = body.index(b"\r\n\r\n", start) + 4
    boundary_line = body[: body.index(b"\r\n")]
    return body[value_start : body.index(b"\r\n" + boundary_line, value_start)]


# -- mana-llm's own aliases.yaml (issue 17), as its operators have it ---------------------------------------

# Verbatim but for its comments: block-list chains, no `providers:` section.
MANA_LLM_ALIASES = """\
aliases:
  mana/fast-text:
    description: "Short answers, classification, single-shot Q&A"
    chain:
      - ollama/qwen2.5:7b
      - groq/llama-3.1-8b-instant
      - openrouter/anthropic/claude-3-haiku

  mana/long-form:
    description: "Writing, essays, stories, longer prose"
    chain:
      - ollama/gemma3:12b
      - groq/llama-3.3-70b-versatile
      - openrouter/anthropic/claude-3.5-haiku

  mana/structured:
    description: "JSON output (comic storyboards, research subqueries, tag suggestions)"
    chain:
      - ollama/qwen2.5:7b
      - groq/llama-3.1-8b-instant
      - openrouter/openai/gpt-4o-mini

  mana/reasoning:
    description: "Agent missions, tool calls, multi-step plans"
    chain:
      - openrouter/anthropic/claude-3.5-sonnet
      - groq/llama-3.3-70b-versatile

  mana/vision:
    description: "Multimodal (image + text)"
    chain:
      - ollama/llava:7b
      - google/gemini-2.0-flash-exp
      - openrouter/openai/gpt-4o

default: mana/fast-text
"""

# The same file with flow-list chains, as issue 17 quotes it.
MANA_LLM_ALIASES_FLOW = """\
aliases:
  mana/fast-text:
    description: "Short answers, classification, single-shot Q&A"
    chain: [ollama/qwen2.5:7b, groq/llama-3.1-8b-instant, openrouter/anthropic/claude-3-haiku]
  mana/long-form:
    description: "Writing, essays, stories, longer prose"
    chain: [ollama/gemma3:12b, groq/llama-3.3-70b-versatile, openrouter/anthropic/claude-3.5-haiku]
  mana/structured:
    description: "JSON output (comic storyboards, research subqueries, tag suggestions)"
    chain: [ollama/qwen2.5:7b, groq/llama-3.1-8b-instant, openrouter/openai/gpt-4o-mini]
  mana/reasoning:
    description: "Agent missions, tool calls, multi-step plans"
    chain: [openrouter/anthropic/claude-3.5-sonnet, groq/llama-3.3-70b-versatile]
  mana/vision:
    description: "Multimodal (image + text)"
    chain: [ollama/llava:7b, google/gemini-2.0-flash-exp, openrouter/openai/gpt-4o]
default: mana/fast-text
"""


# -- the Node openai SDK (tests/node; the `node` fixture in conftest.py runs its scripts) ------------------

NODE_DIR = Path(__file__).parent / "node"
NODE_TIMEOUT = 20.0  # seconds for one script; each takes well under one


def node_env() -> dict[str, str]:
    """The environment a client script runs in: ours, without what would configure the SDK or Node."""
    return {name: value for name, value in os.environ.items() if not name.startswith(("OPENAI_", "NODE_"))}


# -- issue 16: direct vs through manaproxy, through an SDK's own retries ----------------------------------
#
# Each case scripts the same upstream twice — once called directly, once through manaproxy (a one-entry alias,
# `failure_threshold: 2`, probes on) — and an app (an SDK with its DEFAULT retries) makes the same calls to
# both. Per call, a `Row` compares the outcome, the error class, the status, the provider's message and the
# elapsed time. test_sdk_retries.py runs the cases with the Python SDK, test_node_sdk_retries.py with Node's.

RETRY_HEALTH = {"failure_threshold": 2, "backoff_seconds": 60}
ELAPSED_SLACK = 1.0  # seconds: through manaproxy within this of direct
# The one difference no gateway can remove: without an HTTP answer the SDK raises APIConnectionError; a
# gateway answers with one (503, listing the entry and why). Both SDKs name their classes alike.
INHERENT = {("APIConnectionError", "InternalServerError")}


@dataclass(frozen=True)
class Outcome:
    """What one app call ended in."""

    error: str  # the error's class, or "-" when it succeeded
    status: int | None
    message: str  # the error's message as the app reads it (the error object's `message`)
    elapsed: float

    def cell(self) -> str:
        what = "ok" if self.error == "-" else f"{self.error} {self.status or ''}".strip()
        return f"{what} {self.elapsed:.2f}s"


@dataclass(frozen=True)
class Row:
    case: str
    call: str
    direct: Outcome
    through: Outcome

    @property
    def differences(self) -> list[str]:
        """How the call through manaproxy differs from direct (empty: indistinguishable)."""
        direct, through = self.direct, self.through
        found = []
        if direct.error != through.error and (direct.error, through.error) not in INHERENT:
            found.append(f"class {direct.error} != {through.error}")
        if direct.error == through.error and direct.status != through.status:
            found.append(f"status {direct.status} != {through.status}")
        # Ours prefixes the entry: `a/m: <the provider's message>`. (No HTTP answer direct: no message to keep.)
        if direct.error == through.error and direct.message not in through.message:
            found.append(f"message {direct.message!r} not in {through.message!r}")
        if abs(through.elapsed - direct.elapsed) > ELAPSED_SLACK:
            found.append(f"elapsed {direct.elapsed:.2f}s vs {through.elapsed:.2f}s")
        return found

    def line(self) -> str:
        same = "same" if not self.differences else "; ".join(self.differences)
        if not self.differences and self.direct.error != self.through.error:
            same = "inherent (no HTTP answer direct)"
        return f"| {self.case} | {self.call} | {self.direct.cell()} | {self.through.cell()} | {same} |"


def print_table(rows: Sequence[Row]) -> None:
    """The whole "direct vs through manaproxy" table (pytest shows it with `-s`)."""
    if rows:
        print("\n| case | call | direct | through manaproxy | difference |\n|---|---|---|---|---|")
        for row in rows:
            print(row.line())


CHAT_OK = json_reply(chat_completion("m"))


@dataclass(frozen=True)
class RetryCase:
    """One case of issue 16: the app's calls (chat, image, embeddings) and the upstream they meet."""

    name: str
    calls: tuple[str, ...]
    script: Callable[[FakeUpstream], None] = lambda up: None
    upstream: str = "fake"  # fake (scripted), restart (down 0.3 s as the call begins), dead (nothing listens)
    expect: tuple[str, ...] = field(default=())  # each call's error class through manaproxy ("-": none)


def _queue(*behaviors: Any) -> Callable[[FakeUpstream], None]:
    def script(up: FakeUpstream) -> None:
        up.queue(*behaviors)
        up.default = CHAT_OK

    return script


def _default(behavior: Any) -> Callable[[FakeUpstream], None]:
    def script(up: FakeUpstream) -> None:
        up.default = behavior

    return script


RETRY_CASES = [
    RetryCase(
        "429 429 200, no hint", ("chat",), _queue(status_reply(429, "slow down"), status_reply(429, "slow down"))
    ),
    RetryCase(
        "429 429 200, retry-after-ms only",
        ("chat",),
        _queue(*[status_reply(429, "slow down", headers={"retry-after-ms": "200"})] * 2),
    ),
    RetryCase("upstream restarts for 0.3 s", ("chat",), upstream="restart"),
    RetryCase("dead lone provider", ("chat",), upstream="dead", expect=("InternalServerError",)),
    RetryCase(
        "images refused (llama.cpp 500), then text",
        ("image", "image", "chat"),
        _default(by_body(has_image, status_reply(500, NO_IMAGES), CHAT_OK)),
        expect=("InternalServerError", "InternalServerError", "-"),
    ),
    RetryCase(
        "images fail (500 boom), then text",
        ("image", "image", "chat"),
        _default(by_body(has_image, status_reply(500, "boom"), CHAT_OK)),
        expect=("InternalServerError", "InternalServerError", "-"),
    ),
    RetryCase(
        "embeddings 501 (no --embeddings), then chat",
        ("embeddings", "embeddings", "chat"),
        _default(by_body(is_embedding, status_reply(501, "This server does not support embeddings"), CHAT_OK)),
        expect=("InternalServerError", "InternalServerError", "-"),
    ),
    RetryCase(
        "lone 500 on every try",
        ("chat",),
        _default(status_reply(500, "model crashed")),
        expect=("InternalServerError",),
    ),
]

# The app: (base URL, model, the calls to make one after the other) -> one Outcome per call.
App = Callable[[str, str, tuple[str, ...]], Awaitable[list[Outcome]]]
# Readies an app (a Node process started and waiting) before the case's clock starts: an outage that begins
# as the app makes its first call must not pass while the app is still starting.
Launch = Callable[[], Awaitable[App]]


@contextlib.asynccontextmanager
async def retry_upstream(case: RetryCase, make_upstream: MakeUpstream) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """(base URL of a fresh upstream scripted for `case`, what to do just before the app's first call)."""
    if case.upstream == "dead":
        yield closed_port_url(), lambda: None
        return
    if case.upstream == "restart":
        upstream = Restarting()
        await upstream.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            yield upstream.base_url, lambda: tasks.append(asyncio.ensure_future(upstream.restart_for(0.3)))
            await asyncio.gather(*tasks)
        finally:
            await upstream.stop()
        return
    fake = await make_upstream(case.name)
    fake.models = ["m"]
    case.script(fake)
    yield fake.base_url, lambda: None


async def _direct(case: RetryCase, launch: Launch, make_upstream: MakeUpstream) -> list[Outcome]:
    app = await launch()
    async with retry_upstream(case, make_upstream) as (base_url, before):
        before()
        await asyncio.sleep(0.05)  # as through manaproxy, whose startup probe runs meanwhile
        return await app(base_url, "m", case.calls)


async def _through(
    case: RetryCase, launch: Launch, make_upstream: MakeUpstream, make_proxy: MakeProxy
) -> list[Outcome]:
    app = await launch()
    async with retry_upstream(case, make_upstream) as (base_url, before):
        # A restart begins as manaproxy starts: its startup probe fails too, and with the app's first try
        # that is `failure_threshold` failures: the provider's breaker opens (the worst case of a restart).
        before()
        proxy = await make_proxy(build_config({"a": base_url}, {"mana/x": ["a/m"]}, health=RETRY_HEALTH), probes=True)
        await asyncio.sleep(0.05)  # the startup probe round
        return await app(proxy.base_url, "mana/x", case.calls)


async def direct_and_through(
    case: RetryCase, launch: Launch, make_upstream: MakeUpstream, make_proxy: MakeProxy
) -> list[Row]:
    """Run `case` with an app of `launch`'s direct and with another through manaproxy, both at once (each has
    its own upstream and timings: they share the wall clock), and pair the two outcomes of each call."""
    direct, through = await asyncio.gather(
        _direct(case, launch, make_upstream), _through(case, launch, make_upstream, make_proxy)
    )
    return [Row(case.name, call, d, t) for call, d, t in zip(case.calls, direct, through, strict=True)]


def assert_indistinguishable(case: RetryCase, rows: list[Row], table: list[Row]) -> None:
    """Each call of `case` the same direct and through manaproxy (the allowed difference aside), and the error
    through manaproxy the one the case expects; the rows go to `table`, printed at the module's end."""
    table.extend(rows)
    for row in rows:
        print(row.line())
    assert [row.differences for row in rows] == [[] for _ in rows]
    expect = case.expect or ("-",) * len(rows)
    assert [row.through.error for row in rows] == list(expect)
