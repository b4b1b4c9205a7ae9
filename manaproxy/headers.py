"""Which headers cross manaproxy, each way, like a reverse proxy's.

Rule of this module: pure, and the one place that decides.
- Client → upstream: the client's end-to-end headers (`OpenAI-Beta`, `Idempotency-Key`, `X-Stainless-*`,
  `User-Agent`, custom `X-…`) go on, subject to the provider's `forward_headers` (all, none, or a list).
  Never: the client's credentials (`Authorization`, `X-API-Key`, `Cookie` — the provider's key replaces
  them), hop-by-hop headers, what manaproxy sets itself (`Host`, `Content-Length`, `Content-Type`,
  `Accept-Encoding`, `X-Request-ID`), forwarding headers a client could forge (`Forwarded`,
  `X-Forwarded-*`), ours (`X-Mana-LLM-*`). `OpenAI-Organization` and `OpenAI-Project` name an OpenAI account:
  they go only to a provider whose `forward_headers` list names them. The provider's configured `headers`
  win over the client's.
- Upstream → client: the committed upstream's end-to-end headers (`x-ratelimit-*`, `openai-processing-ms`
  …) come back, its `x-request-id` as `X-Upstream-Request-ID`; never hop-by-hop headers,
  `Content-Length`/`Content-Encoding` (the body is relayed decoded), `Set-Cookie`, `Server`, `Date`, or what
  the proxy sets itself. Ours (`X-Request-ID`, `X-Mana-LLM-*`) win on conflict.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDictProxy

# RFC 9110 7.6.1 connection-specific fields, and the de-facto ones (Keep-Alive, Proxy-Connection).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NEVER_UPSTREAM = _HOP_BY_HOP | frozenset(
    {
        "authorization",
        "x-api-key",
        "cookie",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "expect",
        "x-request-id",
        "forwarded",
        "x-real-ip",
        "origin",  # CORS is between the browser and manaproxy
        "access-control-request-method",
        "access-control-request-headers",
    }
)
# Forwarded only to a provider whose `forward_headers` list names them.
ACCOUNT_HEADERS = frozenset({"openai-organization", "openai-project"})
_NEVER_DOWNSTREAM = _HOP_BY_HOP | frozenset(
    {
        "content-length",
        "content-encoding",
        "content-type",
        "set-cookie",
        "server",
        "date",
        "x-request-id",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-expose-headers",
        "vary",
    }
)
UPSTREAM_REQUEST_ID = "X-Upstream-Request-ID"


def _connection_tokens(connection: str) -> set[str]:
    """Header names a `Connection` header's value declares hop-by-hop."""
    return {token.strip().lower() for token in connection.split(",") if token.strip()}


def _ours(name: str) -> bool:
    return name.startswith(("x-mana-llm-", "x-forwarded-"))


def to_upstream(client: Mapping[str, str], forward: bool | frozenset[str]) -> dict[str, str]:
    """The client's headers that go to the upstream, under `forward_headers` (True, False or lower-case names)."""
    if forward is False:
        return {}
    dropped = _connection_tokens(client.get("Connection", ""))
    out: dict[str, str] = {}
    for name, value in client.items():
        lower = name.lower()
        if lower in _NEVER_UPSTREAM or lower in dropped or _ours(lower):
            continue
        if forward is True:
            if lower in ACCOUNT_HEADERS:
                continue
        elif lower not in forward:
            continue
        out[name] = value
    return out


def to_client(upstream: CIMultiDictProxy[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """The upstream's response headers that go back to the client (repeated names kept)."""
    dropped = _connection_tokens(upstream.get("Connection", ""))
    out = []
    for name, value in upstream.items():
        lower = name.lower()
        if lower == "x-request-id":
            out.append((UPSTREAM_REQUEST_ID, value))
        elif lower not in _NEVER_DOWNSTREAM and lower not in dropped and not _ours(lower):
            out.append((name, value))
    return out
