"""Headers cross manaproxy like a reverse proxy's: the client's end-to-end headers reach the upstream (never
its credentials), the upstream's reach the client (never its cookies), ours win on conflict."""

from __future__ import annotations

import openai
import pytest
from aiohttp import web

from manaproxy.config import ConfigError, parse_config

from .fakes import Recorded, chat_chunks, chat_completion, error_body, sse_event
from .helpers import CHAT, build_config, chat

PROVIDER_KEY = "test-provider-key-0123456789"
CLIENT_KEY = "client-key-0123456789"

SENT = {
    "OpenAI-Beta": "assistants=v2",
    "Idempotency-Key": "idem-1",
    "X-Stainless-Lang": "python",
    "X-Custom-Trace": "t-1",
    "User-Agent": "my-app/1.0",
    "Authorization": f"Bearer {CLIENT_KEY}",
    "X-API-Key": CLIENT_KEY,
    "Cookie": "session=1",
    "Connection": "keep-alive, X-Hop",
    "X-Hop": "only-to-the-next-hop",
    "Forwarded": "for=1.2.3.4",
    "X-Forwarded-For": "1.2.3.4",
    "OpenAI-Organization": "org-1",
    "OpenAI-Project": "proj-1",
    "X-Mana-LLM-Resolved": "forged/target",
}
PASSED = ["OpenAI-Beta", "Idempotency-Key", "X-Stainless-Lang", "X-Custom-Trace", "User-Agent"]
NEVER = ["X-API-Key", "Cookie", "X-Hop", "Forwarded", "X-Forwarded-For", "X-Mana-LLM-Resolved"]

ANSWERED = {
    "x-ratelimit-remaining-requests": "99",
    "openai-processing-ms": "42",
    "x-request-id": "req_upstream_1",
    "Set-Cookie": "upstream=1",
    "Server": "upstream/1.0",
    "X-Mana-LLM-Resolved": "spoofed/by-upstream",
    "Connection": "keep-alive, X-Upstream-Hop",
    "X-Upstream-Hop": "1",
}


