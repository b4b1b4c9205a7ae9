"""The Responses API through manaproxy, with the real openai SDK: typed events that end at
`response.completed` (no `[DONE]`) are a complete answer, `response.model` names the resolved target, and a
cut stream still ends in an error the SDK raises. Also: a stream of any other endpoint is complete when the
upstream ends its body."""

from __future__ import annotations

import logging

import openai
import orjson
import pytest

from .fakes import RESPONSE_WORDS, json_reply, response_object, responses_stream, typed_events

TEXT = RESPONSE_WORDS


async def test_a_responses_stream_ending_at_response_completed_is_whole(one, caplog):
    up, proxy = one
    up.queue(responses_stream(typed_events("up-model")))
    client = proxy.sdk()
    caplog.set_level(logging.INFO, logger="manaproxy.request")

    async with client.responses.stream(model="mana/x", input="hi") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    await client.close()

    assert deltas == TEXT
    assert final.model == "a/m1"
    assert final.output_text == "Hello, world"
    assert up.requests[0].path == "/v1/responses"
    assert up.requests[0].json["model"] == "m1"
    (line,) = [record.getMessage() for record in caplog.records if record.name == "manaproxy.request"]
    assert "outcome=completed" in line
    assert "prompt_tokens=7 completion_tokens=3" in line


@pytest.mark.parametrize("end", ["response.incomplete", "response.failed"])
async def test_incomplete_and_failed_are_ends_of_the_protocol_too(one, end):
    up, proxy = one
    up.queue(responses_stream(typed_events("up-model", end=end)))

    resp = await proxy.client.post("/v1/responses", json={"model": "mana/x", "input": "hi", "stream": True})
    body = await resp.read()

    assert body.endswith(typed_events("a/m1", end=end)[-1][-40:])  # ends with the upstream's own last event
    assert b"event: error" not in body


async def test_every_event_carrying_a_model_names_the_resolved_target(one):
    up, proxy = one
    up.queue(responses_stream(typed_events("up-model")))

    resp = await proxy.client.post("/v1/responses", json={"model": "mana/x", "input": "hi", "stream": True})
    body = await resp.read()

    assert b"up-model" not in body
    assert body.count(b'"model":"a/m1"') == 2  # response.created and response.completed


async def test_a_responses_stream_cut_mid_way_raises_in_the_sdk(one):
    up, proxy = one
    up.queue(responses_stream(typed_events("up-model", cut_after=5), cut=True))
    client = proxy.sdk()

    async def read_all() -> None:
        async with client.responses.stream(model="mana/x", input="hi") as stream:
            async for _ in stream:
                pass

    with pytest.raises(openai.APIError, match="failed mid-stream"):
        await read_all()
    await client.close()


async def test_a_responses_stream_that_just_stops_is_not_complete(one):
    up, proxy = one
    up.queue(responses_stream(typed_events("up-model", cut_after=5)))  # a clean end of body, no response.completed

    resp = await proxy.client.post("/v1/responses", json={"model": "mana/x", "input": "hi", "stream": True})
    body = await resp.read()

    *_, last = [event for event in body.split(b"\n\n") if event]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])
    assert error["type"] == "error"
    assert "without response.completed" in error["message"]


async def test_an_unstreamed_response_names_the_resolved_target(one):
    up, proxy = one
    up.queue(json_reply(response_object("up-model", "completed", "Hi")))
    client = proxy.sdk()

    response = await client.responses.create(model="mana/x", input="hi")
    await client.close()

    assert (response.model, response.output_text) == ("a/m1", "Hi")


async def test_a_stream_of_another_endpoint_is_complete_when_its_body_ends(one):
    up, proxy = one
    events = [
        b'data: {"type": "progress", "model": "up-model", "step": 1}\n\n',
        b'data: {"type": "progress", "step": 2}\n\n',
    ]
    up.queue(responses_stream(events))

    resp = await proxy.client.post("/v1/videos/generations", json={"model": "mana/x", "stream": True})
    body = await resp.read()

    assert body == events[0].replace(b'"up-model"', b'"a/m1"') + events[1]


async def test_cancel_without_a_body_gets_the_stored_object_explanation(one):
    up, proxy = one

    resp = await proxy.client.post("/v1/responses/resp_1/cancel")  # what `client.responses.cancel` sends

    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_endpoint"
    assert "stored at one provider" in error["message"]
    assert up.calls == 0
