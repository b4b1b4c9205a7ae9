"""OpenAI chat/embeddings requests → Gemini (google-genai) arguments.

Rule of this module: pure. No I/O, no clock, no SDK client — only data in, data out, so every mapping is
table-testable. Requests are translated into plain dicts in the SDK's snake_case field names and then
validated by the SDK's own pydantic models; whatever the translation cannot express, or the SDK refuses,
raises `TranslationError` (a 400 for the caller, never a fallback). The answers' way back is `answer.py`.

What is translated and what is not is listed in docs/google.md; keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import pydantic
from google.genai import types

_AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mp3"}
_TOOL_CHOICE_MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}


class TranslationError(ValueError):
    """The client's request cannot be expressed for Gemini; the caller gets a 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request in the SDK's terms, validated by its models."""

    contents: list[types.Content]
    config: types.GenerateContentConfig
    include_usage: bool  # stream_options.include_usage


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    texts: list[str]
    config: types.EmbedContentConfig
    base64: bool  # encoding_format == "base64"


# -- requests ------------------------------------------------------------------------------------------


def chat_request(payload: Mapping[str, Any]) -> ChatRequest:
    """Translate an OpenAI chat completion request body."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("'messages' must be a non-empty array", param="messages")
    system, contents = _messages(messages)
    if not contents:
        raise TranslationError("at least one user or assistant message is required", param="messages")

    config: dict[str, Any] = {
        # A proxy must not run tools or silently resend: one client request is one Gemini request.
        "automatic_function_calling": {"disable": True},
        "automatic_continuation": False,
    }
    if system:
        config["system_instruction"] = {"parts": system}
    _generation_settings(payload, config)
    _response_format(payload.get("response_format"), config)
    _tools(payload, config)

    stream_options = payload.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    try:
        return ChatRequest(
            contents=[types.Content.model_validate(content) for content in contents],
            config=types.GenerateContentConfig.model_validate(config),
            include_usage=include_usage,
        )
    except pydantic.ValidationError as exc:
        raise TranslationError(f"invalid request: {_validation_summary(exc)}") from None


def embeddings_request(payload: Mapping[str, Any]) -> EmbeddingsRequest:
    """Translate an OpenAI embeddings request body (text input only)."""
    raw = payload.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw:
        raise TranslationError("the google provider embeds text only; token-id arrays are not supported", param="input")
    else:
        raise TranslationError("'input' must be a string or a non-empty array of strings", param="input")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64", None):
        raise TranslationError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    config: dict[str, Any] = {}
    if payload.get("dimensions") is not None:
        config["output_dimensionality"] = payload["dimensions"]
    try:
        return EmbeddingsRequest(texts, types.EmbedContentConfig.model_validate(config), encoding == "base64")
    except pydantic.ValidationError as exc:
        raise TranslationError(f"invalid request: {_validation_summary(exc)}", param="dimensions") from None