def answer_with_headers(*, stream: bool = False, status: int = 200, headers: dict[str, str] = ANSWERED):
    """A chat answer (streamed or not; an error body unless 200) that carries `headers`."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if stream:
            response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream", **headers})
            await response.prepare(request)
            for chunk in chat_chunks("up-model", ["hi"]):
                await response.write(sse_event(chunk))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        body = chat_completion("up-model") if status == 200 else error_body("bad request", code="bad")
        return web.json_response(body, status=status, headers=headers)

    return behave


@pytest.fixture
async def setup(make_upstream, make_proxy):
    up = await make_upstream("up")
    providers = {
        "a": {"base_url": up, "api_key": "${A_KEY}"},
        "closed": {"base_url": up, "forward_headers": False},
        "picky": {"base_url": up, "forward_headers": ["OpenAI-Organization", "X-Custom-Trace"]},
    }
    aliases = {"mana/x": ["a/m1"], "mana/closed": ["closed/m1"], "mana/picky": ["picky/m1"]}
    proxy = await make_proxy(
        build_config(providers, aliases), env={"A_KEY": PROVIDER_KEY}, api_keys=[CLIENT_KEY.encode()]
    )
    return up, proxy


async def test_the_clients_end_to_end_headers_reach_the_upstream_and_its_credentials_do_not(setup):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json=chat(), headers=SENT)

    assert resp.status == 200
    seen = up.requests[0].headers
    assert {name: seen.get(name) for name in PASSED} == {name: SENT[name] for name in PASSED}
    assert seen["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert [name for name in NEVER if name in seen] == []
    assert {"OpenAI-Organization", "OpenAI-Project"}.isdisjoint(seen)  # only to a provider that opts in
    assert seen["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    ("alias", "expected"),
    [("mana/closed", {}), ("mana/picky", {"OpenAI-Organization": "org-1", "X-Custom-Trace": "t-1"})],
)
async def test_forward_headers_narrows_what_a_provider_gets(setup, alias, expected):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json=chat(alias), headers=SENT)

    assert resp.status == 200
    seen = up.requests[0].headers
    client_names = set(SENT) - {"Authorization", "Connection"}
    assert {name: seen[name] for name in client_names if name in seen and name != "User-Agent"} == expected
    assert "Cookie" not in seen


@pytest.mark.parametrize(("stream", "status"), [(False, 200), (True, 200), (False, 400)])
async def test_the_upstreams_headers_reach_the_client_and_ours_win(setup, stream, status):
    up, proxy = setup
    up.queue(answer_with_headers(stream=stream, status=status))

    resp = await proxy.client.post(
        CHAT, json=chat(stream=stream), headers={"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-ID": "mine-1"}
    )
    await resp.read()

    assert resp.status == status
    assert resp.headers["x-ratelimit-remaining-requests"] == "99"
    assert resp.headers["openai-processing-ms"] == "42"
    assert resp.headers["X-Upstream-Request-ID"] == "req_upstream_1"
    assert resp.headers["X-Request-ID"] == "mine-1"
    assert resp.headers.getall("X-Mana-LLM-Resolved") == ["a/m1"]
    assert "Set-Cookie" not in resp.headers
    assert "X-Upstream-Hop" not in resp.headers
    assert "upstream" not in resp.headers.get("Server", "")


async def test_a_valid_x_api_key_beside_an_unrelated_bearer_is_let_in(setup):
    up, proxy = setup
    client = openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key="sk-meant-for-someone-else", default_headers={"X-API-Key": CLIENT_KEY}
    )
    up.queue(answer_with_headers())

    raw = await client.chat.completions.with_raw_response.create(
        model="mana/x", messages=[{"role": "user", "content": "hi"}]
    )
    await client.close()

    assert raw.http_response.status_code == 200
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.parse().model == "a/m1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes", "expected true, false or a list"),
        (["X Bad"], "not a valid HTTP header name"),
        ({"a": 1}, "expected true"),
    ],
)
def test_a_bad_forward_headers_setting_is_refused_with_its_place(value, message):
    text = build_config({"a": {"base_url": "http://127.0.0.1:9/v1", "forward_headers": value}}, {"mana/x": ["a/m"]})
    with pytest.raises(ConfigError, match=r"providers\.a\.forward_headers.*" + message):
        parse_config(text, env={})


async def test_a_cookie_an_upstream_set_is_never_sent_with_a_later_request(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.queue(answer_with_headers())  # sets `upstream=1`
    # By name, not by address: a client cookie jar keeps no cookie for a bare IP address anyway.
    by_name = up.base_url.replace("127.0.0.1", "localhost")
    proxy = await make_proxy(build_config({"a": by_name}, {"mana/x": ["a/m1"]}))

    for _ in range(2):
        resp = await proxy.client.post(CHAT, json=chat())
        assert resp.status == 200

    assert len(up.requests) == 2
    assert "Cookie" not in up.requests[1].headers


ECHOING = {
    "WWW-Authenticate": f'Bearer realm="api", error="invalid_token", token="{PROVIDER_KEY}"',
    "X-Debug-Auth": f"Authorization: Bearer {PROVIDER_KEY}",
    "x-ratelimit-debug": f"key {PROVIDER_KEY}",
    "openai-debug": f"Bearer {PROVIDER_KEY}",
}


@pytest.mark.parametrize(
    ("stream", "status", "relayed"),
    [(False, 200, 200), (True, 200, 200), (False, 400, 400), (False, 429, 429), (False, 401, 502), (True, 429, 429)],
)
async def test_an_upstream_header_that_echoes_our_key_is_relayed_redacted(setup, stream, status, relayed):
    up, proxy = setup
    up.queue(answer_with_headers(stream=stream, status=status, headers=ECHOING))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream), headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    await resp.read()

    assert resp.status == relayed
    assert resp.headers["x-ratelimit-debug"] == "key [redacted]"
    assert [(name, value) for name, value in resp.raw_headers if PROVIDER_KEY.encode() in value] == []


OVERRIDES_AND_SPELLINGS = {
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "Cookie2": "$Version=1",
    "Via": "1.1 forged",
    "Max-Forwards": "0",
    "X_Api_Key": CLIENT_KEY,
    "x_api_key": CLIENT_KEY,
    "Api-Key": CLIENT_KEY,
    "X_Forwarded_For": "1.2.3.4",
    "OpenAI_Organization": "org-1",
    "X-Custom-Trace": "t-1",
}


async def test_method_overrides_forwarding_headers_and_the_clients_key_in_any_spelling_never_reach_the_upstream(
    setup,
):
    up, proxy = setup

    resp = await proxy.client.post(
        CHAT, json=chat(), headers={"Authorization": f"Bearer {CLIENT_KEY}", **OVERRIDES_AND_SPELLINGS}
    )

    assert resp.status == 200
    seen = up.requests[0].headers
    never = {name.lower().replace("_", "-") for name in OVERRIDES_AND_SPELLINGS} - {"x-custom-trace"}
    assert [name for name in seen if name.lower().replace("_", "-") in never] == []
    assert CLIENT_KEY not in "".join(seen.values())
    assert seen["X-Custom-Trace"] == "t-1"
    assert up.requests[0].method == "POST"


UPSTREAMS_OWN = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Location": "https://evil.example/",
    "Content-Location": "https://evil.example/",
    "Set-Cookie": "upstream=1",
    "Alt-Svc": 'h3=":443"',
    "Content-Security-Policy": "default-src 'none'",
    "Link": "<https://evil.example/>; rel=preload",
    "Refresh": "0; url=https://evil.example/",
    "X-Powered-By": "upstream",
    "WWW-Authenticate": 'Bearer realm="upstream"',
    "Access-Control-Allow-Origin": "*",
    "Clear-Site-Data": '"*"',
    "Cache-Control": "public, max-age=31536000",
    "ETag": '"1"',
}
KEPT = {
    "x-ratelimit-remaining-tokens": "999",
    "retry-after": "3",
    "retry-after-ms": "3000",
    "openai-processing-ms": "7",
    "openai-version": "2020-10-01",
    "x-request-id": "req_up_2",
}


@pytest.mark.parametrize(("stream", "status"), [(False, 200), (True, 200), (False, 400), (False, 429)])
async def test_only_the_allowed_upstream_headers_reach_the_client(setup, stream, status):
    up, proxy = setup
    up.queue(answer_with_headers(stream=stream, status=status, headers={**UPSTREAMS_OWN, **KEPT}))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream), headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    await resp.read()

    assert resp.status == status
    assert {name: resp.headers.get(name) for name in KEPT if name != "x-request-id"} == {
        name: value for name, value in KEPT.items() if name != "x-request-id"
    }
    assert resp.headers["X-Upstream-Request-ID"] == "req_up_2"
    leaked = {
        name: resp.headers.getall(name)
        for name in UPSTREAMS_OWN
        if UPSTREAMS_OWN[name] in resp.headers.getall(name, [])
    }
    assert leaked == {}


async def test_a_stream_keeps_its_content_type_and_vary_and_nothing_says_what_serves(setup):
    up, proxy = setup
    own = {"Content-Type": "text/event-stream; charset=utf-8", "Vary": "Accept-Encoding"}
    up.queue(answer_with_headers(stream=True, headers=own), answer_with_headers(headers={"Vary": "Accept-Encoding"}))
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    streamed = await proxy.client.post(CHAT, json=chat(stream=True), headers=auth)
    await streamed.read()
    whole = await proxy.client.post(CHAT, json=chat(), headers=auth)
    ours = await proxy.client.post(CHAT, json=chat("mana/nope"), headers=auth)
    liveness = await proxy.client.get("/health")

    assert (streamed.headers["Content-Type"], streamed.headers["Vary"]) == (own["Content-Type"], "Accept-Encoding")
    assert whole.headers["Vary"] == "Accept-Encoding"
    assert [resp.headers.get("Server") for resp in (streamed, whole, ours, liveness)] == [None] * 4
