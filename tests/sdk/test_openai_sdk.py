"""Marga as the official `openai` Python SDK sees it: every adapter (OpenAI, Anthropic and
Gemini wire formats on the mock upstream, and the built-in sandbox) through chat, streaming,
tools, embeddings, legacy completions and the model list, and the errors the SDK raises.

The stack (gateway + two mock upstreams) is started once by conftest.py; both mocks are
reset before every test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import openai
import pytest

from conftest import Gateway, Mock

PROMPT = "Say hello to the SDK test"
MESSAGES = [{"role": "user", "content": PROMPT}]

# Public model id -> provider id the gateway reports in `x-br-provider`.
CHAT_MODELS = {
    "test/openai": "mock-openai",
    "test/anthropic": "mock-anthropic",
    "test/gemini": "mock-gemini",
    "sandbox/echo": "sandbox",
}
MOCKED = ["test/openai", "test/anthropic", "test/gemini"]
EMBEDDING_MODELS = ["test/openai-embed", "test/gemini-embed", "sandbox/embed"]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City name"}},
            "required": ["location"],
        },
    },
}


def mock_reply(user_text: str) -> str:
    """What mock-upstream answers when the last user text is `user_text`."""
    return "Mock reply to: " + user_text[:40]


def check_reply(model: str, content: str | None) -> None:
    assert content is not None
    if model.startswith("sandbox/"):
        assert "sandbox" in content
        assert PROMPT in content
    else:
        assert content == mock_reply(PROMPT)


def check_usage(usage: Any) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def collect_stream(stream: Any) -> tuple[str, list[Any]]:
    """Joined delta content and every chunk of a chat stream."""
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


chat_models = pytest.mark.parametrize("model", list(CHAT_MODELS))


# ---------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------


@chat_models
def test_chat_non_stream(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    assert completion.id.startswith("gen-")
    assert completion.object == "chat.completion"
    assert completion.model == model
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    check_reply(model, choice.message.content)
    check_usage(completion.usage)


@chat_models
def test_chat_stream_with_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, chunks = collect_stream(stream)
    check_reply(model, text)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("gen-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # The last chunk carries the usage and no choices (OpenAI's include_usage shape).
    last = chunks[-1]
    assert last.choices == []
    check_usage(last.usage)
    assert sum(1 for c in chunks if c.usage is not None) == 1


@chat_models
def test_chat_stream_without_stream_options(client: openai.OpenAI, model: str) -> None:
    """Without include_usage the SDK still iterates cleanly to the end (a usage chunk, if
    the gateway sends one anyway, has no choices and must not break a naive consumer)."""
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    text, chunks = collect_stream(stream)
    check_reply(model, text)
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    assert stream.response.is_closed


@chat_models
def test_stream_as_context_manager_closed_early(client: openai.OpenAI, model: str) -> None:
    """Leaving a stream after the first content chunk closes it without error, and the next
    request on the same client works."""
    with client.chat.completions.create(model=model, messages=MESSAGES, stream=True) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    check_reply(model, completion.choices[0].message.content)


@chat_models
def test_tools_non_stream(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    if model in MOCKED:
        assert arguments == {"location": "Paris"}


@chat_models
def test_tools_stream(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert finish == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["id"]
    assert calls[0]["name"] == "get_weather"
    arguments = json.loads(calls[0]["arguments"])
    assert isinstance(arguments, dict)
    if model in MOCKED:
        assert arguments == {"location": "Paris"}
    assert usage is not None


@chat_models
def test_tool_result_round_trip(client: openai.OpenAI, model: str) -> None:
    """The second turn: the assistant's tool call and the tool's result go back upstream."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
    ]
    completion = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    content = choice.message.content or ""
    if model in MOCKED:
        assert content.startswith("Tool said: ")
        assert "Sunny, 21C" in content
    else:
        assert "sandbox" in content


