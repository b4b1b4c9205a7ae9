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
from typing import Any
from urllib.parse import urlsplit

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


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    description: str
    steps: tuple[Step, ...]
    hedge: Hedge | None = None

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


# Server settings aiohttp takes once, when it starts listening: a reload cannot change them.
RESTART_ONLY_SETTINGS = ("header_timeout_seconds", "keepalive_timeout_seconds", "listen_backlog", "max_connections")


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    aliases: Mapping[str, Alias]
    default: str | None = None
    health: HealthSettings = HealthSettings()
    server: ServerSettings = ServerSettings()
    source: str = "<memory>"
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
        top = self.mapping(raw, "top level", ("providers", "aliases", "default", "health", "server"))
        providers_raw = self.mapping(top.get("providers"), "providers")
        declared = {name: self.provider(name, spec) for name, spec in providers_raw.items()}

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
            source=self.source,
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
        spec = self.mapping(spec, where, ("description", "chain", "hedge_after", *_HEDGE_EXTRAS))
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
        return Alias(name=name, description=description, steps=tuple(steps), hedge=self.hedge(spec, where))

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
            if key == "failure_threshold":
                values[key] = int(self.number(value, f"health.{key}", minimum=1, integer=True))
            else:
                values[key] = float(self.number(value, f"health.{key}", minimum=0.001))
        return HealthSettings(**values)

    def server(self, raw: Any) -> ServerSettings:
        fields = tuple(ServerSettings.__dataclass_fields__)
        spec = self.mapping(raw, "server", fields)
        values: dict[str, Any] = {}
        for key, value in spec.items():
            if ServerSettings.__dataclass_fields__[key].type in ("int", "int | None"):  # sizes and counts
                values[key] = int(self.number(value, f"server.{key}", minimum=1, integer=True))
            elif key.endswith("_timeout_seconds"):
                values[key] = float(self.number(value, f"server.{key}", minimum=0.001))
            else:
                values[key] = float(self.number(value, f"server.{key}"))
        return ServerSettings(**values)
