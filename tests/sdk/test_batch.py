"""The OpenAI Batch API as the official `openai` Python SDK drives it against Marga:
files.create (multipart upload), batches.create, batches.retrieve polling until completed,
files.content of the output and error files, batches.list, batches.cancel and files.delete.
Items run through the real router on the mock upstream and the built-in sandbox.
"""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from conftest import Mock

POLL_TIMEOUT_S = 60.0


def _jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def _chat_line(custom_id: str, model: str, text: str) -> dict:
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _wait(client: openai.OpenAI, batch_id: str) -> "openai.types.Batch":
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.1)


def test_batch_flow_end_to_end(client: openai.OpenAI, mock_a: Mock) -> None:
    lines = [_chat_line(f"req-{i}", "test/openai", f"question {i}") for i in range(4)]
    lines.append(_chat_line("echo", "sandbox/echo", "echo me"))
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert uploaded.object == "file"
    assert uploaded.purpose == "batch"
    assert uploaded.filename == "requests.jsonl"
    assert uploaded.bytes == len(_jsonl(lines))
    assert client.files.retrieve(uploaded.id).id == uploaded.id

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "sdk"},
    )
    assert batch.object == "batch"
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.metadata == {"suite": "sdk"}

    done = _wait(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 5, 0)
    assert done.output_file_id and done.error_file_id is None
    assert done.completed_at and done.in_progress_at and done.created_at <= done.completed_at

    output = client.files.content(done.output_file_id).text
    results = [json.loads(line) for line in output.splitlines()]
    assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(4)] + ["echo"]
    for r in results:
        assert r["error"] is None
        assert r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"]
    assert mock_a.requests_to("/v1/chat/completions") == 4

    assert batch.id in [b.id for b in client.batches.list(limit=10).data]


def test_batch_errors_land_in_the_error_file(client: openai.OpenAI) -> None:
    bad = {"model": "sandbox/echo", "temperature": 9, "messages": [{"role": "user", "content": "x"}]}
    lines = [_chat_line("ok", "sandbox/echo", "fine"), {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": bad}]
    uploaded = client.files.create(file=("mixed.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = _wait(client, batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert errors[0]["custom_id"] == "bad"
    assert errors[0]["response"]["status_code"] == 400
    assert "temperature" in errors[0]["response"]["body"]["error"]["message"]


def test_invalid_batch_file_is_refused_naming_the_line(client: openai.OpenAI) -> None:
    content = _jsonl([_chat_line("a", "sandbox/echo", "x")]) + b"{not json\n"
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("broken.jsonl", content), purpose="batch")
    assert "line 2" in str(raised.value)


def test_cancel_and_delete(client: openai.OpenAI, mock_a: Mock) -> None:
    mock_a.scenario(delay_ms=200)
    lines = [_chat_line(f"slow-{i}", "test/openai", "slow") for i in range(200)]
    uploaded = client.files.create(file=("slow.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id)
    assert done.status == "cancelled"
    assert done.request_counts.completed < 200
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