@chat_models
def test_raw_response_headers(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    assert raw.status_code == 200
    completion = raw.parse()
    assert raw.headers["x-br-provider"] == CHAT_MODELS[model]
    assert raw.headers["x-br-model"] == model
    assert raw.headers["x-generation-id"] == completion.id
    assert completion.id.startswith("gen-")


@chat_models
def test_raw_response_headers_stream(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-br-provider"] == CHAT_MODELS[model]
    text, chunks = collect_stream(raw.parse())
    check_reply(model, text)
    assert {c.id for c in chunks} == {raw.headers["x-generation-id"]}


def test_generation_ids_are_unique(client: openai.OpenAI) -> None:
    ids = {client.chat.completions.create(model="test/openai", messages=MESSAGES).id for _ in range(5)}
    assert len(ids) == 5


def test_async_client_stream(gateway: Gateway) -> None:
    """The async client (a separate code path in the SDK) streams through the gateway."""

    async def run() -> tuple[str, Any]:
        async with gateway.async_client() as client:
            stream = await client.chat.completions.create(
                model="test/anthropic", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage is not None:
                    usage = chunk.usage
            return text, usage

    text, usage = asyncio.run(run())
    assert text == mock_reply(PROMPT)
    check_usage(usage)


def test_api_v1_base_path(gateway: Gateway) -> None:
    """OpenRouter's base path `/api/v1` serves the same API."""
    client = gateway.client(base_url=gateway.base_url.replace("/v1", "/api/v1"))
    completion = client.chat.completions.create(model="test/openai", messages=MESSAGES)
    assert completion.choices[0].message.content == mock_reply(PROMPT)


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", EMBEDDING_MODELS)
def test_embeddings_sdk_default(client: openai.OpenAI, model: str) -> None:
    """The SDK asks for base64 unless told otherwise and decodes it to floats."""
    response = client.embeddings.create(model=model, input="The food was delicious")
    assert response.object == "list"
    assert response.model == model
    assert len(response.data) == 1
    vector = response.data[0].embedding
    assert isinstance(vector, list) and len(vector) > 0
    assert all(isinstance(x, float) for x in vector)
    assert any(x != 0.0 for x in vector)
    assert response.usage.prompt_tokens > 0


@pytest.mark.parametrize("model", EMBEDDING_MODELS)
def test_embeddings_batch_float(client: openai.OpenAI, model: str) -> None:
    inputs = ["first text", "second text", "first text"]
    response = client.embeddings.create(model=model, input=inputs, encoding_format="float")
    assert [d.index for d in response.data] == [0, 1, 2]
    vectors = [d.embedding for d in response.data]
    assert all(isinstance(v, list) and len(v) == len(vectors[0]) > 0 for v in vectors)
    assert vectors[0] == vectors[2]  # deterministic
    assert vectors[0] != vectors[1]


@pytest.mark.parametrize("model", EMBEDDING_MODELS)
def test_embeddings_explicit_base64(client: openai.OpenAI, model: str) -> None:
    """`encoding_format="base64"` asked for explicitly: the SDK hands back the string, which
    must decode (little-endian float32) to the same vector as the float answer."""
    text = "base64 please"
    floats = client.embeddings.create(model=model, input=text, encoding_format="float").data[0].embedding
    encoded = client.embeddings.create(model=model, input=text, encoding_format="base64").data[0].embedding
    assert isinstance(encoded, str), f"expected a base64 string, got {type(encoded).__name__}"
    raw = base64.b64decode(encoded)
    assert len(raw) == 4 * len(floats)
    decoded = struct.unpack(f"<{len(floats)}f", raw)
    assert decoded == pytest.approx(floats, rel=1e-6, abs=1e-7)


def test_embeddings_headers(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model="test/gemini-embed", input="hi", encoding_format="float")
    raw.parse()
    assert raw.headers["x-br-provider"] == "mock-gemini"
    assert raw.headers["x-generation-id"].startswith("gen-")


# ---------------------------------------------------------------------------------------
# Legacy completions, models
# ---------------------------------------------------------------------------------------


def test_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="test/openai", prompt=PROMPT, max_tokens=64)
    assert completion.id.startswith("gen-")
    assert completion.model == "test/openai"
    assert completion.choices[0].text == mock_reply(PROMPT)
    check_usage(completion.usage)


def test_legacy_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="test/openai", prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == mock_reply(PROMPT)
    assert all(c.id.startswith("gen-") for c in chunks)
    check_usage(chunks[-1].usage)


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    for model in [*CHAT_MODELS, *EMBEDDING_MODELS, "test/failover"]:
        assert model in models, f"{model} missing from /v1/models"
    assert models["test/openai"].object == "model"
    assert models["test/openai"].owned_by == "test"


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve("test/openai")
    assert model.id == "test/openai"
    assert model.object == "model"
    extra = model.model_extra or {}
    assert [r["provider"] for r in extra["routes"]] == ["mock-openai"]


def test_models_retrieve_unknown(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("test/does-not-exist")


# ---------------------------------------------------------------------------------------
# Errors as the SDK sees them
# ---------------------------------------------------------------------------------------


def test_wrong_key_is_authentication_error(gateway: Gateway) -> None:
    client = gateway.client(api_key="sk-wrong-key")
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="test/openai", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="test/openai-embed", input="x")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="test/openai", messages=MESSAGES, stream=True)


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="test/nope", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="test/nope", messages=MESSAGES, stream=True)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ],
    ids=["temperature", "top_p", "empty-messages", "bad-role"],
)
def test_bad_parameter_is_bad_request(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    request: dict[str, Any] = {"model": "test/openai", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == 400
    assert info.value.param == param


def test_embedding_model_on_chat_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="test/openai-embed", messages=MESSAGES)
    assert info.value.param == "model"


def test_failover_is_invisible(client: openai.OpenAI, mock_a: Mock, mock_b: Mock) -> None:
    mock_a.scenario(fail_first=1_000_000, fail_status=503)
    raw = client.chat.completions.with_raw_response.create(model="test/failover", messages=MESSAGES)
    completion = raw.parse()
    assert raw.headers["x-br-provider"] == "backup"
    assert completion.choices[0].message.content == mock_reply(PROMPT)
    assert completion.model == "test/failover"
    check_usage(completion.usage)
    assert mock_a.requests_to("/v1/chat/completions") == 1
    assert mock_b.requests_to("/v1/chat/completions") == 1


def test_failover_is_invisible_stream(client: openai.OpenAI, mock_a: Mock, mock_b: Mock) -> None:
    mock_a.scenario(fail_first=1_000_000, fail_status=503)
    raw = client.chat.completions.with_raw_response.create(
        model="test/failover", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-br-provider"] == "backup"
    text, chunks = collect_stream(raw.parse())
    assert text == mock_reply(PROMPT)
    check_usage(chunks[-1].usage)
    assert mock_b.requests_to("/v1/chat/completions") == 1


def test_mid_stream_failure_raises(client: openai.OpenAI, mock_a: Mock) -> None:
    """After content has reached the client there is no silent switch: the gateway sends an
    in-band error event and closes without [DONE], and the SDK raises instead of returning a
    truncated answer as if it were complete."""
    mock_a.scenario(cut_after_chunks=2)
    stream = client.chat.completions.create(model="test/openai", messages=MESSAGES, stream=True)
    received = ""
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
    assert received and mock_reply(PROMPT).startswith(received) and received != mock_reply(PROMPT)
    assert "interrupted" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body.get("code") == "stream_interrupted"


def test_all_routes_failing_is_502(client: openai.OpenAI, mock_a: Mock, mock_b: Mock) -> None:
    mock_a.scenario(fail_first=1_000_000, fail_status=503)
    mock_b.scenario(fail_first=1_000_000, fail_status=500)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="test/failover", messages=MESSAGES)
    assert info.value.status_code == 502
    assert isinstance(info.value, openai.InternalServerError)
    assert info.value.code == "all_routes_failed"
    # Streaming fails the same way, before any byte of the stream is sent.
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="test/failover", messages=MESSAGES, stream=True)
    assert info.value.status_code == 502
    assert mock_a.requests_to("/v1/chat/completions") == 2
    assert mock_b.requests_to("/v1/chat/completions") == 2


@pytest.mark.parametrize("model", MOCKED)
def test_upstream_429_is_rate_limit_error(gateway: Gateway, mock_a: Mock, model: str) -> None:
    client = gateway.client(max_retries=0)
    mock_a.scenario(fail_first=1_000_000, fail_status=429, retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES)
    assert info.value.status_code == 429
    assert info.value.response.headers.get("retry-after") == "7"
    assert mock_a.stats()["requests"] == 1
