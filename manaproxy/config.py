"""Configuration: `aliases.yaml` + environment → frozen dataclasses.

Rule of this module: nothing past it touches raw YAML or reads the environment itself (it is handed a
mapping). `load_config` either returns a complete, validated `Config` or raises `ConfigError` whose message
names the offending place (`aliases.mana/fast-text.chain[1]`, `providers.groq.timeouts.idle` ...). A `Config`
is immutable; a reload builds a new one and swaps a single reference (see `gateway.Gateway.apply`).

The built-in providers (`BUILTIN_PROVIDERS`: mana-llm's, from its environment variables) are built here too,
at each load, so a reload sees the environment as it is then.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

ALIAS_PREFIX = "mana/"

# The provider kinds: kind → "module:Class" of the class that serves it, relative to `manaproxy.providers`
# (which imports it only when a provider of that kind is built). Validation reads it, so an unknown kind is
# an error in `aliases.yaml`, never a silent default. Tests may register kinds of their own.
KINDS: dict[str, str] = {
    "openai": ".openai:OpenAIProvider",
    "google": ".google:GoogleProvider",
}
_PROVIDER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# The providers that exist without being declared, as mana-llm built them from its environment: name → the
# variables each is built from. The first one makes it present on its own (set and not empty); otherwise a
# built-in provider is present when a chain names it. A `providers:` entry of the same name replaces it
# wholly. Present only when used or asked for, so a config that names none stays exactly as declared (no
# probes to a local Ollama nobody runs).
BUILTIN_PROVIDERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "ollama": ("OLLAMA_URL", "OLLAMA_TIMEOUT"),
        "openrouter": ("OPENROUTER_API_KEY", "OPENROUTER_BASE_URL", "OPENROUTER_REFERER"),
        "groq": ("GROQ_API_KEY", "GROQ_BASE_URL"),
        "together": ("TOGETHER_API_KEY", "TOGETHER_BASE_URL"),
        "google": ("GOOGLE_API_KEY",),
    }
)
OLLAMA_DEFAULT_URL = "http://localhost:11434"
OLLAMA_DEFAULT_TIMEOUT = 120.0  # seconds, mana-llm's OLLAMA_TIMEOUT default


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending place."""


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete chain entry: a provider name and the model name that provider knows."""

    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"

    @classmethod
    def parse(cls, text: str) -> Target:
        """Split `provider/model`; the model part may itself contain `/`."""
        provider, sep, model = text.partition("/")
        if not sep or not provider or not model:
            raise ValueError(f"{text!r} is not of the form provider/model")
        return cls(provider, model)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-provider timeouts in seconds."""

    connect: float = 5.0
    first_byte: float = 30.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class AutoConcurrency:
    """`max_concurrent: auto`: the bounds of the limit learned per target (`health/capacity.py`)."""

    min_concurrent: int = 1
    max_concurrent_limit: int = 64


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str
    # None: the provider needs no key (local Ollama). "": a key is declared but empty → unconfigured.
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    timeouts: Timeouts = Timeouts()
    max_concurrent: int = 0  # 0: no limit (and with `auto_concurrency`, none fixed)
    probe: str | None = None
    # Client headers sent on: True (all end-to-end ones), False (none), or these names (lower case).
    forward_headers: bool | frozenset[str] = True
    builtin: bool = False  # built from the environment (BUILTIN_PROVIDERS), not declared under `providers:`
    # `inject`: ask an openai-kind upstream for usage on streams the client did not ask it for (see
    # `streamusage.py`); `passthrough`: send streamed requests as they came.
    stream_usage: str = "inject"
    auto_concurrency: AutoConcurrency | None = None  # `max_concurrent: auto`: each target's limit is learned

    @property
    def configured(self) -> bool:
        """False when the provider declares an `api_key` that expanded to nothing."""
        return self.api_key != ""


