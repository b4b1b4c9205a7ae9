"""Redaction: our secrets taken out of whatever an upstream says before we relay, log or show it.

Rule of this module: it is the one redaction of the code base. An upstream may echo the key it was
sent (in a 400 body, an error event, an exception message); every such text goes through the
application's one `Redactor` before it reaches a client, a log line or `/v1/health`. The redactor
knows every provider key and every secret-looking configured header value, and keeps knowing the old
ones after a reload (requests still running on the old config may echo them). Key shapes of common
providers and bearer tokens are redacted too, configured or not.

A value shorter than `MIN_SECRET_LENGTH` is not redacted standing alone (it would mangle ordinary words),
but the exact credential strings we send always are, whatever their length: `Bearer <key>` (the scheme in
any case) and `<secret header>: <value>` (also as a JSON member or `name=value`). `too_short` names the
keys this leaves unredacted standing alone, for the warnings of `serve` and `check`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson

from .config import ProviderConfig

REDACTED = "[redacted]"
# A configured value shorter than this is no real key; redacting it would mangle ordinary words.
MIN_SECRET_LENGTH = 8
# Header names whose configured values are secrets (`X-Api-Key`, `Authorization`, `X-Auth-Token` ...).
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret")
# OpenAI/OpenRouter/Anthropic `sk-`, Groq `gsk_`, Google `AIza`, xAI `xai-`, and bearer tokens.
_KEY_SHAPE = r"\b(?:sk-|gsk_|AIza|xai-)[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"
_KEY_RE = re.compile(_KEY_SHAPE)
_KEY_RE_BYTES = re.compile(_KEY_SHAPE.encode())


# What precedes our key in a header we send or an upstream's echo of one: `Bearer`, and the api-key headers.
_KEY_PREFIXES = (r"(?i:bearer)\s+", r"(?i:(?:x-goog-)?api[-_]?key)[\"']?\s*[:=]\s*[\"']?")


def _secret_headers(provider: ProviderConfig) -> list[tuple[str, str]]:
    return [
        (header, value)
        for header, value in provider.headers.items()
        if value and any(w in header.lower() for w in _SECRET_HEADER_WORDS)
    ]


def secrets_of(provider: ProviderConfig) -> set[str]:
    """The provider's key and its secret-looking header values, long enough to redact standing alone."""
    found = {provider.api_key} if provider.api_key else set()
    found.update(value for _, value in _secret_headers(provider))
    return {secret for secret in found if len(secret) >= MIN_SECRET_LENGTH}


def credentials_of(provider: ProviderConfig) -> set[tuple[str, str]]:
    """(prefix pattern, value): the credential strings we send, redacted whatever the value's length."""
    found = {(prefix, provider.api_key) for prefix in _KEY_PREFIXES} if provider.api_key else set()
    for header, value in _secret_headers(provider):
        found.add((f"(?i:{re.escape(header)})[\"']?\\s*[:=]\\s*[\"']?", value))
        scheme, _, token = value.partition(" ")
        if token.strip():  # `Basic x`, `Token x`: the scheme may be echoed on its own line too
            found.add((f"(?i:{re.escape(scheme)})\\s+", token.strip()))
    return found


def too_short(providers: Iterable[ProviderConfig]) -> list[str]:
    """Where a configured key is too short to be redacted standing alone (never the key itself)."""
    places = []
    for provider in providers:
        named = [("api_key", provider.api_key)] if provider.api_key else []
        named += [(f"headers.{header}", value) for header, value in _secret_headers(provider)]
        places += [
            f"providers.{provider.name}.{place} is shorter than {MIN_SECRET_LENGTH} characters: an upstream that "
            "echoes it on its own gets it shown unredacted (only the credential strings we send are redacted)"
            for place, value in named
            if len(value) < MIN_SECRET_LENGTH
        ]
    return places


class Redactor:
    """Replaces every known secret (and anything shaped like a key) with `[redacted]`."""

    __slots__ = ("_credentials", "_needles", "_secrets", "_short_bytes", "_short_text")

    def __init__(self, providers: Iterable[ProviderConfig] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self._needles: tuple[bytes, ...] = ()
        self._credentials: frozenset[tuple[str, str]] = frozenset()
        self._short_text: tuple[re.Pattern[str], ...] = ()
        self._short_bytes: tuple[re.Pattern[bytes], ...] = ()
        self.learn(providers)

    def __repr__(self) -> str:
        return f"<Redactor {len(self._secrets)} secrets>"  # never the secrets themselves

    def learn(self, providers: Iterable[ProviderConfig]) -> None:
        """Add the secrets of `providers`; those already known stay known."""
        providers = list(providers)
        secrets = set(self._secrets)
        credentials = set(self._credentials)
        for provider in providers:
            secrets |= secrets_of(provider)
            credentials |= credentials_of(provider)
        # Longest first, so a key that contains another is never left half-redacted.
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))
        needles = {secret.encode() for secret in self._secrets}
        # In a JSON body a key may appear escaped (`"` and `\` always, `/` as `\/` by some encoders).
        for secret in self._secrets:
            escaped = orjson.dumps(secret)[1:-1]
            needles |= {escaped, escaped.replace(b"/", b"\\/")}
        self._needles = tuple(sorted(needles, key=len, reverse=True))
        # A short value is redacted only where it follows what we send before it (`Bearer `, `X-Api-Key: `);
        # a long one is a needle of its own already.
        self._credentials = frozenset(credentials)
        short = sorted((c for c in credentials if len(c[1]) < MIN_SECRET_LENGTH), key=lambda c: -len(c[1]))
        self._short_text = tuple(re.compile(f"({prefix})(?:{_forms(value)})") for prefix, value in short)
        self._short_bytes = tuple(re.compile(f"({prefix})(?:{_forms(value)})".encode()) for prefix, value in short)

    def text(self, text: str) -> str:
        """`text` without any secret."""
        for pattern in self._short_text:
            text = pattern.sub(rf"\g<1>{REDACTED}", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _KEY_RE.sub(REDACTED, text)

    def bytes(self, data: bytes) -> bytes:
        """`data` (e.g. an upstream's error body) without any secret; JSON stays valid JSON."""
        for pattern in self._short_bytes:
            data = pattern.sub(rf"\g<1>{REDACTED}".encode(), data)
        for needle in self._needles:
            if needle in data:
                data = data.replace(needle, REDACTED.encode())
        return _KEY_RE_BYTES.sub(REDACTED.encode(), data)

    def line(self, text: str, limit: int = 200) -> str:
        """One short line of `text` without any secret: whitespace collapsed, cut at `limit` characters."""
        text = self.text(" ".join(text.split()))
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def pairs(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Response headers (name, value) with every value redacted, as bodies are."""
        return [(name, self.text(value)) for name, value in headers]


def _forms(value: str) -> str:
    """`value` as a pattern, as written and as escaped in JSON (`\\/` for `/` too)."""
    escaped = orjson.dumps(value)[1:-1].decode()
    forms = {value, escaped, escaped.replace("/", "\\/")}
    return "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
