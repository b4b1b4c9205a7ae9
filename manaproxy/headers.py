"""Which headers cross manaproxy, each way, like a reverse proxy's.

Rule of this module: pure, and the one place that decides.
- Client → upstream (a deny-list: clients send headers of their own): the client's end-to-end headers
  (`OpenAI-Beta`, `Idempotency-Key`, `X-Stainless-*`, `User-Agent`, custom `X-…`) go on, subject to the
  provider's `forward_headers` (all, none, or a list). Never: the client's credentials (`Authorization`,
  `X-API-Key`, `Api-Key`, `Cookie`, `Cookie2` — the provider's key replaces them), hop-by-hop headers, what
  manaproxy sets itself (`Host`, `Content-Length`, `Content-Type`, `Accept-Encoding`, `X-Request-ID`),
  forwarding headers a client could forge (`Forwarded`, `X-Forwarded-*`, `Via`), method overrides an
  upstream may honour (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`: our POST must not
  become a DELETE carrying our key), `Max-Forwards`, ours (`X-Mana-LLM-*`). Names are compared with `_` read
  as `-` (`X_Api_Key` is `X-Api-Key`: many servers read them as one). `OpenAI-Organization` and
  `OpenAI-Project` name an OpenAI account: they go only to a provider whose `forward_headers` list names
  them. The provider's configured `headers` win over the client's.
- Upstream → client (an allow-list: nothing an upstream says about itself — `Set-Cookie`, `Location`,
  `Strict-Transport-Security`, `Alt-Svc`, CSP … — belongs on our answers): `RELAYED` and the `RELAYED_PREFIXES`
  families (`x-ratelimit-*`, `openai-*` but the account's `openai-organization`/`openai-project` …), its
  `x-request-id` as `X-Upstream-Request-ID`, and `Vary`; never a hop-by-hop header. (A relayed stream keeps its
  `Content-Type` with its parameters, `; charset=utf-8`: the provider adds it, `providers/openai.py`.) Every value relayed is redacted by the provider (`redact.Redactor.pairs`).
  Ours (`Content-Type` of other answers, `X-Request-ID`, `X-Mana-LLM-*`, CORS) win; CORS adds `Vary: Origin`.
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
        "api-key",
        "cookie",
        "cookie2",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "expect",
        "x-request-id",
        "forwarded",
        "via",
        "x-real-ip",
        "max-forwards",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "origin",  # CORS is between the browser and manaproxy
        "access-control-request-method",
        "access-control-request-headers",
    }
)
# Forwarded only to a provider whose `forward_headers` list names them.
ACCOUNT_HEADERS = frozenset({"openai-organization", "openai-project"})
# Upstream → client: these names (lower case), and names in these families; nothing else.
RELAYED = frozenset(
    {
        "retry-after",
        "retry-after-ms",  # Azure OpenAI's; the SDKs prefer it to Retry-After
        "ratelimit",  # the IETF RateLimit fields
        "ratelimit-policy",
        "request-id",  # Anthropic's id
        "content-disposition",  # a file answer's name (audio, files)
        "content-language",
        "vary",
    }
)
RELAYED_PREFIXES = ("x-ratelimit-", "ratelimit-", "openai-", "anthropic-ratelimit-")
UPSTREAM_REQUEST_ID = "X-Upstream-Request-ID"


def _connection_tokens(connection: str) -> set[str]:
    """Header names a `Connection` header's value declares hop-by-hop."""
    return {token.strip().lower() for token in connection.split(",") if token.strip()}


def _ours(name: str) -> bool:
    return name.startswith(("x-mana-llm-", "x-forwarded-"))


def _relayed(name: str) -> bool:
    """Whether the upstream's response header `name` (lower case) is one the client gets."""
    if name in RELAYED:
        return True
    return name.startswith(RELAYED_PREFIXES) and name not in ACCOUNT_HEADERS


def to_upstream(client: Mapping[str, str], forward: bool | frozenset[str]) -> dict[str, str]:
    """The client's headers that go to the upstream, under `forward_headers` (True, False or lower-case names)."""
    if forward is False:
        return {}
    dropped = {token.replace("_", "-") for token in _connection_tokens(client.get("Connection", ""))}
    out: dict[str, str] = {}
    for name, value in client.items():
        lower = name.lower().replace("_", "-")
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

        elif _relayed(lower) and lower not in dropped:
            out.append((name, value))
    return out
