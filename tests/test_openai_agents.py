"""The OpenAI Agents SDK (`openai-agents`) through manaproxy: the two ways the README's client notes give.

The Agents SDK reads the text before `/` in a plain model string as its own provider prefix, so
`Agent(model="mana/x")` fails with "Unknown prefix: mana" before any request. A model object built on a client
pointed at manaproxy, or `MultiProvider(unknown_prefix_mode="model_id")`, sends `mana/x` as it is.
"""

from __future__ import annotations

import openai
import pytest
from agents import Agent, OpenAIChatCompletionsModel, RunConfig, Runner
from agents.exceptions import UserError
from agents.models.multi_provider import MultiProvider

from .fakes import chat_completion, json_reply
from .helpers import build_config

NO_TRACES = {"tracing_disabled": True}  # the SDK would export traces to OpenAI otherwise


@pytest.fixture
async def proxied(make_upstream, make_proxy):
    up = await make_upstream("a")
    up.default = json_reply(chat_completion("m1", "Hi from the agent"))
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-app")
    yield up, client
    await client.close()


async def test_a_plain_model_string_with_a_slash_is_read_as_a_provider_prefix(proxied):
    up, client = proxied
    provider = MultiProvider(openai_client=client, openai_use_responses=False)

    with pytest.raises(UserError, match="Unknown prefix: mana"):
        await Runner.run(
            Agent(name="a", model="mana/x"), "hi", run_config=RunConfig(model_provider=provider, **NO_TRACES)
        )
    assert up.calls == 0


async def test_a_model_object_on_a_client_pointed_at_manaproxy_works(proxied):
    up, client = proxied
    agent = Agent(name="a", model=OpenAIChatCompletionsModel(model="mana/x", openai_client=client))

    result = await Runner.run(agent, "hi", run_config=RunConfig(**NO_TRACES))

    assert result.final_output == "Hi from the agent"
    assert up.requests[0].json["model"] == "m1"


async def test_multi_provider_with_unknown_prefixes_as_model_ids_works(proxied):
    up, client = proxied
    provider = MultiProvider(openai_client=client, openai_use_responses=False, unknown_prefix_mode="model_id")

    result = await Runner.run(
        Agent(name="a", model="mana/x"), "hi", run_config=RunConfig(model_provider=provider, **NO_TRACES)
    )

    assert result.final_output == "Hi from the agent"
    assert up.requests[0].json["model"] == "m1"
