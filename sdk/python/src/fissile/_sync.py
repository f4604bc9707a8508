"""The synchronous client: `Sandbox`, `Templates`."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal, overload
from urllib.parse import quote

import httpx

from . import _core
from ._core import Call, Config, OutputHandler
from ._errors import FissileError, ForkError, NotFoundError, TimeoutError, error_for
from ._models import (
    CommandResult,
    EntryInfo,
    Execution,
    NetworkCounters,
    NetworkPolicy,
    SandboxInfo,
    SpaceInfo,
    TemplateInfo,
)


class _Http:
    """Sends calls with retries (idempotent ones), timeouts and typed errors."""

    def __init__(self, config: Config):
        self.config = config
        self.client = httpx.Client(
            base_url=config.base_url,
            headers=config.headers(),
            timeout=httpx.Timeout(config.request_timeout, connect=10.0),
        )

    def close(self) -> None:
        self.client.close()

    def _timeout(self, call: Call) -> httpx.Timeout:
        read = self.config.request_timeout if call.timeout is None else call.timeout
        return httpx.Timeout(read, connect=10.0)

    def request(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = self.client.request(
                    call.method,
                    call.path,
                    json=call.json,
                    params=call.params,
                    content=call.content,
                    timeout=self._timeout(call),
                )
            except httpx.TimeoutException as e:
                raise TimeoutError(f"{call.method} {call.path}: {e}") from e
            except httpx.TransportError as e:
                delay = _core.retry_delay(call, attempt, None)
                if delay is None:
                    raise FissileError(_core.transport_failure(call, e)) from e
            else:
                if resp.status_code < 400:
                    return resp
                delay = _core.retry_delay(call, attempt, resp.status_code)
                if delay is None:
                    raise error_for(resp.status_code, resp.content)
            time.sleep(delay)
            attempt += 1

    def stream(self, call: Call) -> Iterator[dict[str, Any]]:
        try:
            with self.client.stream(
                call.method, call.path, json=call.json, timeout=self._timeout(call)
            ) as resp:
                if resp.status_code >= 400:
                    raise error_for(resp.status_code, resp.read())
                for line in resp.iter_lines():
                    event = _core.parse_line(line)
                    if event is not None:
                        yield event
        except httpx.TimeoutException as e:
            raise TimeoutError(f"{call.method} {call.path}: {e}") from e
        except httpx.TransportError as e:
            raise FissileError(_core.transport_failure(call, e)) from e


class Commands:
    """Commands in a sandbox (`sandbox.commands`)."""

    def __init__(self, sandbox: Sandbox):
        self._sb = sandbox

    def run(
        self,
        cmd: str | list[str],
        *,
        cwd: str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout: float | None = 60.0,
        stdin: str | None = None,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
    ) -> CommandResult:
        """Runs `cmd` (a shell script, or a program and its arguments) to its end; output
        is passed to the handlers as it arrives. A non-zero exit is data (`exit_code`)."""
        b = _core.CommandBuilder(on_stdout=on_stdout, on_stderr=on_stderr)
        call = _core.command_call(self._sb.id, cmd, cwd, envs, timeout, stdin)
        for event in self._sb._http.stream(call):
            b.feed(event)
        return b.finish()


class Files:
    """Files in a sandbox (`sandbox.files`), binary-safe."""

    def __init__(self, sandbox: Sandbox):
        self._sb = sandbox

    def write(self, path: str, data: bytes | str) -> int:
        """Writes a whole file (absolute path; parents are created); returns its size."""
        call = Call(
            "PUT",
            f"/v1/sandboxes/{self._sb.id}/files",
            params={"path": path},
            content=_core.file_bytes(data),
            idempotent=True,
        )
        return int(self._sb._http.request(call).json()["size"])

    @overload
    def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"]) -> bytes: ...

    def read(self, path: str, format: Literal["text", "bytes"] = "text") -> str | bytes:
        """Reads a whole file, as text (UTF-8) or bytes. A missing file is `NotFoundError`."""
        call = Call(
            "GET", f"/v1/sandboxes/{self._sb.id}/files", params={"path": path}, idempotent=True
        )
        content = self._sb._http.request(call).content
        return content if format == "bytes" else content.decode()

    def list(self, path: str) -> list[EntryInfo]:
        """The entries of a directory, by name."""
        call = Call(
            "GET",
            f"/v1/sandboxes/{self._sb.id}/files/list",
            params={"path": path},
            idempotent=True,
        )
        return [EntryInfo.model_validate(e) for e in self._sb._http.request(call).json()["entries"]]

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file (a directory only with `recursive`)."""
        params = {"path": path, "recursive": "true" if recursive else "false"}
        call = Call("DELETE", f"/v1/sandboxes/{self._sb.id}/files", params=params, idempotent=True)
        self._sb._http.request(call)


