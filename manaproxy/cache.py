"""The response cache: complete 200 answers of opted-in aliases, replayed byte for byte, in memory or in Redis.

Rules of this module:
- Only what is whole is stored: a 200 unstreamed answer, or a stream that reached its protocol's end with
  nothing failing on the way (`proxy.py` asks for the store only then). Never an error, a truncated stream,
  a hedge that lost, an answer over `cache.max_entry_bytes`, a request with `n` > 1, a multipart body.
- A hit is the stored bytes as they were sent (`model` as it was answered), to the client identity that
  stored them only: the key (`cache_key`) holds the route, the requested model, the body canonicalised
  (`canonical_body`: key order and whitespace do not matter, number spelling does; `stream` is in the body,
  so streamed and unstreamed requests never share an entry; a large body is canonicalised off the loop), the client's credentials (hashed) when client
  keys are set, and the generation of the route's config (`generation`: a reload that changes an alias's
  chain starts it afresh). Key names are hashes: no prompt text reaches Redis.
- The cache is never in the way: a Redis lookup is bounded by `redis.timeout_seconds` (`redislink.py`), and
  past it the request goes on uncached (`X-Mana-LLM-Cache: error`); stores run after the answer has been
  sent, in the background. Identical concurrent misses are not coalesced: each goes upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from time import perf_counter

import msgspec
import orjson
from aiohttp import web
from multidict import CIMultiDict

from .auth import CLIENT
from .body import OFF_LOOP_BYTES, Body, RequestBody
from .config import Config, ProviderConfig
from .protocols import StreamProtocol
from .providers.base import Reply, StreamReply
from .record import RequestRecord
from .redislink import DEGRADED, RedisLink
from .routing import Route

logger = logging.getLogger(__name__)

CACHE_HEADER = "X-Mana-LLM-Cache"
# Results: the header's value and the `result` label of `mana_llm_cache_requests_total`.
HIT, MISS, BYPASS, ERROR = "hit", "miss", "bypass", "error"
RESULTS = (HIT, MISS, BYPASS, ERROR)
# Set on a request of a caching alias: `cache_header` (on_response_prepare) puts it on whatever answers it,
# errors included.
CACHE_RESULT = web.RequestKey("cache_result", str)

FEATURE = "cache"  # `feature` label of `mana_llm_redis_errors_total`
KEY_PREFIX = "manaproxy:cache:v1:"
_STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_RESOLVED_HEADER = "X-Mana-LLM-Resolved"  # as `proxy.RESOLVED_HEADER`
_MAX_PENDING_STORES = 1024  # Redis stores waiting at once; past it a store is dropped rather than queued
_ENTRY_OVERHEAD = 256  # bytes a memory entry costs beyond its body (key, headers, bookkeeping), for the LRU bound


# -- the key -------------------------------------------------------------------------------------------------

# Floats decode to their own spelling (`1.0`, `1.00` and `1e0` stay apart); ints keep theirs, being exact.
_CANONICAL = msgspec.json.Decoder(float_hook=lambda text: msgspec.Raw(text.encode()))


def canonical_body(raw: bytes | bytearray) -> bytes | None:
    """The JSON object with sorted keys and no whitespace, numbers as spelt; None when it is not to be cached
    (`n` other than 1: several choices are meant to differ; or bytes that do not decode, which the upstream
    will refuse)."""
    try:
        document = _CANONICAL.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("n", 1) != 1 or isinstance(document.get("n"), bool):
        return None
    try:
        return msgspec.json.encode(document, order="sorted")
    except (msgspec.EncodeError, RecursionError):
        return None


async def canonicalise(raw: bytes | bytearray) -> bytes | None:
    """`canonical_body`, in a worker thread when the body is larger than `OFF_LOOP_BYTES`: like its parse
    (body.py), no large body is walked on the event loop."""
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(canonical_body, raw)
    return canonical_body(raw)


def generation(config: Config, route: Route) -> bytes:
    """What of the config an answer depends on: the alias's chain and hedging, and the kind and URL of each
    provider it names (never a key). A reload that changes any of it gives new keys, so the alias starts
    afresh; one that changes anything else keeps its entries."""
    parts = [repr(route.alias), repr(route.steps), repr(route.hedge)]
    for target in route.chain:
        provider: ProviderConfig | None = config.providers.get(target.provider)
        if provider is not None:
            parts.append(f"{provider.name} {provider.kind} {provider.base_url}")
    return hashlib.sha256("\n".join(parts).encode()).digest()


def client_identity(request: web.Request) -> bytes | None:
    """Who may read an entry: with client keys set, the client the request was let in as (its name: stable
    across processes, hosts and a rotation of its keys); without them, everyone (None)."""
    name = request.get(CLIENT)
    if name is None:
        return None
    return hashlib.sha256(b"client\0" + name.encode()).digest()


def cache_key(*, path: str, model: str, body: bytes, client: bytes | None, generation: bytes) -> str:
    """The entry's name: a hash of everything the answer depends on (see the module's rules)."""
    digest = hashlib.sha256()
    for part in (path.encode(), model.encode("utf-8", "surrogateescape"), client or b"-", generation, body):
        digest.update(len(part).to_bytes(8, "big"))  # length-prefixed: no two part lists hash alike
        digest.update(part)
    return KEY_PREFIX + digest.hexdigest()


def directives(header: str | None) -> tuple[bool, bool]:
    """(look up, store) as a request's `Cache-Control` asks: `no-cache` skips the lookup (the answer is
    still stored), `no-store` skips both."""
    if not header:
        return True, True
    words = {word.strip().split("=", 1)[0].lower() for word in header.split(",")}
    if "no-store" in words:
        return False, False
    return "no-cache" not in words, True


# -- entries -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer: its bytes as they were sent, and what its replay's headers need."""

    stored: float  # unix time
    streamed: bool
    content_type: str
    resolved: str  # the `X-Mana-LLM-Resolved` it was answered with
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body) + _ENTRY_OVERHEAD

    def dumps(self) -> bytes:
        head = orjson.dumps([self.stored, self.streamed, self.content_type, self.resolved])
        return head + b"\n" + self.body

    @classmethod
    def loads(cls, blob: bytes) -> Entry | None:
        """The entry `dumps` wrote; None for anything else (another version's, a damaged value)."""
        head, sep, body = blob.partition(b"\n")
        try:
            stored, streamed, content_type, resolved = orjson.loads(head)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        if not sep or not isinstance(stored, int | float) or not isinstance(streamed, bool):
            return None
        if not isinstance(content_type, str) or not isinstance(resolved, str):
            return None
        return cls(float(stored), streamed, content_type, resolved, body)

    def response(self) -> web.StreamResponse:
        """The replay: the same bytes, with `Age` and the `X-Mana-LLM-Resolved` of the first answer."""
        age = str(max(0, int(time.time() - self.stored)))
        ours = {_RESOLVED_HEADER: self.resolved, "Age": age}
        if self.streamed:
            return web.Response(body=self.body, headers=CIMultiDict({**_STREAM_HEADERS, **ours}))
        return web.Response(body=self.body, headers=CIMultiDict({"Content-Type": self.content_type, **ours}))


