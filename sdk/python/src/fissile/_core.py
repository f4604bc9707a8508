"""What the sync and async clients share: configuration, the requests each operation makes,
retry policy, and turning streamed NDJSON events into results. The two clients differ only in
how they send (httpx.Client vs httpx.AsyncClient)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import FissileError, SandboxError, TemplateBuildError
from ._models import (
    CommandResult,
    Execution,
    ExecutionError,
    NetworkPolicy,
    Result,
    TemplateInfo,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TEMPLATE = "python-datasci"
DEFAULT_CELL_TIMEOUT = 300.0
"""Seconds a cell may run unless `run_code(timeout=...)` says otherwise."""
DEFAULT_REQUEST_TIMEOUT = 600.0
"""Seconds a non-streamed request may take (creating a sandbox boots a microVM)."""
STREAM_MARGIN = 60.0
"""Extra seconds a stream may stay silent beyond its cell's or command's own limit."""
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_DELAYS = (0.25, 1.0, 3.0)
"""Backoff before each retry of an idempotent request."""


@dataclass(frozen=True)
class Config:
    """Where the daemon is and which key to present."""

    base_url: str
    api_key: str | None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    @staticmethod
    def resolve(api_key: str | None, base_url: str | None, request_timeout: float | None) -> Config:
        """Arguments first, then `FISSILE_API_KEY` / `FISSILE_API_URL`, then defaults."""
        return Config(
            base_url=(base_url or os.environ.get("FISSILE_API_URL") or DEFAULT_BASE_URL).rstrip(
                "/"
            ),
            api_key=api_key or os.environ.get("FISSILE_API_KEY"),
            request_timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT,
        )

    def headers(self) -> dict[str, str]:
        """Headers of every request."""
        h = {"User-Agent": "fissile-python/0.1.0"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


@dataclass
class Call:
    """One HTTP request of an operation."""

    method: str
    path: str
    json: Any = None
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    idempotent: bool = False
    """Safe to retry after a 429, a 5xx or a dropped connection."""
    timeout: float | None = None
    """Read timeout (between bytes of a stream); `None`: the config's request timeout."""


def transport_failure(call: Call, e: Exception) -> str:
    """The message of a failed connection to the daemon (httpx's own can be empty)."""
    detail = str(e) or "no detail"
    return (
        f"{call.method} {call.path}: the connection to fissiled failed "
        f"({type(e).__name__}: {detail})"
    )


def retry_delay(call: Call, attempt: int, status: int | None) -> float | None:
    """Seconds to wait before retrying `call` after try number `attempt` (0-based) ended in
    `status` (`None`: the connection dropped), or `None` for no retry."""
    if not call.idempotent or attempt >= len(RETRY_DELAYS):
        return None
    if status is None or status in RETRY_STATUSES:
        return RETRY_DELAYS[attempt]
    return None


def create_call(
    *,
    template: str,
    persistent: bool,
    memory_mib: int | None,
    vcpus: int | None,
    idle_timeout: int | None,
    metadata: Mapping[str, str] | None,
    envs: Mapping[str, str] | None,
    from_snapshot: str | None,
    network: NetworkPolicy | None = None,
    max_lifetime: int | None = None,
) -> Call:
    """`POST /v1/sandboxes`."""
    body: dict[str, Any] = {"template": template, "persistent": persistent}
    if memory_mib is not None:
        body["memory_mib"] = memory_mib
    if vcpus is not None:
        body["vcpus"] = vcpus
    if idle_timeout is not None:
        body["idle_timeout_s"] = idle_timeout
    if max_lifetime is not None:
        body["max_lifetime_s"] = max_lifetime
    if metadata:
        body["metadata"] = dict(metadata)
    if envs:
        body["env"] = dict(envs)
    if from_snapshot is not None:
        body["from_snapshot"] = from_snapshot
    if network is not None:
        body["network"] = network.model_dump()
    return Call("POST", "/v1/sandboxes", json=body)


TEMPLATE_BUILD_TIMEOUT = 4 * 3600.0
"""Seconds a template build's stream may stay silent (a command may run that long)."""


def template_build_call(spec: str, network: NetworkPolicy | None) -> Call:
    """`POST /v1/templates` (NDJSON progress)."""
    body: dict[str, Any] = {"spec": spec}
    if network is not None:
        body["network"] = network.model_dump()
    return Call("POST", "/v1/templates", json=body, timeout=TEMPLATE_BUILD_TIMEOUT)


def network_call(sandbox_id: str, policy: NetworkPolicy) -> Call:
    """`PATCH /v1/sandboxes/{id}/network` (answers the sandbox's new view)."""
    return Call("PATCH", f"/v1/sandboxes/{sandbox_id}/network", json=policy.model_dump())


def network_counters_call(sandbox_id: str) -> Call:
    """`GET /v1/sandboxes/{id}/network` (its policy and counters)."""
    return Call("GET", f"/v1/sandboxes/{sandbox_id}/network")


def exec_call(
    sandbox_id: str, code: str, timeout: float | None, envs: Mapping[str, str] | None
) -> Call:
    """`POST /v1/sandboxes/{id}/exec` (streamed)."""
    body: dict[str, Any] = {"code": code}
    if timeout is not None:
        body["timeout_s"] = timeout
    if envs:
        body["env"] = dict(envs)
    return Call(
        "POST",
        f"/v1/sandboxes/{sandbox_id}/exec",
        json=body,
        timeout=None if timeout is None else timeout + STREAM_MARGIN,
    )


