"""Breaker news: what one process tells the others it saw first-hand, and the message that carries it.

Rule of this module: pure (no I/O, no clock), and what a message may hold is decided here. News is a provider
(`model` None) or a target (provider + model, for requests of `kind`) that went down (its breaker opened, out
for `seconds`), came back (its breaker closed: a probe or a request succeeded) or is rate-limited (for
`seconds`). A message names the provider, the model and the kind, a digest of the provider's upstream (its
kind and base URL: news is applied only where the same name means the same upstream) and the sending
instance; never a key, a URL, a client's text or an upstream's error message. What a receiver does with it is
`HealthTracker.apply_news`'s business; sending and receiving is `manaproxy.sharedhealth`'s.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final, Literal

import orjson

from ..config import ProviderConfig
from ..kinds import CHAT

DOWN: Final = "down"
UP: Final = "up"
RATE_LIMITED: Final = "rate_limited"
Event = Literal["down", "up", "rate_limited"]
EVENTS: Final = (DOWN, UP, RATE_LIMITED)

VERSION = 1
MAX_MESSAGE_BYTES = 2048  # a message larger than this is not news of ours
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # provider names, as the config allows them
_KIND_RE = re.compile(r"^[a-z]{1,16}(\+[a-z]{1,16}){0,3}$")  # `kinds.request_kind` words
_ORIGIN_RE = re.compile(r"^[0-9a-f]{8,32}$")
MAX_MODEL_CHARS = 256


@dataclass(frozen=True, slots=True)
class News:
    """One first-hand observation of a breaker (see the module's rule)."""

    event: Event
    provider: str
    model: str | None = None  # None: the provider as a whole
    kind: str = CHAT
    seconds: float = 0.0  # down, rate_limited: how long the sender keeps it out

    @property
    def key(self) -> tuple[str, str | None, str]:
        """Which breaker the news is about."""
        return (self.provider, self.model, self.kind)


@dataclass(frozen=True, slots=True)
class Message:
    """News as it travels: from the instance `origin`, about the upstream whose digest is `upstream`."""

    news: News
    origin: str
    upstream: str


def upstream_digest(provider: ProviderConfig) -> str:
    """A short digest of what makes a provider the same upstream everywhere (its kind and base URL; never its
    key): two instances whose `a` points at different servers do not act on each other's news of `a`."""
    return hashlib.sha256(f"{provider.kind}\0{provider.base_url}".encode()).hexdigest()[:16]


def encode(message: Message) -> bytes:
    news = message.news
    return orjson.dumps(
        {
            "v": VERSION,
            "from": message.origin,
            "upstream": message.upstream,
            "event": news.event,
            "provider": news.provider,
            "model": news.model,
            "kind": news.kind,
            "seconds": round(news.seconds, 3),
        }
    )


def decode(data: bytes) -> Message | None:
    """The message in `data`, or None when it is not one of ours of this version, or holds anything out of bounds
    (a Redis shared with other software, or an instance of another version, is ignored, never trusted)."""
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        return None
    event, provider, model, kind = raw.get("event"), raw.get("provider"), raw.get("model"), raw.get("kind")
    origin, upstream, seconds = raw.get("from"), raw.get("upstream"), raw.get("seconds")
    if event not in EVENTS or not isinstance(provider, str) or not _NAME_RE.match(provider):
        return None
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS):
        return None
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        return None
    if not isinstance(origin, str) or not _ORIGIN_RE.match(origin) or not isinstance(upstream, str):
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < 1e7:
        return None
    return Message(News(event, provider, model, kind, float(seconds)), origin, upstream)
