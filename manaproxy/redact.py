"""Redaction: our secrets taken out of whatever an upstream says before we relay, log or show it.

Rule of this module: it is the one redaction of the code base. An upstream may echo the key it was
sent (in a 400 body, an error event, an exception message); every such text goes through the
application's one `Redactor` before it reaches a client, a log line or `/v1/health`. The redactor
knows every provider key and every secret-looking configured header value, and keeps knowing the old
ones after a reload (requests still running on the old config may echo them). Key shapes of common
providers and bearer tokens are redacted too, configured or not.
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


def secrets_of(provider: ProviderConfig) -> set[str]:
    """The provider's key and its secret-looking header values."""
    found = {provider.api_key} if provider.api_key else set()
    found.update(
        value for header, value in provider.headers.items() if any(w in header.lower() for w in _SECRET_HEADER_WORDS)
    )
    return {secret for secret in found if len(secret) >= MIN_SECRET_LENGTH}


class Redactor:
    """Replaces every known secret (and anything shaped like a key) with `[redacted]`."""

    __slots__ = ("_needles", "_secrets")

    def __init__(self, providers: Iterable[ProviderConfig] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self._needles: tuple[bytes, ...] = ()
        self.learn(providers)

    def __repr__(self) -> str:
        return f"<Redactor {len(self._secrets)} secrets>"  # never the secrets themselves

    def learn(self, providers: Iterable[ProviderConfig]) -> None:
        """Add the secrets of `providers`; those already known stay known."""
        secrets = set(self._secrets)
        for provider in providers:
            secrets |= secrets_of(provider)
        # Longest first, so a key that contains another is never left half-redacted.
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))
        needles = {secret.encode() for secret in self._secrets}
        # In a JSON body a key may appear escaped (`"` and `\` always, `/` as `\/` by some encoders).
        for secret in self._secrets:
            escaped = orjson.dumps(secret)[1:-1]
            needles |= {escaped, escaped.replace(b"/", b"\\/")}
        self._needles = tuple(sorted(needles, key=len, reverse=True))

    def text(self, text: str) -> str:
        """`text` without any secret."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _KEY_RE.sub(REDACTED, text)

    def bytes(self, data: bytes) -> bytes:
        """`data` (e.g. an upstream's error body) without any secret; JSON stays valid JSON."""
        for needle in self._needles:
            if needle in data:
                data = data.replace(needle, REDACTED.encode())
        return _KEY_RE_BYTES.sub(REDACTED.encode(), data)

    def line(self, text: str, limit: int = 200) -> str:
        """One short line of `text` without any secret: whitespace collapsed, cut at `limit` characters."""
        text = self.text(" ".join(text.split()))
        return text if len(text) <= limit else text[: limit - 3] + "..."
