"""Named clients: who a key belongs to, and which models that client may name.

Rule of this module: a client key is compared in constant time and never leaves it — not in an error, a
repr, a log line or a metric. The table holds each key's SHA-256 (what a lookup hashes to) beside the key, and
a presented key is found by its digest, then compared with `hmac.compare_digest`: what a request's timing
could reveal is whether the digest of what it sent is known, nothing about any key's bytes.

Clients come from two places, combined into one `ClientTable` per config (a reload builds a new one):
`MANAPROXY_API_KEYS` (`name:key` pairs, or bare keys named by position, `key-1` ...; read once, at start) and
the `clients:` section of `aliases.yaml`. A name or a key in both places is a `ConfigError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

from .config import ANONYMOUS, CLIENT_NAME_RE, ClientSpec, ConfigError

ENV_VAR = "MANAPROXY_API_KEYS"


def parse_env_clients(value: str | Iterable[str] | None) -> tuple[ClientSpec, ...]:
    """Clients from `MANAPROXY_API_KEYS`: comma-separated `name:key` pairs or bare keys (blanks ignored).

    An entry is a pair when what comes before its first `:` is a valid client name; otherwise the whole entry is
    a bare key, named `key-<n>` by its position among the entries (1-based). Raises `ConfigError` naming the
    entry by position (never its key) for a duplicate name or key.
    """
    if value is None:
        return ()
    entries = value.split(",") if isinstance(value, str) else list(value)
    clients: list[ClientSpec] = []
    names: set[str] = set()
    keys: set[str] = set()
    for position, entry in enumerate((entry.strip() for entry in entries if entry.strip()), start=1):
        where = f"{ENV_VAR}[{position}]"
        name, sep, key = entry.partition(":")
        if not sep or not CLIENT_NAME_RE.match(name) or not key.strip():
            name, key = f"key-{position}", entry
        key = key.strip()
        if name == ANONYMOUS:
            raise ConfigError(f"{where}: no client may be named {ANONYMOUS!r}")
        if name in names:
            raise ConfigError(f"{where}: client {name!r} is named twice")
        if key in keys:
            raise ConfigError(f"{where}: the same key is given twice")
        names.add(name)
        keys.add(key)
        clients.append(ClientSpec(name, (key,), where=where))
    return tuple(clients)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ClientTable:
    """Every client of one config, found by a key it presents. Empty: authentication is off."""

    __slots__ = ("_by_digest", "clients")

    def __init__(self, env: Iterable[ClientSpec] = (), configured: Mapping[str, ClientSpec] | None = None) -> None:
        """Combine the clients of `MANAPROXY_API_KEYS` (`env`) and of `aliases.yaml` (`configured`); a name or a
        key declared in both is a `ConfigError` naming the places."""
        clients: dict[str, ClientSpec] = {}
        by_digest: dict[bytes, tuple[bytes, ClientSpec]] = {}
        for client in (*env, *(configured or {}).values()):
            if client.name in clients:
                raise ConfigError(
                    f"{client.where}: client {client.name!r} is also declared at {clients[client.name].where}"
                )
            clients[client.name] = client
            for key in client.keys:
                raw = key.encode("utf-8", "surrogateescape")
                digest = _digest(raw)
                if digest in by_digest:
                    raise ConfigError(
                        f"{client.where}: a key of client {client.name!r} is also {by_digest[digest][1].where}'s"
                    )
                by_digest[digest] = (raw, client)
        self.clients: Mapping[str, ClientSpec] = clients
        self._by_digest = by_digest

    def __repr__(self) -> str:
        return f"<ClientTable {sorted(self.clients)}>"  # names only

    @property
    def enabled(self) -> bool:
        """Whether any client is declared (even one whose key expanded to nothing): then every request needs a key."""
        return bool(self.clients)

    def identify(self, presented: Iterable[bytes]) -> ClientSpec | None:
        """The client the first valid key among `presented` belongs to, or None. Every presented key is looked
        up, and the one found compared in constant time."""
        found: ClientSpec | None = None
        for offered in presented:
            entry = self._by_digest.get(_digest(offered))
            if entry is not None and hmac.compare_digest(entry[0], offered) and found is None:
                found = entry[1]
        return found


def model_allowed(client: ClientSpec, names: Iterable[str]) -> bool:
    """Whether `client` may name a model that goes by `names` (what the request gave, and its resolved form:
    the alias, or `provider/model` for a bare `gemma3:4b`). No allow-list: any model."""
    if not client.models:
        return True
    return any(fnmatchcase(name, pattern) for name in names for pattern in client.models)