class MemoryStore:
    """Entries of this process, least recently used first, their bytes bounded by `max_bytes`."""

    __slots__ = ("_entries", "max_bytes", "size")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes held (`mana_llm_cache_bytes`)
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()  # key -> (expires, monotonic)

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._entries)} entries {self.size}/{self.max_bytes} bytes>"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if time.monotonic() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, ttl: float) -> None:
        if key in self._entries:
            self._drop(key)
        if entry.size > self.max_bytes:
            return
        self._entries[key] = (time.monotonic() + ttl, entry)
        self.size += entry.size
        self.shrink()

    def shrink(self) -> None:
        """Drop the least recently used entries until the rest fit `max_bytes` (which a reload may lower)."""
        while self.size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, entry = self._entries.pop(key)
        self.size -= entry.size


# -- the cache on the request path ---------------------------------------------------------------------------


@dataclass(slots=True)
class Lookup:
    """A request of a caching alias: its key and result, and the entry when it was a hit."""

    key: str
    ttl: float
    store: bool  # the answer may be stored (no `no-store`)
    redis: bool  # the backend when it was looked up
    max_entry_bytes: int
    hit: Entry | None = None


class ResponseCache:
    """The process's cache: the memory store and the shared Redis link, and the stores still being written."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.memory = MemoryStore(0)
        self._pending: set[asyncio.Task[None]] = set()
        # Each alias's `generation` under one config (aliases only: direct model names are the clients').
        self._generations: tuple[Config | None, dict[str, bytes]] = (None, {})

    def __repr__(self) -> str:
        return f"<ResponseCache {self.memory!r} {self.link!r} pending={len(self._pending)}>"

    async def lookup(
        self, request: web.Request, config: Config, route: Route, path: str, body: Body, record: RequestRecord
    ) -> Lookup | None:
        """Look the request up if its route caches: None when it does not (the request is none of the cache's
        business), else its `Lookup` (`hit` set on a hit). The result goes on the record and the request."""
        ttl = _ttl(config, route)
        if ttl is None:
            return None
        settings = config.cache
        self.memory.max_bytes = settings.max_bytes  # a reload may change it
        look, store = directives(request.headers.get("Cache-Control"))
        canonical = await canonicalise(body.raw) if store and isinstance(body, RequestBody) else None
        if canonical is None:
            _note(request, record, BYPASS)
            return None
        key = cache_key(
            path=path,
            model=route.requested,
            body=canonical,
            client=client_identity(request),
            generation=self._generation(config, route),
        )
        redis = settings.backend == "redis"
        lookup = Lookup(key, ttl, store, redis, settings.max_entry_bytes)
        if not look:
            _note(request, record, BYPASS)
            return lookup
        if not redis:
            lookup.hit = self.memory.get(key)
        else:
            found = await self.link.run(FEATURE, lambda client: client.get(key))
            if found is DEGRADED:
                _note(request, record, ERROR)
                return None  # Redis is down or slow: uncached, and nothing stored either
            lookup.hit = Entry.loads(found) if isinstance(found, bytes) else None
        if lookup.hit is not None and lookup.hit.streamed != body.stream:  # cannot be: `stream` is in the key
            lookup.hit = None
        _note(request, record, HIT if lookup.hit is not None else MISS)
        return lookup

    def _generation(self, config: Config, route: Route) -> bytes:
        if route.alias is None:
            return generation(config, route)
        of, generations = self._generations
        if of is not config:  # a reload: every alias's generation is computed afresh
            generations = {}
            self._generations = (config, generations)
        found = generations.get(route.alias)
        if found is None:
            found = generations[route.alias] = generation(config, route)
        return found

    def replay(self, lookup: Lookup, record: RequestRecord) -> web.StreamResponse:
        """The answer to a hit: the stored bytes. No provider answered it: the record has no target."""
        assert lookup.hit is not None
        record.status = 200
        record.first_byte = perf_counter() - record.started
        return lookup.hit.response()

    def store_reply(self, lookup: Lookup, reply: Reply, resolved: str) -> None:
        """Store an unstreamed answer (after it is sent: see `_save`), if it is a 200 within the bound."""
        if reply.status == 200 and lookup.store and len(reply.body) <= lookup.max_entry_bytes:
            self._save(lookup, Entry(time.time(), False, reply.content_type, resolved, reply.body))

    def tee(self, lookup: Lookup, reply: StreamReply) -> Tee:
        """`reply`, keeping a copy of the bytes relayed (up to `max_entry_bytes`) for `store_stream`."""
        return Tee(reply, lookup.max_entry_bytes if lookup.store and reply.status == 200 else -1)

    def store_stream(self, lookup: Lookup, tee: Tee, resolved: str, protocol: StreamProtocol) -> None:
        """Store a relayed stream that ended complete (a Responses stream: `response.completed`), after its
        last byte was sent."""
        body = tee.kept()
        if body is not None and tee.complete and protocol.succeeded(body):
            self._save(lookup, Entry(time.time(), True, "text/event-stream", resolved, body))

    def _save(self, lookup: Lookup, entry: Entry) -> None:
        if not lookup.redis:
            # Soon, not now: the answer is handed to the connection first (a dict insert either way).
            asyncio.get_running_loop().call_soon(self.memory.put, lookup.key, entry, lookup.ttl)
            return
        if len(self._pending) >= _MAX_PENDING_STORES:
            return  # Redis is slow and stores pile up: drop this one rather than hold its bytes
        task = asyncio.get_running_loop().create_task(self._save_redis(lookup.key, entry.dumps(), lookup.ttl))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _save_redis(self, key: str, blob: bytes, ttl: float) -> None:
        await self.link.run(FEATURE, lambda client: client.set(key, blob, px=max(1, round(ttl * 1000))), write=True)

    async def settle(self) -> None:
        """Let the stores under way finish (each is bounded by the Redis timeout): at shutdown, and in tests."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _ttl(config: Config, route: Route) -> float | None:
    """Seconds the route's answers are kept; None when it does not cache."""
    if route.alias is not None:
        alias = config.aliases.get(route.alias)
        return alias.cache_ttl if alias is not None else None
    return config.cache.ttl_seconds if config.cache.direct else None