def _generation_settings(payload: Mapping[str, Any], config: dict[str, Any]) -> None:
    for openai_name, gemini_name in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("seed", "seed"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ):
        if payload.get(openai_name) is not None:
            config[gemini_name] = payload[openai_name]
    max_tokens = payload.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = payload.get("max_tokens")
    if max_tokens is not None:
        config["max_output_tokens"] = max_tokens
    n = payload.get("n")
    if n is not None and n != 1:
        config["candidate_count"] = n
    stop = payload.get("stop")
    if isinstance(stop, str):
        config["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        if stop:
            config["stop_sequences"] = stop
    elif stop is not None:
        raise TranslationError("'stop' must be a string or an array of strings", param="stop")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise TranslationError(
            "logprobs are not supported by the google provider", param="logprobs", code="unsupported_parameter"
        )
    modalities = payload.get("modalities")
    if isinstance(modalities, list) and any(item != "text" for item in modalities):
        raise TranslationError(
            "only text output is supported by the google provider", param="modalities", code="unsupported_parameter"
        )


def _response_format(response_format: Any, config: dict[str, Any]) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        config["response_mime_type"] = "application/json"
        return
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise TranslationError(
                "response_format.json_schema.schema must be an object", param="response_format.json_schema"
            )
        config["response_mime_type"] = "application/json"
        config["response_json_schema"] = schema
        return
    raise TranslationError(
        "response_format.type must be 'text', 'json_object' or 'json_schema'", param="response_format"
    )


def _tools(payload: Mapping[str, Any], config: dict[str, Any]) -> None:
    tools = payload.get("tools")
    declarations = []
    if tools is not None:
        if not isinstance(tools, list):
            raise TranslationError("'tools' must be an array", param="tools")
        for index, tool in enumerate(tools):
            where = f"tools[{index}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise TranslationError("only tools of type 'function' are supported", param=where)
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise TranslationError("a function tool needs function.name", param=f"{where}.function")
            declaration: dict[str, Any] = {"name": function["name"]}
            if function.get("description") is not None:
                declaration["description"] = function["description"]
            if function.get("parameters") is not None:
                # JSON Schema as given: Gemini's parametersJsonSchema takes it without an OpenAPI rewrite.
                declaration["parameters_json_schema"] = function["parameters"]
            declarations.append(declaration)
    if declarations:
        config["tools"] = [{"function_declarations": declarations}]

    choice = payload.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        mode: dict[str, Any] = {"mode": _TOOL_CHOICE_MODES[choice]}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str):
            raise TranslationError("tool_choice.function.name must be a string", param="tool_choice")
        mode = {"mode": "ANY", "allowed_function_names": [name]}
    else:
        raise TranslationError(
            "tool_choice must be 'none', 'auto', 'required' or a named function", param="tool_choice"
        )
    if declarations or mode["mode"] == "NONE":
        config["tool_config"] = {"function_calling_config": mode}


