"""The Redis backend of the client limits (`limits: {backend: redis}`): the windows shared by every process and
host using that Redis.

Rule of this module: one round trip per check. `take` is one `EVALSHA` of a Lua script that runs `limits.gcra`
— the same arithmetic, operation for operation in the same doubles — atomically over every rule of a client,
on Redis's clock (`TIME`: the hosts' clocks do not matter). It goes through the one shared connection
(`redislink.py`): bounded by `redis.timeout_seconds`, never waiting on a Redis known to be down, counted in
`mana_llm_redis_errors_total{feature="limits"}`; a check that did not run raises `LimitBackendUnavailable`, and
`limits.Limiter` applies `limits.on_backend_error`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .limits import REQUESTS, Rule, Verdict, Window
from .redislink import DEGRADED, RedisLink

if TYPE_CHECKING:
    import redis.asyncio as aioredis

FEATURE = "limits"  # `feature` label of `mana_llm_redis_errors_total`
# A client's windows: `manaproxy:limits:v1:{<client>}:<rule>`. Client names are labels, not secrets (keys never
# reach Redis); the braces are a Redis Cluster hash tag, keeping one client's keys in one slot for the script.
KEY_PREFIX = "manaproxy:limits:v1:"

# `gcra` in Lua, operation for operation in the same doubles (so the same verdicts, to the last bit), run
# atomically by Redis: one round trip checks and counts every rule of a client. The clock is Redis's own
# (`TIME`), so the hosts' clocks do not matter; ARGV[1] is a clock for tests only (`now` of `redis_gcra`), empty
# otherwise. A key lives until its tat has passed (after that it means "never used" anyway), so idle windows
# expire. The verdict goes back as one string of numbers (Redis would truncate a Lua number to an integer).
GCRA_SCRIPT = """
local now
if ARGV[1] == '' then
  if redis.replicate_commands then redis.replicate_commands() end
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local requests = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local epsilon = 1e-9
local count = #KEYS
local kinds, periods, intervals, aheads, waits = {}, {}, {}, {}, {}
local allowed = true
for i = 1, count do
  local at = 1 + 3 * i
  kinds[i] = ARGV[at] == 'r'
  periods[i] = tonumber(ARGV[at + 1])
  intervals[i] = tonumber(ARGV[at + 2])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > now then aheads[i] = tat - now else aheads[i] = 0.0 end
  waits[i] = 0.0
end
if requests > 0 then
  for i = 1, count do
    local need = 1
    if kinds[i] then need = requests end
    if (periods[i] - aheads[i]) / intervals[i] + epsilon < need then
      allowed = false
      waits[i] = math.max(aheads[i] + need * intervals[i] - periods[i], epsilon)
    end
  end
end
local result = {allowed and '1' or '0'}
for i = 1, count do
  local ahead = aheads[i]
  if allowed then
    local cost = tokens
    if kinds[i] then cost = requests end
    if cost ~= 0 then
      ahead = ahead + cost * intervals[i]
      redis.call('SET', KEYS[i], string.format('%.17g', now + ahead), 'PX', math.max(1, math.ceil(ahead * 1000)))
    end
  end
  local left = math.floor((periods[i] - ahead) / intervals[i] + epsilon)
  if left < 0 then left = 0 end
  result[#result + 1] = string.format('%d', left)
  result[#result + 1] = string.format('%.17g', ahead)
  result[#result + 1] = string.format('%.17g', waits[i])
end
return table.concat(result, ' ')
"""
_SCRIPT_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()  # how Redis names a script (EVALSHA)


def redis_keys(client: str, rules: Sequence[Rule]) -> list[str]:
    return [f"{KEY_PREFIX}{{{client}}}:{rule.name}" for rule in rules]


async def redis_gcra(
    redis: aioredis.Redis,
    client: str,
    rules: Sequence[Rule],
    *,
    requests: int,
    tokens: int,
    now: float | None = None,
) -> Verdict:
    """`gcra` on `client`'s windows kept in `redis`, in one round trip (EVALSHA; EVAL when Redis does not know
    the script yet, after a restart). `now`: a clock for tests; None (manaproxy's every call): Redis's `TIME`.
    Raises what redis-py raises."""
    from redis.exceptions import NoScriptError

    keys = redis_keys(client, rules)
    args: list[Any] = ["" if now is None else repr(now), requests, tokens]
    for rule in rules:
        args += ("r" if rule.kind == REQUESTS else "t", repr(rule.period), repr(rule.interval))
    try:
        raw = await redis.evalsha(_SCRIPT_SHA, len(keys), *keys, *args)
    except NoScriptError:
        raw = await redis.eval(GCRA_SCRIPT, len(keys), *keys, *args)
    fields = raw.split()  # one string: cheaper to parse than a reply of 1 + 3 per rule
    windows = tuple(
        Window(rule, int(fields[1 + 3 * index]), float(fields[2 + 3 * index]), float(fields[3 + 3 * index]))
        for index, rule in enumerate(rules)
    )
    return Verdict(fields[0] in (b"1", "1"), windows)  # str: a `redis.url` asking for decode_responses


class LimitBackendUnavailable(Exception):
    """The shared store did not check the request (down, slow, refusing): `limits.on_backend_error` decides."""


class RedisBackend:
    """The windows in Redis, through the one shared connection (`redislink.py`): shared by every process and
    host using that Redis, exact across them (the script is atomic), one round trip per `take`."""

    __slots__ = ("link",)

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    def __repr__(self) -> str:
        return f"<RedisBackend {self.link!r}>"

    async def take(self, client: str, rules: Sequence[Rule], *, requests: int, tokens: int) -> Verdict:
        verdict = await self.link.run(
            FEATURE, lambda redis: redis_gcra(redis, client, rules, requests=requests, tokens=tokens), write=True
        )
        if verdict is DEGRADED:  # the link logged why (once per outage) and counted it for `limits`
            raise LimitBackendUnavailable("redis did not run the limit check (see manaproxy.redis)")
        return verdict