def _note(request: web.Request, record: RequestRecord, result: str) -> None:
    request[CACHE_RESULT] = result
    record.cache = result


async def cache_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to a request of a caching alias says what the cache did."""
    result = request.get(CACHE_RESULT)
    if result is not None:
        response.headers[CACHE_HEADER] = result


class Tee:
    """A `StreamReply` relayed as it is, its bytes kept on the side until they pass `limit` (-1: none kept)."""

    __slots__ = ("_parts", "_reply", "_size", "first", "headers", "limit", "status")

    def __init__(self, reply: StreamReply, limit: int) -> None:
        self._reply = reply
        self.status = reply.status
        self.headers = reply.headers
        self.first = reply.first
        self.limit = limit
        self._size = len(reply.first)
        self._parts: list[bytes] | None = [reply.first] if 0 <= self._size <= limit else None

    # What the provider's reply learns as it goes (settable: `StreamReply` declares attributes).
    @property
    def complete(self) -> bool:
        return self._reply.complete

    @complete.setter
    def complete(self, value: bool) -> None:
        self._reply.complete = value

    @property
    def usage(self) -> tuple[int, int] | None:
        return self._reply.usage

    @usage.setter
    def usage(self, value: tuple[int, int] | None) -> None:
        self._reply.usage = value

    def close(self, *, reuse: bool) -> None:
        self._reply.close(reuse=reuse)

    async def events(self) -> AsyncGenerator[bytes, None]:
        async with aclosing(self._reply.events()) as events:
            async for chunk in events:
                if self._parts is not None:
                    self._size += len(chunk)
                    if self._size <= self.limit:
                        self._parts.append(chunk)
                    else:
                        self._parts = None  # too large to store: stop keeping it
                yield chunk

    def kept(self) -> bytes | None:
        """Every byte relayed, or None when they were not all kept."""
        return b"".join(self._parts) if self._parts is not None else None
