"""The asynchronous client: `AsyncSandbox` and `AsyncTemplates` (same surface as `Sandbox` and
`Templates`, awaitable; for event loops such as the OpenAI Agents SDK's, which must not be
blocked)."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Mapping
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


class _AsyncHttp:
    """Sends calls with retries (idempotent ones), timeouts and typed errors."""

    def __init__(self, config: Config):
        self.config = config
        self.client = httpx.AsyncClient(
            base_url=config.base_url,
            headers=config.headers(),
            timeout=httpx.Timeout(config.request_timeout, connect=10.0),
        )

    async def close(self) -> None:
        await self.client.aclose()

    def _timeout(self, call: Call) -> httpx.Timeout:
        read = self.config.request_timeout if call.timeout is None else call.timeout
        return httpx.Timeout(read, connect=10.0)

    async def request(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self.client.request(
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
            await asyncio.sleep(delay)
            attempt += 1

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self.client.stream(
                call.method, call.path, json=call.json, timeout=self._timeout(call)
            ) as resp:
                if resp.status_code >= 400:
                    raise error_for(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    event = _core.parse_line(line)
                    if event is not None:
                        yield event
        except httpx.TimeoutException as e:
            raise TimeoutError(f"{call.method} {call.path}: {e}") from e
        except httpx.TransportError as e:
            raise FissileError(_core.transport_failure(call, e)) from e


class AsyncCommands:
    """Commands in a sandbox (`sandbox.commands`)."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    async def run(
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
        """See `Commands.run`."""
        b = _core.CommandBuilder(on_stdout=on_stdout, on_stderr=on_stderr)
        call = _core.command_call(self._sb.id, cmd, cwd, envs, timeout, stdin)
        async for event in self._sb._http.stream(call):
            b.feed(event)
        return b.finish()