class Sandbox:
    """A running sandbox: a microVM with a persistent Python REPL.

    `Sandbox()` creates one (from the template, or `from_snapshot`); `Sandbox.connect(id)`
    attaches to a running one, `Sandbox.resume(space_id)` resumes a persistent space. Use it
    as a context manager, or call `close()` (idempotent): a persistent sandbox is persisted
    into its space, others are discarded. The API key and URL default to `FISSILE_API_KEY`
    and `FISSILE_API_URL`."""

    def __init__(
        self,
        template: str = _core.DEFAULT_TEMPLATE,
        *,
        persistent: bool = False,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        idle_timeout: int | None = None,
        max_lifetime: int | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        from_snapshot: str | None = None,
        network: NetworkPolicy | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        request_timeout: float | None = None,
        _info: SandboxInfo | None = None,
    ):
        self._config = Config.resolve(api_key, base_url, request_timeout)
        self._http = _Http(self._config)
        self._closed = False
        if _info is None:
            try:
                call = _core.create_call(
                    template=template,
                    persistent=persistent,
                    memory_mib=memory_mib,
                    vcpus=vcpus,
                    idle_timeout=idle_timeout,
                    max_lifetime=max_lifetime,
                    metadata=metadata,
                    envs=envs,
                    from_snapshot=from_snapshot,
                    network=network,
                )
                _info = SandboxInfo.model_validate(self._http.request(call).json())
            except BaseException:
                self._http.close()
                raise
        self._info = _info
        self.commands = Commands(self)
        self.files = Files(self)

    @property
    def id(self) -> str:
        """The sandbox id."""
        return self._info.id

    @property
    def space_id(self) -> str | None:
        """The persistent space it runs (`None` unless persistent)."""
        return self._info.space_id

    @property
    def network(self) -> NetworkPolicy | None:
        """Its egress policy (`None`: it reaches nothing outside its sandbox)."""
        return self._info.network

    def set_network(self, policy: NetworkPolicy) -> None:
        """Puts `policy` in force at once: the guest's next connections follow it (open ones
        keep going); forks made later inherit it."""
        resp = self._http.request(_core.network_call(self.id, policy))
        self._info = SandboxInfo.model_validate(resp.json())

    def network_counters(self) -> NetworkCounters:
        """What its network rules counted so far: connections its policy blocked, connections
        over the daemon's cap, packets and bytes dropped over its bandwidth cap."""
        resp = self._http.request(_core.network_counters_call(self.id))
        return NetworkCounters.model_validate(resp.json()["counters"])

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, space_id={self.space_id!r})"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _child(self, info: SandboxInfo) -> Sandbox:
        return Sandbox(
            api_key=self._config.api_key,
            base_url=self._config.base_url,
            request_timeout=self._config.request_timeout,
            _info=info,
        )

    @classmethod
    def connect(
        cls, sandbox_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> Sandbox:
        """Attaches to the running sandbox `sandbox_id`."""
        body = _one(
            Config.resolve(api_key, base_url, None),
            Call("GET", f"/v1/sandboxes/{sandbox_id}", idempotent=True),
        )
        return cls(api_key=api_key, base_url=base_url, _info=SandboxInfo.model_validate(body))

    @classmethod
    def resume(
        cls, space_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> Sandbox:
        """Resumes persistent space `space_id`: a sandbox with its Python globals, or the
        sandbox already running it."""
        body = _one(
            Config.resolve(api_key, base_url, None),
            Call("POST", f"/v1/spaces/{space_id}/resume", idempotent=True),
        )
        return cls(api_key=api_key, base_url=base_url, _info=SandboxInfo.model_validate(body))

    @staticmethod
    def list(
        *,
        metadata: Mapping[str, str] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> list[SandboxInfo]:
        """The caller's sandboxes (running and lost), optionally only those with these
        labels."""
        params = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        body = _one(
            Config.resolve(api_key, base_url, None),
            Call("GET", "/v1/sandboxes", params=params, idempotent=True),
        )
        return [SandboxInfo.model_validate(s) for s in body]

    @staticmethod
    def spaces(
        *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[SpaceInfo]:
        """The caller's persistent spaces."""
        body = _one(
            Config.resolve(api_key, base_url, None), Call("GET", "/v1/spaces", idempotent=True)
        )
        return [SpaceInfo.model_validate(s) for s in body]

    def info(self) -> SandboxInfo:
        """The sandbox as the daemon reports it now."""
        resp = self._http.request(Call("GET", f"/v1/sandboxes/{self.id}", idempotent=True))
        self._info = SandboxInfo.model_validate(resp.json())
        return self._info

    def run_code(
        self,
        code: str,
        *,
        on_stdout: OutputHandler | None = None,
        on_stderr: OutputHandler | None = None,
        on_result: _core.ResultHandler | None = None,
        on_error: _core.ErrorHandler | None = None,
        timeout: float | None = _core.DEFAULT_CELL_TIMEOUT,
        envs: Mapping[str, str] | None = None,
    ) -> Execution:
        """Runs a cell in the persistent REPL. Handlers fire as output arrives; an exception
        in the code is `Execution.error`, not raised. On `timeout` (seconds; `None`: no
        limit) the cell gets a KeyboardInterrupt and the REPL keeps its state."""
        b = _core.ExecutionBuilder(
            on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result, on_error=on_error
        )
        for event in self._http.stream(_core.exec_call(self.id, code, timeout, envs)):
            b.feed(event)
        return b.finish()

    def interrupt(self) -> bool:
        """Sends a KeyboardInterrupt to the running cell; True if one was running."""
        call = Call("POST", f"/v1/sandboxes/{self.id}/interrupt", idempotent=True)
        return bool(self._http.request(call).json()["was_running"])

    def fork(self, n: int) -> builtins.list[Sandbox]:
        """Splits into `n` copy-on-write children, each its own sandbox with this one's state
        at the fork; this sandbox keeps running. If some children fail, `ForkError` holds the
        ones that started."""
        body = self._http.request(
            Call("POST", f"/v1/sandboxes/{self.id}/fork", json={"n": n})
        ).json()
        ids, errors = _core.fork_outcome(body)
        children = [
            self._child(SandboxInfo(**{**self._info.model_dump(), "id": i, "space_id": None}))
            for i in ids
        ]
        if errors:
            raise ForkError(
                f"fork({n}): {len(errors)} of the children failed; the first: {errors[0]}",
                children,
                errors,
            )
        return children

    def merge_into(self, winner: Sandbox | str) -> None:
        """Takes the state of `winner`, a child of this sandbox's latest fork: memory, REPL
        globals, files. This sandbox keeps its id; the winner keeps running until closed."""
        wid = winner if isinstance(winner, str) else winner.id
        self._http.request(Call("POST", f"/v1/sandboxes/{self.id}/merge_into/{wid}"))

    def snapshot(self) -> str:
        """A durable checkpoint of this sandbox; returns its id (for `rollback`, or
        `Sandbox(from_snapshot=...)`)."""
        resp = self._http.request(Call("POST", f"/v1/sandboxes/{self.id}/snapshot"))
        return str(resp.json()["snapshot_id"])

    def rollback(self, snapshot_id: str) -> None:
        """Returns this sandbox to one of its own earlier snapshots, keeping its id."""
        self._http.request(Call("POST", f"/v1/sandboxes/{self.id}/rollback/{snapshot_id}"))

    def close(self) -> None:
        """Closes the sandbox (a persistent one is persisted into its space). Idempotent."""
        if self._closed:
            return
        try:
            self._http.request(Call("DELETE", f"/v1/sandboxes/{self.id}", idempotent=True))
        except NotFoundError:
            pass
        finally:
            self._closed = True
            self._http.close()


class Templates:
    """Templates: the daemon's own and the ones you build from a spec (`Templates.build`),
    which `Sandbox(template=name)` then starts from."""

    @staticmethod
    def build(
        spec: str,
        *,
        network: NetworkPolicy | None = None,
        on_output: OutputHandler | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """Builds a template from `spec` (TOML: `name`, `base`, `[apt]`/`[pip]` `packages`,
        `[env]`, `[[files]]`, `[[run]]`, `warmup`) and waits until it is made; each step and
        output line goes to `on_output` as it comes. `network`: what the build's commands may
        reach (e.g. a package index). Raises `TemplateBuildError` (with the output) if it
        fails, `BadRequestError` naming the field for a bad spec."""
        http = _Http(Config.resolve(api_key, base_url, None))
        builder = _core.TemplateBuilder(on_output=on_output)
        try:
            for event in http.stream(_core.template_build_call(spec, network)):
                builder.feed(event)
        finally:
            http.close()
        return builder.finish()

    @staticmethod
    def list(*, api_key: str | None = None, base_url: str | None = None) -> list[TemplateInfo]:
        """The daemon's template and yours, with the state of their ready snapshots."""
        body = _one(
            Config.resolve(api_key, base_url, None), Call("GET", "/v1/templates", idempotent=True)
        )
        return [TemplateInfo.model_validate(t) for t in body]

    @staticmethod
    def delete(name: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
        """Deletes a template you built (its sandboxes run on)."""
        http = _Http(Config.resolve(api_key, base_url, None))
        try:
            http.request(Call("DELETE", f"/v1/templates/{quote(name, safe='')}"))
        finally:
            http.close()


def _one(config: Config, call: Call) -> Any:
    """One call on a short-lived client; its JSON body."""
    http = _Http(config)
    try:
        return http.request(call).json()
    finally:
        http.close()
