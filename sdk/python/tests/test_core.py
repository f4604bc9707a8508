"""The shared core, without a daemon: retries, error mapping, event folding."""

from __future__ import annotations

import httpx
import pytest

from fissile import (
    AuthenticationError,
    NotFoundError,
    RateLimitError,
    SandboxError,
    TemplateBuildError,
)
from fissile._core import (
    Call,
    CommandBuilder,
    ExecutionBuilder,
    TemplateBuilder,
    parse_line,
    retry_delay,
    transport_failure,
)
from fissile._errors import FissileError, error_for


def test_only_idempotent_calls_are_retried_and_only_for_transient_failures() -> None:
    get = Call("GET", "/v1/sandboxes", idempotent=True)
    assert retry_delay(get, 0, None) is not None  # a dropped connection
    assert retry_delay(get, 0, 503) is not None
    assert retry_delay(get, 0, 429) is not None
    assert retry_delay(get, 0, 404) is None
    assert retry_delay(get, 3, 503) is None  # out of retries
    assert retry_delay(Call("POST", "/v1/sandboxes"), 0, 503) is None


def test_error_bodies_map_to_typed_exceptions_with_the_daemons_message() -> None:
    body = b'{"error":{"code":"quota_exceeded","message":"tenant t runs 6 sandboxes"}}'
    e = error_for(429, body)
    assert isinstance(e, RateLimitError)
    assert (e.message, e.code, e.status) == ("tenant t runs 6 sandboxes", "quota_exceeded", 429)
    assert isinstance(error_for(401, b"{}"), AuthenticationError)
    assert isinstance(error_for(404, b"not json"), NotFoundError)
    assert isinstance(error_for(502, b""), SandboxError)
    assert type(error_for(418, b"")) is FissileError


def test_events_fold_into_an_execution_and_handlers_fire_in_order() -> None:
    seen: list[str] = []
    b = ExecutionBuilder(
        on_stdout=lambda t: seen.append("out:" + t), on_error=lambda e: seen.append("err:" + e.name)
    )
    for line in [
        '{"type":"stdout","text":"a"}',
        "",
        '{"type":"result","data":{"text/plain":"1"},"is_main_result":false}',
        '{"type":"error","name":"E","value":"v","traceback":["t"]}',
        '{"type":"result","data":{"text/plain":"2"},"is_main_result":true}',
        '{"type":"done","execution_count":3,"duration_ms":1.5,"server_ms":2.0,'
        '"timed_out":false,"state_lost":false}',
    ]:
        event = parse_line(line)
        if event is not None:
            b.feed(event)
    ex = b.finish()
    assert seen == ["out:a", "err:E"]
    assert ex.text == "2" and ex.execution_count == 3 and len(ex.results) == 2
    assert ex.error is not None and ex.error.traceback_text == "t"


def test_a_stream_that_ends_early_or_fails_raises() -> None:
    b = ExecutionBuilder()
    b.feed({"type": "stdout", "text": "x"})
    with pytest.raises(SandboxError):
        b.finish()
    with pytest.raises(SandboxError, match="gone"):
        CommandBuilder().feed({"type": "failed", "message": "gone"})
    with pytest.raises(FissileError):
        parse_line("[1, 2]")


def test_a_failed_connection_says_what_failed_even_when_httpx_says_nothing() -> None:
    msg = transport_failure(Call("POST", "/v1/sandboxes/sb-1/exec"), httpx.ReadError(""))
    assert msg == (
        "POST /v1/sandboxes/sb-1/exec: the connection to fissiled failed (ReadError: no detail)"
    )


def test_a_template_build_streams_its_output_and_ends_in_the_template_or_an_error() -> None:
    seen: list[str] = []
    b = TemplateBuilder(on_output=seen.append)
    b.feed({"type": "step", "step": "512x1: run[0]: make"})
    b.feed({"type": "stdout", "text": "made\n"})
    with pytest.raises(SandboxError):
        b.finish()
    b.feed(
        {
            "type": "done",
            "build_ms": 5,
            "template": {
                "name": "t",
                "base": "python-datasci",
                "ready": [
                    {"memory_mib": 512, "vcpus": 1, "snapshot": {"status": "ready"}, "warm": 0}
                ],
            },
        }
    )
    t = b.finish()
    assert seen == ["==> 512x1: run[0]: make\n", "made\n"]
    assert t.name == "t" and t.base == "python-datasci" and t.ready[0].ready
    failing = TemplateBuilder()
    failing.feed({"type": "stderr", "text": "boom\n"})
    with pytest.raises(TemplateBuildError, match=r"run\[0\]: exited") as e:
        failing.feed({"type": "failed", "message": "run[0]: exited with status 1"})
    assert e.value.output == ["boom\n"]