def command_call(
    sandbox_id: str,
    cmd: str | list[str],
    cwd: str | None,
    envs: Mapping[str, str] | None,
    timeout: float | None,
    stdin: str | None,
) -> Call:
    """`POST /v1/sandboxes/{id}/commands` (streamed)."""
    body: dict[str, Any] = {"cmd": cmd}
    if cwd is not None:
        body["cwd"] = cwd
    if envs:
        body["env"] = dict(envs)
    if timeout is not None:
        body["timeout_s"] = timeout
    if stdin is not None:
        body["stdin"] = stdin
    return Call(
        "POST",
        f"/v1/sandboxes/{sandbox_id}/commands",
        json=body,
        timeout=None if timeout is None else timeout + STREAM_MARGIN,
    )


OutputHandler = Callable[[str], Any]
ResultHandler = Callable[[Result], Any]
ErrorHandler = Callable[[ExecutionError], Any]


@dataclass
class ExecutionBuilder:
    """Collects a cell's events into an `Execution`, calling the handlers as each arrives."""

    on_stdout: OutputHandler | None = None
    on_stderr: OutputHandler | None = None
    on_result: ResultHandler | None = None
    on_error: ErrorHandler | None = None
    execution: Execution = field(default_factory=Execution)
    done: bool = False

    def feed(self, event: dict[str, Any]) -> None:
        """One NDJSON event."""
        kind = event.get("type")
        ex = self.execution
        if kind == "stdout":
            ex.logs.stdout.append(event["text"])
            if self.on_stdout:
                self.on_stdout(event["text"])
        elif kind == "stderr":
            ex.logs.stderr.append(event["text"])
            if self.on_stderr:
                self.on_stderr(event["text"])
        elif kind == "result":
            r = Result(
                data=event.get("data", {}), is_main_result=event.get("is_main_result", False)
            )
            ex.results.append(r)
            if self.on_result:
                self.on_result(r)
        elif kind == "error":
            err = ExecutionError(
                name=event["name"], value=event["value"], traceback=event.get("traceback", [])
            )
            ex.error = err
            if self.on_error:
                self.on_error(err)
        elif kind == "done":
            ex.execution_count = event.get("execution_count", 0)
            ex.duration_ms = event.get("duration_ms", 0.0)
            ex.server_ms = event.get("server_ms", 0.0)
            ex.timed_out = event.get("timed_out", False)
            ex.state_lost = event.get("state_lost", False)
            self.done = True
        elif kind == "failed":
            raise SandboxError(f"the sandbox stopped answering: {event.get('message', '')}")

    def finish(self) -> Execution:
        """The execution, once the stream ended."""
        if not self.done:
            raise SandboxError("the cell's stream ended before it finished")
        return self.execution


@dataclass
class CommandBuilder:
    """Collects a command's events into a `CommandResult`, calling the handlers as they come."""

    on_stdout: OutputHandler | None = None
    on_stderr: OutputHandler | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    result: CommandResult | None = None

    def feed(self, event: dict[str, Any]) -> None:
        """One NDJSON event."""
        kind = event.get("type")
        if kind == "stdout":
            self.stdout.append(event["text"])
            if self.on_stdout:
                self.on_stdout(event["text"])
        elif kind == "stderr":
            self.stderr.append(event["text"])
            if self.on_stderr:
                self.on_stderr(event["text"])
        elif kind == "exit":
            self.result = CommandResult(
                stdout="".join(self.stdout),
                stderr="".join(self.stderr),
                exit_code=event.get("exit_code"),
                signal=event.get("signal"),
                timed_out=event.get("timed_out", False),
                duration_ms=event.get("duration_ms", 0.0),
            )
        elif kind == "failed":
            raise SandboxError(f"the sandbox stopped answering: {event.get('message', '')}")

    def finish(self) -> CommandResult:
        """The result, once the stream ended."""
        if self.result is None:
            raise SandboxError("the command's stream ended before it exited")
        return self.result


@dataclass
class TemplateBuilder:
    """Follows a template build's events: each step and output line to `on_output`, the
    template at `done`, a `TemplateBuildError` at `failed`."""

    on_output: OutputHandler | None = None
    output: list[str] = field(default_factory=list)
    template: TemplateInfo | None = None

    def feed(self, event: dict[str, Any]) -> None:
        """One NDJSON event."""
        kind = event.get("type")
        if kind == "step":
            line = f"==> {event.get('step', '')}\n"
        elif kind in ("stdout", "stderr"):
            line = str(event.get("text", ""))
        elif kind == "done":
            self.template = TemplateInfo.model_validate(event["template"])
            return
        elif kind == "failed":
            raise TemplateBuildError(
                f"the template build failed: {event.get('message', '')}", self.output
            )
        else:
            return
        self.output.append(line)
        if self.on_output:
            self.on_output(line)

    def finish(self) -> TemplateInfo:
        """The template, once the stream ended."""
        if self.template is None:
            raise SandboxError("the template build's stream ended before it finished")
        return self.template


def parse_line(line: str) -> dict[str, Any] | None:
    """One NDJSON line (blank lines skipped)."""
    line = line.strip()
    if not line:
        return None
    try:
        value = json.loads(line)
    except ValueError as e:
        raise FissileError(f"the daemon sent a line that is not JSON: {line[:200]!r}") from e
    if not isinstance(value, dict):
        raise FissileError(f"the daemon sent an event that is not an object: {line[:200]!r}")
    return value


def file_bytes(data: bytes | str) -> bytes:
    """What `files.write` uploads (text as UTF-8)."""
    return data.encode() if isinstance(data, str) else data


def fork_outcome(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Started child ids and per-child errors of a fork's answer."""
    ids: list[str] = []
    errors: list[str] = []
    for c in body.get("children", []):
        if "id" in c:
            ids.append(c["id"])
        else:
            errors.append(str(c.get("error", "unknown error")))
    return ids, errors