@dataclass(frozen=True, slots=True)
class Member:
    """One target of a chain step, with its share of the step's traffic, and (a pool member written as a
    mapping) a limit of its own on the requests in flight to that target: fixed, or learned (`auto`)."""

    target: Target
    weight: float = 1.0
    max_concurrent: int = 0  # 0: none of its own (its provider's applies)
    auto_concurrency: AutoConcurrency | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a chain: a single target, or a pool of equivalent ones that share its load."""

    members: tuple[Member, ...]
    pool: bool = False  # written as a list in the config (even of one member)

    @classmethod
    def single(cls, target: Target) -> Step:
        return cls((Member(target),))


@dataclass(frozen=True, slots=True)
class Hedge:
    """When a late attempt gets a second one started beside it (see routing's hedging rules)."""

    after: float | None  # seconds; None: `auto`, from the first target's recent time to first byte
    max_extra: int = 1  # `hedge_max`: extra attempts running at once
    min_delay: float = 0.05  # `hedge_min`: bounds of the `auto` delay
    max_delay: float = 10.0  # `hedge_max_delay`
    budget_percent: float = 10.0  # `hedge_budget_percent`: extra attempts, as % of the alias's requests

    @property
    def auto(self) -> bool:
        return self.after is None

    def delay(self, p95: float | None) -> float | None:
        """Seconds before a late attempt gets company: `after`, or for `auto` the first target's recent p95
        time to first byte (`p95`, None while too few answers were seen: no hedging yet) within bounds."""
        if self.after is not None:
            return self.after
        return None if p95 is None else min(max(p95, self.min_delay), self.max_delay)


_HEDGE_EXTRAS = ("hedge_max", "hedge_min", "hedge_max_delay", "hedge_budget_percent")


def targets_of(steps: tuple[Step, ...]) -> tuple[Target, ...]:
    """Every target of a chain's steps, in chain order (pool members in their order)."""
    return tuple(member.target for step in steps for member in step.members)


def lone(steps: tuple[Step, ...]) -> bool:
    """The chain is one target: nothing to fall back to, so an open breaker lets its request be the trial
    (`health/breaker.py`)."""
    return len(steps) == 1 and len(steps[0].members) == 1


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    description: str
    steps: tuple[Step, ...]
    hedge: Hedge | None = None
    cache_ttl: float | None = None  # `cache: true | {ttl_seconds: N}`: seconds its answers are kept; None: not cached

    @property
    def chain(self) -> tuple[Target, ...]:
        """Every target of the alias, in chain order (pool members in their order)."""
        return targets_of(self.steps)

    @property
    def plain(self) -> bool:
        """No pools and no hedging: the alias is a chain as before pools existed."""
        return self.hedge is None and not any(step.pool for step in self.steps)


@dataclass(frozen=True, slots=True)
class HealthSettings:
    failure_threshold: int = 2
    backoff_seconds: float = 60.0
    probe_interval_seconds: float = 30.0
    probe_timeout_seconds: float = 3.0
    credential_check_seconds: float = 5.0  # a request's 401/403 probes the provider at most this often
    max_retry_after_seconds: float = 5.0  # the most a `Retry-After` manaproxy writes ever says
    shared: bool = False  # breaker news to and from other processes and hosts through `redis.url` (sharedhealth.py)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    max_body_bytes: int = 32 * 1024 * 1024  # one request body, decoded
    max_inflight_body_bytes: int = 256 * 1024 * 1024  # all request bodies held at once
    max_inflight_body_bytes_per_client: int = 64 * 1024 * 1024  # ... and by one client (key, or address)
    max_response_bytes: int = 64 * 1024 * 1024  # one unstreamed upstream answer, decoded
    max_event_bytes: int = 8 * 1024 * 1024  # one SSE event of a streamed answer, decoded
    max_json_depth: int = 128  # nesting of a JSON request body (arrays and objects)
    max_json_items: int = 1_000_000  # values and members of a JSON request body, all levels
    max_form_parts: int = 1000  # parts of a multipart/form-data request body
    shutdown_timeout_seconds: float = 30.0
    models_cache_seconds: float = 60.0
    header_timeout_seconds: float = 10.0  # a request's headers must arrive within this
    body_timeout_seconds: float = 60.0  # ... and its whole body within this
    keepalive_timeout_seconds: float = 75.0  # an idle client connection is closed after this
    listen_backlog: int = 1024  # connections the kernel queues until accepted (capped by net.core.somaxconn)
    write_timeout_seconds: float = 60.0  # a client that reads none of its answer for this long is closed
    max_held_answer_bytes: int = 256 * 1024 * 1024  # answer bytes waiting for clients that do not read
    # Client connections open at once; None: from the open-files limit (server.default_max_connections).
    max_connections: int | None = None
    status_page: bool = True  # `GET /status` and its live stream `GET /v1/events`
    max_event_clients: int = 16  # `GET /v1/events` streams open at once
    # Worker processes sharing the port (supervisor.py): a count, or "auto" for one per usable CPU.
    workers: int | Literal["auto"] = 1


STREAM_USAGE_MODES = ("inject", "passthrough")
# A client's name is a metric label and a log value: short, lower case, no separators of ours.
CLIENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ANONYMOUS = "anonymous"  # who a request is when auth is off: no client may be called that
LIMIT_BACKENDS = ("memory", "redis")
LIMIT_ERROR_POLICIES = ("open", "closed")


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One named client: its keys (never shown), the models it may name, its limits (None: no limit)."""

    name: str
    keys: tuple[str, ...] = field(default=(), repr=False)
    models: tuple[str, ...] = ()  # allow-list of aliases, provider/model names or globs; empty: any model
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    where: str = ""  # where it is declared (`clients.<name>`, `MANAPROXY_API_KEYS[2]`), for errors

    @property
    def limited(self) -> bool:
        return (self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day) != (None, None, None)


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """`limits:`: where the per-client limit windows are kept, and what a backend failure means."""

    backend: str = "memory"  # memory: per process | redis: shared by every process using `redis.url`
    on_backend_error: str = "open"  # open: let the request in (a WARNING and a metric); closed: refuse it


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The one Redis connection (`redis:`); no `url`: none, each process keeps its own state in memory."""

    url: str = field(default="", repr=False)  # may hold a password: `redacted_url` for anything shown
    timeout_seconds: float = 0.05  # every command; past it the feature degrades and the request goes on

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """`url` with any password (and user name) replaced by `***`: what a log line or an error may show."""
    try:
        parts = urlsplit(url)
        if parts.password is None and parts.username is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<unparseable url>"


CACHE_BACKENDS = ("memory", "redis")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Where cached answers live (`cache:`); which requests cache is the aliases' (`Alias.cache_ttl`)."""

    backend: str = "memory"  # memory | redis
    ttl_seconds: float = 3600.0  # default for aliases that cache
    max_bytes: int = 256 * 1024 * 1024  # memory backend: LRU bound on stored bytes
    max_entry_bytes: int = 4 * 1024 * 1024  # answers larger than this are not stored
    direct: bool = False  # `provider/model` requests cache too (with `ttl_seconds`)


# A bound on `server.workers`, against a typo that would start thousands of processes.
MAX_WORKERS = 256

# Server settings aiohttp takes once, when it starts listening: a reload cannot change them.
RESTART_ONLY_SETTINGS = (
    "header_timeout_seconds",
    "keepalive_timeout_seconds",
    "listen_backlog",
    "max_connections",
    "workers",
)


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    aliases: Mapping[str, Alias]
    default: str | None = None
    health: HealthSettings = HealthSettings()
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    cache: CacheSettings = CacheSettings()
    source: str = "<memory>"
    clients: Mapping[str, ClientSpec] = field(default_factory=lambda: MappingProxyType({}))
    limits: LimitSettings = LimitSettings()
    loaded_unix: int = field(default_factory=lambda: int(time.time()))  # `created` of what has no date of its own

    def summary(self) -> str:
        configured = sum(1 for p in self.providers.values() if p.configured)
        return (
            f"{self.source}: {len(self.providers)} providers ({configured} configured), "
            f"{len(self.aliases)} aliases, default {self.default or '-'}"
        )


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset (or, with `:-`, empty) variable → default or ""."""

    def repl(match: re.Match[str]) -> str:
        value = env.get(match.group(1), "")
        if value == "" and match.group(2) is not None:
            return match.group(2)
        return value

    return _ENV_RE.sub(repl, text)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file. Raises `ConfigError` (never anything else)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    return parse_config(text, env=os.environ if env is None else env, source=source)


def parse_config(text: str, *, env: Mapping[str, str], source: str = "<memory>") -> Config:
    """Parse YAML text into a validated `Config`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
        raise ConfigError(f"{source}:{where} {problem}") from None
    except (RecursionError, ValueError):  # PyYAML on absurd nesting or a 4300+ digit integer
        raise ConfigError(f"{source}: document nested too deeply or holds a number too large") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'providers' and 'aliases'")
    return _Parser(env, source).config(raw)


class _Parser:
    def __init__(self, env: Mapping[str, str], source: str) -> None:
        self.env = env
        self.source = source
        self.default_ttl = CacheSettings().ttl_seconds  # `cache.ttl_seconds`, once `shared_state` has read it

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    # -- generic helpers -------------------------------------------------------------------
    def mapping(self, value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"key {key!r} is not a string")
            if allowed is not None and key not in allowed:
                raise self.fail(where, f"unknown key {key!r} (allowed: {', '.join(allowed)})")
        return value

    def string(self, value: Any, where: str, *, expand: bool = True) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(where, f"expected a string, got {type(value).__name__}")
        text = str(value)
        return expand_env(text, self.env) if expand else text

    def number(self, value: Any, where: str, *, minimum: float = 0.0, integer: bool = False) -> float:
        if isinstance(value, str):
            value = self.string(value, where).strip()
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise self.fail(where, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"expected a number, got {type(value).__name__}")
        try:
            as_float = float(value)
        except OverflowError:
            raise self.fail(where, "number too large") from None
        if not math.isfinite(as_float):
            raise self.fail(where, f"must be a finite number, got {value}")
        if integer and not as_float.is_integer():
            raise self.fail(where, f"expected a whole number, got {value}")
        if as_float < minimum:
            raise self.fail(where, f"must be >= {minimum:g}, got {value}")
        return value

    # -- sections -----------------------------------------------------------------------------
    def config(self, raw: dict[str, Any]) -> Config:
        top = self.mapping(
            raw,
            "top level",
            ("providers", "aliases", "default", "health", "server", "clients", "limits", "redis", "cache"),
        )
        providers_raw = self.mapping(top.get("providers"), "providers")
        declared = {name: self.provider(name, spec) for name, spec in providers_raw.items()}

        shared = self.shared_state(top)  # before the aliases: `cache: true` takes its ttl from it
        aliases_raw = self.mapping(top.get("aliases"), "aliases")
        known = declared.keys() | BUILTIN_PROVIDERS.keys()
        aliases = {name: self.alias(name, spec, known) for name, spec in aliases_raw.items()}
        named = {target.provider for alias in aliases.values() for target in alias.chain}
        providers = {**declared, **self.builtins(declared, named)}
        if not providers:
            raise self.fail(
                "providers",
                "none declared and no built-in one in use (name one in a chain, set OLLAMA_URL or a provider key)",
            )

        default = top.get("default")
        if default is not None:
            default = self.string(default, "default")
            if default not in aliases:
                raise self.fail("default", f"{default!r} is not a declared alias")

        return Config(
            providers=MappingProxyType(providers),
            aliases=MappingProxyType(aliases),
            default=default,
            health=self.health(top.get("health")),
            server=self.server(top.get("server")),
            **shared,
            source=self.source,
            clients=MappingProxyType(self.clients(top.get("clients"), providers, aliases)),
            limits=self.limits(top.get("limits"), shared["redis"]),
        )

    def builtins(self, declared: Mapping[str, ProviderConfig], named: set[str]) -> dict[str, ProviderConfig]:
        """The built-in providers in use: not declared, and named by a chain or asked for by their variable."""
        built = {}
        for name, variables in BUILTIN_PROVIDERS.items():
            if name in declared or (name not in named and not self.env.get(variables[0], "").strip()):
                continue
            where = f"built-in provider {name} (from {', '.join(variables)})"
            built[name] = self.provider(name, self.builtin_spec(name, where), where=where, builtin=True)
        return built

    def builtin_spec(self, name: str, where: str) -> dict[str, Any]:
        """What mana-llm built from its environment, as a `providers:` entry would say it (values expanded)."""
        env = self.env
        if name == "ollama":
            url = env.get("OLLAMA_URL", "").strip().rstrip("/") or OLLAMA_DEFAULT_URL
            raw_timeout = env.get("OLLAMA_TIMEOUT", "").strip()
            try:
                total = float(raw_timeout) if raw_timeout else OLLAMA_DEFAULT_TIMEOUT
            except ValueError:
                total = math.nan
            if not math.isfinite(total) or total <= 0:
                raise self.fail(where, "OLLAMA_TIMEOUT must be a number of seconds > 0")
            # mana-llm's httpx timeout bounded each read, a model's cold load included: the first byte gets the
            # whole of it too, so a loading model is waited for rather than skipped.
            timeouts = {"connect": min(5.0, total), "first_byte": total, "idle": min(60.0, total), "total": total}
            return {"base_url": url + "/v1", "timeouts": timeouts}
        if name == "google":
            return {"kind": "google", "api_key": env.get("GOOGLE_API_KEY", "")}
        defaults = {
            "openrouter": "https://openrouter.ai/api/v1",
            "groq": "https://api.groq.com/openai/v1",
            "together": "https://api.together.xyz/v1",
        }
        prefix = name.upper()
        spec: dict[str, Any] = {
            "base_url": env.get(f"{prefix}_BASE_URL", "").strip() or defaults[name],
            "api_key": env.get(f"{prefix}_API_KEY", ""),
        }
        if name == "openrouter":  # OpenRouter's optional app attribution
            referer = env.get("OPENROUTER_REFERER", "").strip() or "https://github.com/manaproxy/manaproxy"
            spec["headers"] = {"HTTP-Referer": referer, "X-Title": "manaproxy"}
        return spec

    def provider(self, name: str, spec: Any, *, where: str | None = None, builtin: bool = False) -> ProviderConfig:
        where = where or f"providers.{name}"
        if not _PROVIDER_NAME_RE.match(name) or name == ALIAS_PREFIX.rstrip("/"):
            raise self.fail(where, "provider names are letters, digits, '_', '.', '-' and not 'mana'")
        allowed = (
            "kind",
            "base_url",
            "api_key",
            "headers",
            "timeouts",
            "max_concurrent",
            "min_concurrent",
            "max_concurrent_limit",
            "probe",
            "forward_headers",
            "stream_usage",
        )
        spec = self.mapping(spec, where, allowed)
        expand = not builtin  # a built-in's values come from the environment already: never expanded twice
        kind = self.string(spec.get("kind", "openai"), f"{where}.kind")
        if kind not in KINDS:
            raise self.fail(f"{where}.kind", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")

        base_url = ""
        if "base_url" in spec:
            base_url = self.string(spec["base_url"], f"{where}.base_url", expand=expand).rstrip("/")
            try:
                parts = urlsplit(base_url)
                valid = parts.scheme in ("http", "https") and bool(parts.hostname)
                parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
            except ValueError:
                valid = False
            if not valid:
                raise self.fail(f"{where}.base_url", f"{base_url!r} is not an http(s) URL")
        elif kind == "openai":
            raise self.fail(where, "base_url is required for kind openai")

        api_key = None
        if "api_key" in spec:
            api_key = (
                ""
                if spec["api_key"] is None
                else self.string(spec["api_key"], f"{where}.api_key", expand=expand).strip()
            )

        headers_raw = self.mapping(spec.get("headers"), f"{where}.headers")
        headers = {k: self.string(v, f"{where}.headers.{k}", expand=expand) for k, v in headers_raw.items()}
        for header, value in headers.items():
            if not _HEADER_NAME_RE.match(header):
                raise self.fail(f"{where}.headers", f"{header!r} is not a valid HTTP header name")
            if any(c in value for c in "\r\n\0"):
                raise self.fail(f"{where}.headers.{header}", "header values cannot contain line breaks or NUL")

        timeouts_raw = self.mapping(
            spec.get("timeouts"), f"{where}.timeouts", ("connect", "first_byte", "idle", "total")
        )
        timeouts = Timeouts(
            **{k: float(self.number(v, f"{where}.timeouts.{k}", minimum=0.001)) for k, v in timeouts_raw.items()}
        )
        max_concurrent, auto_concurrency = self.concurrency(spec, where)
        forward_headers = self.forward_headers(spec.get("forward_headers", True), f"{where}.forward_headers")
        probe = None
        if spec.get("probe") is not None:
            probe = self.string(spec["probe"], f"{where}.probe")
            if not probe.startswith("/"):
                raise self.fail(f"{where}.probe", "must be a path starting with '/' (relative to base_url)")
        stream_usage = self.choice(spec.get("stream_usage", "inject"), f"{where}.stream_usage", STREAM_USAGE_MODES)
        if "stream_usage" in spec and kind != "openai":
            raise self.fail(f"{where}.stream_usage", "applies only to kind openai")
        return ProviderConfig(
            name=name,
            kind=kind,
            base_url=base_url,
            api_key=api_key,
            headers=MappingProxyType(headers),
            timeouts=timeouts,
            max_concurrent=max_concurrent,
            forward_headers=forward_headers,
            probe=probe,
            builtin=builtin,
            stream_usage=stream_usage,
            auto_concurrency=auto_concurrency,
        )

    def concurrency(self, spec: dict[str, Any], where: str) -> tuple[int, AutoConcurrency | None]:
        """`max_concurrent` (a number, or `auto` with its bounds `min_concurrent` and `max_concurrent_limit`)."""
        raw = spec.get("max_concurrent", 0)
        bounds = [key for key in ("min_concurrent", "max_concurrent_limit") if key in spec]
        if not (isinstance(raw, str) and raw.strip() == "auto"):
            if bounds:
                raise self.fail(f"{where}.{bounds[0]}", "applies only with max_concurrent: auto")
            return int(self.number(raw, f"{where}.max_concurrent", integer=True)), None
        low = int(self.number(spec.get("min_concurrent", 1), f"{where}.min_concurrent", minimum=1, integer=True))
        high = int(
            self.number(spec.get("max_concurrent_limit", 64), f"{where}.max_concurrent_limit", minimum=1, integer=True)
        )
        if high < low:
            raise self.fail(f"{where}.max_concurrent_limit", f"must be >= min_concurrent ({low})")
        return 0, AutoConcurrency(low, high)

    def forward_headers(self, value: Any, where: str) -> bool | frozenset[str]:
        if isinstance(value, bool):
            return value
        if not isinstance(value, list):
            raise self.fail(where, "expected true, false or a list of header names")
        names = [self.string(item, f"{where}[{index}]") for index, item in enumerate(value)]
        for index, header in enumerate(names):
            if not _HEADER_NAME_RE.match(header):
                raise self.fail(f"{where}[{index}]", f"{header!r} is not a valid HTTP header name")
        return frozenset(header.lower() for header in names)

    def alias(self, name: str, spec: Any, providers: AbstractSet[str]) -> Alias:
        where = f"aliases.{name}"
        if not name.startswith(ALIAS_PREFIX) or len(name) == len(ALIAS_PREFIX):
            raise self.fail(where, f"alias names must start with {ALIAS_PREFIX!r} and name a class")
        spec = self.mapping(spec, where, ("description", "chain", "hedge_after", "cache", *_HEDGE_EXTRAS))
        chain_raw = spec.get("chain")
        if not isinstance(chain_raw, list) or not chain_raw:
            raise self.fail(f"{where}.chain", "must be a non-empty list of provider/model entries")
        steps = []
        for index, entry in enumerate(chain_raw):
            entry_where = f"{where}.chain[{index}]"
            if isinstance(entry, list):
                steps.append(self.pool(entry, entry_where, providers))
            else:
                steps.append(Step.single(self.target(entry, entry_where, providers)))
        description = self.string(spec.get("description", ""), f"{where}.description", expand=False)
        return Alias(
            name=name,
            description=description,
            steps=tuple(steps),
            hedge=self.hedge(spec, where),
            cache_ttl=self.alias_cache(spec.get("cache"), f"{where}.cache"),
        )

    def target(self, entry: Any, where: str, providers: AbstractSet[str]) -> Target:
        text = self.string(entry, where)
        try:
            target = Target.parse(text)
        except ValueError as exc:
            raise self.fail(where, str(exc)) from None
        if target.provider not in providers:
            builtin = ", ".join(BUILTIN_PROVIDERS)
            raise self.fail(where, f"{text!r} names undeclared provider {target.provider!r} (built in: {builtin})")
        return target

    def pool(self, entries: list[Any], where: str, providers: AbstractSet[str]) -> Step:
        if not entries:
            raise self.fail(where, "a pool needs at least one member")
        members = []
        for index, entry in enumerate(entries):
            member_where = f"{where}[{index}]"
            if isinstance(entry, list):
                raise self.fail(member_where, "pools cannot be nested")
            if isinstance(entry, dict):
                keys = ("target", "weight", "max_concurrent", "min_concurrent", "max_concurrent_limit")
                spec = self.mapping(entry, member_where, keys)
                if "target" not in spec:
                    raise self.fail(member_where, "a pool member needs a target")
                target = self.target(spec["target"], f"{member_where}.target", providers)
                weight = float(self.number(spec.get("weight", 1), f"{member_where}.weight"))
                if weight <= 0:
                    raise self.fail(f"{member_where}.weight", f"must be > 0, got {spec.get('weight')}")
                max_concurrent, auto_concurrency = self.concurrency(spec, member_where)
                members.append(Member(target, weight, max_concurrent, auto_concurrency))
            else:
                members.append(Member(self.target(entry, member_where, providers)))
        return Step(tuple(members), pool=True)

    def hedge(self, spec: dict[str, Any], where: str) -> Hedge | None:
        raw = spec.get("hedge_after")
        extras = [key for key in _HEDGE_EXTRAS if key in spec]
        if raw is None:
            if extras:
                raise self.fail(f"{where}.{extras[0]}", "applies only with hedge_after")
            return None
        after: float | None = None
        if not (isinstance(raw, str) and raw.strip() == "auto"):
            after = float(self.number(raw, f"{where}.hedge_after"))
            if after <= 0:
                raise self.fail(f"{where}.hedge_after", f"must be > 0 seconds or 'auto', got {raw}")
        max_extra = int(self.number(spec.get("hedge_max", 1), f"{where}.hedge_max", minimum=1, integer=True))
        min_delay = float(self.number(spec.get("hedge_min", 0.05), f"{where}.hedge_min", minimum=0.001))
        max_delay = float(self.number(spec.get("hedge_max_delay", 10.0), f"{where}.hedge_max_delay", minimum=0.001))
        if max_delay < min_delay:
            raise self.fail(f"{where}.hedge_max_delay", f"must be >= hedge_min ({min_delay:g})")
        budget = float(self.number(spec.get("hedge_budget_percent", 10), f"{where}.hedge_budget_percent", minimum=0))
        if budget > 100 * max_extra:
            raise self.fail(
                f"{where}.hedge_budget_percent", f"must be <= 100 x hedge_max ({100 * max_extra}), got {budget:g}"
            )
        return Hedge(after, max_extra, min_delay, max_delay, budget)

    def health(self, raw: Any) -> HealthSettings:
        fields = tuple(HealthSettings.__dataclass_fields__)
        spec = self.mapping(raw, "health", fields)
        values: dict[str, Any] = {}
        for key, value in spec.items():
            if key == "shared":
                if not isinstance(value, bool):
                    raise self.fail("health.shared", f"expected true or false, got {value!r}"[:200])
                values[key] = value
            elif key == "failure_threshold":
                values[key] = int(self.number(value, f"health.{key}", minimum=1, integer=True))
            else:
                values[key] = float(self.number(value, f"health.{key}", minimum=0.001))
        return HealthSettings(**values)

    def server(self, raw: Any) -> ServerSettings:
        fields = tuple(ServerSettings.__dataclass_fields__)
        spec = self.mapping(raw, "server", fields)
        values: dict[str, Any] = {}
        for key, value in spec.items():
            if key == "workers":
                values[key] = self.workers(value)
            elif ServerSettings.__dataclass_fields__[key].type == "bool":
                if not isinstance(value, bool):
                    raise self.fail(f"server.{key}", f"expected true or false, got {value!r}"[:200])
                values[key] = value
            elif ServerSettings.__dataclass_fields__[key].type in ("int", "int | None"):  # sizes and counts
                values[key] = int(self.number(value, f"server.{key}", minimum=1, integer=True))
            elif key.endswith("_timeout_seconds"):
                values[key] = float(self.number(value, f"server.{key}", minimum=0.001))
            else:
                values[key] = float(self.number(value, f"server.{key}"))
        return ServerSettings(**values)

    # -- clients and their limits (issue 19) ------------------------------------------------------------
    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        text = self.string(value, where).strip()
        if text not in choices:
            raise self.fail(where, f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    def clients(
        self, raw: Any, providers: Mapping[str, ProviderConfig], aliases: Mapping[str, Alias]
    ) -> dict[str, ClientSpec]:
        clients: dict[str, ClientSpec] = {}
        seen: dict[str, str] = {}  # key -> the client holding it
        for name, spec in self.mapping(raw, "clients").items():
            client = self.client(name, spec, providers, aliases)
            for key in client.keys:
                if key in seen:  # never the key itself in the message
                    raise self.fail(f"clients.{name}", f"shares a key with client {seen[key]!r}")
                seen[key] = name
            clients[name] = client
        return clients

    def client(
        self, name: str, spec: Any, providers: Mapping[str, ProviderConfig], aliases: Mapping[str, Alias]
    ) -> ClientSpec:
        where = f"clients.{name}"
        if not CLIENT_NAME_RE.match(name) or name == ANONYMOUS:
            raise self.fail(where, "client names are [a-z0-9][a-z0-9._-]{0,62} and not 'anonymous'")
        limits = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")
        spec = self.mapping(spec, where, ("key", "keys", "models", *limits))
        if ("key" in spec) == ("keys" in spec):
            raise self.fail(where, "needs exactly one of 'key' or 'keys'")
        if "key" in spec:
            listed: list[Any] = [spec["key"]]
            places = [f"{where}.key"]
        else:
            if not isinstance(spec["keys"], list) or not spec["keys"]:
                raise self.fail(f"{where}.keys", "must be a non-empty list of keys")
            listed = spec["keys"]
            places = [f"{where}.keys[{index}]" for index in range(len(listed))]
        keys: list[str] = []
        for value, place in zip(listed, places, strict=True):
            # A key that expands to nothing (`${VAR}` unset) lets no one in; the rest of the client stands.
            key = "" if value is None else self.string(value, place).strip()
            if any(c in key for c in ", \t\r\n\0"):
                raise self.fail(place, "a key cannot contain commas, spaces or control characters")
            if key and key in keys:
                raise self.fail(place, "the same key is listed twice")
            if key:
                keys.append(key)
        models_raw = spec.get("models")
        models: list[str] = []
        if models_raw is not None:
            if not isinstance(models_raw, list):
                raise self.fail(f"{where}.models", "expected a list of aliases, provider/model names or globs")
            for index, entry in enumerate(models_raw):
                models.append(self.allowed_model(entry, f"{where}.models[{index}]", providers, aliases))
        values = {
            key: int(self.number(spec[key], f"{where}.{key}", minimum=1, integer=True)) for key in limits if key in spec
        }
        return ClientSpec(name, tuple(keys), tuple(models), where=where, **values)

    def allowed_model(
        self, entry: Any, where: str, providers: Mapping[str, ProviderConfig], aliases: Mapping[str, Alias]
    ) -> str:
        """One allow-list entry: a declared alias, a declared provider's `provider/model`, or a glob."""
        text = self.string(entry, where).strip()
        if not text:
            raise self.fail(where, "an empty model name")
        if any(c in text for c in "*?["):
            return text  # a glob: matched against the name a request gives (see clients.model_allowed)
        if text.startswith(ALIAS_PREFIX):
            if text not in aliases:
                raise self.fail(where, f"{text!r} is not a declared alias")
            return text
        provider = text.partition("/")[0] if "/" in text else "ollama"
        if provider not in providers:
            raise self.fail(where, f"{text!r} names undeclared provider {provider!r}")
        return text

    def limits(self, raw: Any, redis: RedisSettings) -> LimitSettings:
        spec = self.mapping(raw, "limits", ("backend", "on_backend_error"))
        backend = self.string(spec.get("backend", "memory"), "limits.backend").strip() or "memory"
        if backend not in LIMIT_BACKENDS:
            raise self.fail("limits.backend", f"expected one of {', '.join(LIMIT_BACKENDS)}, got {backend!r}")
        if backend == "redis" and not redis.url:
            raise self.fail("limits.backend", "'redis' needs redis.url")
        policy = self.choice(spec.get("on_backend_error", "open"), "limits.on_backend_error", LIMIT_ERROR_POLICIES)
        return LimitSettings(backend, policy)

    # -- shared state: redis and the response cache --------------------------------------------------
    def shared_state(self, top: dict[str, Any]) -> dict[str, Any]:
        """`redis=` and `cache=` of the `Config`; the per-alias `cache:` is checked against them by `alias_cache`."""
        redis = self.redis(top.get("redis"))
        cache = self.cache(top.get("cache"))
        if cache.backend == "redis" and not redis.url:
            raise self.fail("cache.backend", "'redis' needs redis.url")
        shared_health = top.get("health")
        if isinstance(shared_health, dict) and shared_health.get("shared") is True and not redis.url:
            raise self.fail("health.shared", "true needs redis.url (the news goes through it)")
        self.default_ttl = cache.ttl_seconds
        return {"redis": redis, "cache": cache}

    def redis(self, raw: Any) -> RedisSettings:
        spec = self.mapping(raw, "redis", ("url", "timeout_seconds"))
        url = self.string(spec.get("url") or "", "redis.url").strip()
        if url:
            try:
                parts = urlsplit(url)
                valid = parts.scheme in ("redis", "rediss", "unix") and bool(parts.hostname or parts.path)
                parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
            except ValueError:
                valid = False
            if not valid:
                raise self.fail("redis.url", f"{redact_url(url)!r} is not a redis://, rediss:// or unix:// URL")
        timeout = float(self.number(spec.get("timeout_seconds", 0.05), "redis.timeout_seconds", minimum=0.001))
        return RedisSettings(url=url, timeout_seconds=timeout)

    def cache(self, raw: Any) -> CacheSettings:
        spec = self.mapping(raw, "cache", ("backend", "ttl_seconds", "max_bytes", "max_entry_bytes", "direct"))
        backend = self.string(spec.get("backend", "memory"), "cache.backend").strip() or "memory"
        if backend not in CACHE_BACKENDS:
            raise self.fail("cache.backend", f"unknown backend {backend!r} (known: {', '.join(CACHE_BACKENDS)})")
        defaults = CacheSettings()
        direct = spec.get("direct", False)
        if not isinstance(direct, bool):
            raise self.fail("cache.direct", f"expected true or false, got {direct!r}")
        return CacheSettings(
            backend=backend,
            ttl_seconds=self.ttl(spec.get("ttl_seconds", defaults.ttl_seconds), "cache.ttl_seconds"),
            max_bytes=int(
                self.number(spec.get("max_bytes", defaults.max_bytes), "cache.max_bytes", minimum=1, integer=True)
            ),
            max_entry_bytes=int(
                self.number(
                    spec.get("max_entry_bytes", defaults.max_entry_bytes),
                    "cache.max_entry_bytes",
                    minimum=1,
                    integer=True,
                )
            ),
            direct=direct,
        )

    def ttl(self, raw: Any, where: str) -> float:
        ttl = float(self.number(raw, where, minimum=0.001))
        if ttl > 365 * 86400:
            raise self.fail(where, f"must be at most a year (31536000), got {raw}")
        return ttl

    def alias_cache(self, raw: Any, where: str) -> float | None:
        """An alias's `cache:`: absent or false → None; true → the top-level `cache.ttl_seconds`;
        `{ttl_seconds: N}` → N."""
        if raw is None or raw is False:
            return None
        if raw is True:
            return self.default_ttl
        spec = self.mapping(raw, where, ("ttl_seconds",))
        if "ttl_seconds" not in spec:
            return self.default_ttl
        return self.ttl(spec["ttl_seconds"], f"{where}.ttl_seconds")

    def workers(self, value: Any) -> int | Literal["auto"]:
        if isinstance(value, str) and value.strip() == "auto":
            return "auto"
        count = int(self.number(value, "server.workers", minimum=1, integer=True))
        if count > MAX_WORKERS:
            raise self.fail("server.workers", f"must be auto or at most {MAX_WORKERS}, got {count}")
        return count