def _messages(messages: Sequence[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system instruction parts, contents) with adjacent same-role turns merged.

    Gemini wants user and model turns to alternate, and all responses to one turn's parallel function
    calls in a single content, so consecutive messages of one role become one content.
    """
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id → function name, for tool results
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise TranslationError("each message must be an object", param=where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(_text_parts(content, f"{where}.content"))
            continue
        if role == "user":
            gemini_role, parts = "user", _user_parts(content, f"{where}.content")
        elif role == "assistant":
            gemini_role, parts = "model", _assistant_parts(message, where, call_names)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            name = name or (message["name"] if isinstance(message.get("name"), str) else None)
            if name is None:
                raise TranslationError(
                    "a tool message's tool_call_id must match a tool call of an earlier assistant message",
                    param=f"{where}.tool_call_id",
                )
            gemini_role, parts = "user", [_function_response(name, content, f"{where}.content")]
        elif role == "function":  # the legacy function-calling message
            name = message.get("name")
            if not isinstance(name, str):
                raise TranslationError("a function message needs a name", param=f"{where}.name")
            gemini_role, parts = "user", [_function_response(name, content, f"{where}.content")]
        else:
            raise TranslationError(f"unsupported message role {str(role)[:40]!r}", param=f"{where}.role")
        if not parts:
            continue
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    return system, contents


def _text_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if isinstance(content, list):
        parts = []
        for index, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str) and text:
                    parts.append({"text": text})
                continue
            raise TranslationError("only text parts are allowed here", param=f"{where}[{index}]")
        return parts
    raise TranslationError("content must be a string or an array of parts", param=where)


def _user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return _text_parts(content, where)
    if not isinstance(content, list):
        raise TranslationError("content must be a string or an array of parts", param=where)
    parts = []
    for index, part in enumerate(content):
        part_where = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.extend(_text_parts([part], where))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise TranslationError("image_url.url must be a string", param=f"{part_where}.image_url")
            parts.append(_image_part(url, f"{part_where}.image_url.url"))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            data = audio.get("data") if isinstance(audio, dict) else None
            audio_format = audio.get("format") if isinstance(audio, dict) else None
            if not isinstance(data, str) or audio_format not in _AUDIO_FORMATS:
                raise TranslationError(
                    "input_audio needs base64 data and a format of 'wav' or 'mp3'", param=f"{part_where}.input_audio"
                )
            blob = _b64decode(data, f"{part_where}.input_audio.data")
            parts.append({"inline_data": {"mime_type": _AUDIO_FORMATS[audio_format], "data": blob}})
        elif kind == "file":
            file = part.get("file")
            data = file.get("file_data") if isinstance(file, dict) else None
            if not isinstance(data, str) or not data.startswith("data:"):
                raise TranslationError(
                    "file parts need file.file_data as a data: URL (file_id is not supported)",
                    param=f"{part_where}.file",
                )
            parts.append(_data_url_part(data, f"{part_where}.file.file_data"))
        else:
            raise TranslationError(
                f"unsupported content part type {str(kind)[:40]!r}", param=part_where, code="unsupported_parameter"
            )
    return parts


def _image_part(url: str, where: str) -> dict[str, Any]:
    if url.startswith("data:"):
        return _data_url_part(url, where)
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise TranslationError("invalid image URL", param=where) from None
    if parts.scheme in ("http", "https") and hostname:
        # Google fetches the URL itself (public URLs and Files API URIs); we never fetch for the client.
        mime_type, _ = mimetypes.guess_type(parts.path)
        if mime_type is None or not mime_type.startswith("image/"):
            mime_type = "image/jpeg"
        return {"file_data": {"file_uri": url, "mime_type": mime_type}}
    raise TranslationError("image URLs must be data: URLs or http(s) URLs", param=where)


def _data_url_part(url: str, where: str) -> dict[str, Any]:
    header, comma, data = url.partition(",")
    media = header[len("data:") :]
    if not comma or not media.endswith(";base64"):
        raise TranslationError("data: URLs must be base64-encoded (data:<mime>;base64,...)", param=where)
    mime_type = media[: -len(";base64")].split(";")[0].strip() or "application/octet-stream"
    return {"inline_data": {"mime_type": mime_type, "data": _b64decode(data, where)}}


def _b64decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise TranslationError("invalid base64 data", param=where) from None


def _assistant_parts(message: Mapping[str, Any], where: str, call_names: dict[str, str]) -> list[dict[str, Any]]:
    parts = _text_parts(message.get("content"), f"{where}.content")
    calls = message.get("tool_calls")
    if calls is None and isinstance(message.get("function_call"), dict):
        calls = [{"id": None, "type": "function", "function": message["function_call"]}]
    if calls is None:
        return parts
    if not isinstance(calls, list):
        raise TranslationError("tool_calls must be an array", param=f"{where}.tool_calls")
    for index, call in enumerate(calls):
        call_where = f"{where}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TranslationError("a tool call needs function.name", param=call_where)
        args = _arguments(function.get("arguments"), f"{call_where}.function.arguments")
        part: dict[str, Any] = {"function_call": {"name": function["name"], "args": args}}
        signature = _thought_signature(call, f"{call_where}.extra_content")
        if signature is not None:
            part["thought_signature"] = signature
        parts.append(part)
        call_id = call.get("id")
        if isinstance(call_id, str):
            call_names[call_id] = function["name"]
    return parts


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            args = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TranslationError("tool call arguments are not valid JSON", param=where) from None
        if isinstance(args, dict):
            return args
    raise TranslationError("tool call arguments must be a JSON object", param=where)


def _thought_signature(call: Mapping[str, Any], where: str) -> bytes | None:
    """The Gemini thought signature an earlier answer attached to this tool call, if the client kept it."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    if signature is None:
        return None
    if not isinstance(signature, str):
        raise TranslationError("thought_signature must be a base64 string", param=where)
    return _b64decode(signature.replace("-", "+").replace("_", "/"), where)


def _function_response(name: str, content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, list):
        text = "".join(part["text"] for part in _text_parts(content, where))
    elif isinstance(content, str):
        text = content
    elif content is None:
        text = ""
    else:
        raise TranslationError("tool message content must be a string or text parts", param=where)
    try:
        value: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = text
    # Gemini takes an object; a tool's JSON object result goes as is, anything else under "result".
    response = value if isinstance(value, dict) else {"result": value}
    return {"function_response": {"name": name, "response": response}}


def _validation_summary(exc: pydantic.ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    summary = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in errors[:3])
    return summary[:300]