class AsyncFiles:
    """Files in a sandbox (`sandbox.files`), binary-safe."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    async def write(self, path: str, data: bytes | str) -> int:
        """See `Files.write`."""
        call = Call(
            "PUT",
            f"/v1/sandboxes/{self._sb.id}/files",
            params={"path": path},
            content=_core.file_bytes(data),
            idempotent=True,
        )
        return int((await self._sb._http.request(call)).json()["size"])

    @overload
    async def read(self, path: str, format: Literal["text"] = "text") -> str: ...
    @overload
    async def read(self, path: str, format: Literal["bytes"]) -> bytes: ...

    async def read(self, path: str, format: Literal["text", "bytes"] = "text") -> str | bytes:
        """See `Files.read`."""
        call = Call(
            "GET", f"/v1/sandboxes/{self._sb.id}/files", params={"path": path}, idempotent=True
        )
        content = (await self._sb._http.request(call)).content
        return content if format == "bytes" else content.decode()

    async def list(self, path: str) -> list[EntryInfo]:
        """See `Files.list`."""
        call = Call(
            "GET",
            f"/v1/sandboxes/{self._sb.id}/files/list",
            params={"path": path},
            idempotent=True,
        )
        body = (await self._sb._http.request(call)).json()
        return [EntryInfo.model_validate(e) for e in body["entries"]]

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """See `Files.remove`."""
        params = {"path": path, "recursive": "true" if recursive else "false"}
        call = Call("DELETE", f"/v1/sandboxes/{self._sb.id}/files", params=params, idempotent=True)
        await self._sb._http.request(call)


class AsyncSandbox:
    """The async twin of `Sandbox`: `await AsyncSandbox.create(...)`, `async with`, and
    every method awaitable."""

    def __init__(self, info: SandboxInfo, config: Config):
        self._info = info
        self._config = config
        self._http = _AsyncHttp(config)
        self._closed = False
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)

    @classmethod
    async def create(
        cls,
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
    ) -> AsyncSandbox:
        """Creates a sandbox (see `Sandbox`)."""
        config = Config.resolve(api_key, base_url, request_timeout)
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
        return cls(SandboxInfo.model_validate(await _one(config, call)), config)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> AsyncSandbox:
        """Attaches to the running sandbox `sandbox_id`."""
        config = Config.resolve(api_key, base_url, None)
        body = await _one(config, Call("GET", f"/v1/sandboxes/{sandbox_id}", idempotent=True))
        return cls(SandboxInfo.model_validate(body), config)

    @classmethod
    async def resume(
        cls, space_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> AsyncSandbox:
        """Resumes persistent space `space_id`."""
        config = Config.resolve(api_key, base_url, None)
        body = await _one(config, Call("POST", f"/v1/spaces/{space_id}/resume", idempotent=True))
        return cls(SandboxInfo.model_validate(body), config)

    @staticmethod
    async def list(
        *,
        metadata: Mapping[str, str] | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> list[SandboxInfo]:
        """The caller's sandboxes."""
        params = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        config = Config.resolve(api_key, base_url, None)
        body = await _one(config, Call("GET", "/v1/sandboxes", params=params, idempotent=True))
        return [SandboxInfo.model_validate(s) for s in body]

    @staticmethod
    async def spaces(
        *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[SpaceInfo]:
        """The caller's persistent spaces."""
        config = Config.resolve(api_key, base_url, None)
        body = await _one(config, Call("GET", "/v1/spaces", idempotent=True))
        return [SpaceInfo.model_validate(s) for s in body]

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
        """See `Sandbox.network`."""
        return self._info.network

    async def set_network(self, policy: NetworkPolicy) -> None:
        """See `Sandbox.set_network`."""
        resp = await self._http.request(_core.network_call(self.id, policy))
        self._info = SandboxInfo.model_validate(resp.json())

    async def network_counters(self) -> NetworkCounters:
        """See `Sandbox.network_counters`."""
        resp = await self._http.request(_core.network_counters_call(self.id))
        return NetworkCounters.model_validate(resp.json()["counters"])

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, space_id={self.space_id!r})"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def info(self) -> SandboxInfo:
        """The sandbox as the daemon reports it now."""
        call = Call("GET", f"/v1/sandboxes/{self.id}", idempotent=True)
        self._info = SandboxInfo.model_validate((await self._http.request(call)).json())
        return self._info

    async def run_code(
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
        """See `Sandbox.run_code`."""
        b = _core.ExecutionBuilder(
            on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result, on_error=on_error
        )
        async for event in self._http.stream(_core.exec_call(self.id, code, timeout, envs)):
            b.feed(event)
        return b.finish()

    async def interrupt(self) -> bool:
        """See `Sandbox.interrupt`."""
        call = Call("POST", f"/v1/sandboxes/{self.id}/interrupt", idempotent=True)
        return bool((await self._http.request(call)).json()["was_running"])

    async def fork(self, n: int) -> builtins.list[AsyncSandbox]:
        """See `Sandbox.fork`."""
        call = Call("POST", f"/v1/sandboxes/{self.id}/fork", json={"n": n})
        ids, errors = _core.fork_outcome((await self._http.request(call)).json())
        children = [
            AsyncSandbox(
                SandboxInfo(**{**self._info.model_dump(), "id": i, "space_id": None}),
                self._config,
            )
            for i in ids
        ]
        if errors:
            raise ForkError(
                f"fork({n}): {len(errors)} of the children failed; the first: {errors[0]}",
                children,
                errors,
            )
        return children

    async def merge_into(self, winner: AsyncSandbox | str) -> None:
        """See `Sandbox.merge_into`."""
        wid = winner if isinstance(winner, str) else winner.id
        await self._http.request(Call("POST", f"/v1/sandboxes/{self.id}/merge_into/{wid}"))

    async def snapshot(self) -> str:
        """See `Sandbox.snapshot`."""
        resp = await self._http.request(Call("POST", f"/v1/sandboxes/{self.id}/snapshot"))
        return str(resp.json()["snapshot_id"])

    async def rollback(self, snapshot_id: str) -> None:
        """See `Sandbox.rollback`."""
        await self._http.request(Call("POST", f"/v1/sandboxes/{self.id}/rollback/{snapshot_id}"))

    async def close(self) -> None:
        """See `Sandbox.close`."""
        if self._closed:
            return
        try:
            await self._http.request(Call("DELETE", f"/v1/sandboxes/{self.id}", idempotent=True))
        except NotFoundError:
            pass
        finally:
            self._closed = True
            await self._http.close()


class AsyncTemplates:
    """The async twin of `Templates`."""

    @staticmethod
    async def build(
        spec: str,
        *,
        network: NetworkPolicy | None = None,
        on_output: OutputHandler | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> TemplateInfo:
        """Builds a template from `spec` (see `Templates.build`)."""
        http = _AsyncHttp(Config.resolve(api_key, base_url, None))
        builder = _core.TemplateBuilder(on_output=on_output)
        try:
            async for event in http.stream(_core.template_build_call(spec, network)):
                builder.feed(event)
        finally:
            await http.close()
        return builder.finish()

    @staticmethod
    async def list(
        *, api_key: str | None = None, base_url: str | None = None
    ) -> list[TemplateInfo]:
        """The daemon's template and yours."""
        config = Config.resolve(api_key, base_url, None)
        body = await _one(config, Call("GET", "/v1/templates", idempotent=True))
        return [TemplateInfo.model_validate(t) for t in body]

    @staticmethod
    async def delete(name: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
        """Deletes a template you built."""
        http = _AsyncHttp(Config.resolve(api_key, base_url, None))
        try:
            await http.request(Call("DELETE", f"/v1/templates/{quote(name, safe='')}"))
        finally:
            await http.close()


async def _one(config: Config, call: Call) -> Any:
    """One call on a short-lived client; its JSON body."""
    http = _AsyncHttp(config)
    try:
        return (await http.request(call)).json()
    finally:
        await http.close()
