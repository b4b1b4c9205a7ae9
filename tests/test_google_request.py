"""`providers/google/request.py`: OpenAI chat requests as Gemini ones (the full translation is checked end to end,
on the body the SDK really sends, in test_google.py)."""

from __future__ import annotations

from manaproxy.providers.google import request as google_request

USER = [{"role": "user", "content": "hi"}]


def test_tool_message_may_name_its_function_instead_of_matching_an_id():
    request = google_request.chat_request(
        {"messages": [*USER, {"role": "tool", "tool_call_id": "elsewhere", "name": "lookup", "content": "[1, 2]"}]}
    )
    response = request.contents[-1].parts[-1].function_response
    assert (response.name, response.response) == ("lookup", {"result": [1, 2]})
