"""A Fissile sandbox provider for the OpenAI Agents SDK's `SandboxAgent` (its beta sandbox
interface, openai-agents 0.24).

```python
from agents import Runner
from agents.run_config import RunConfig, SandboxRunConfig
from agents.sandbox import SandboxAgent
from fissile.agents_sandbox import FissileSandboxClient, FissileSandboxClientOptions

agent = SandboxAgent(name="dev", instructions="Use the shell.")
sandbox = SandboxRunConfig(
    client=FissileSandboxClient(api_key="fsk_...", base_url="http://127.0.0.1:8080"),
    options=FissileSandboxClientOptions(memory_mib=1024),
)
result = await Runner.run(agent, "count primes below 1000", run_config=RunConfig(sandbox=sandbox))
```

Each session is one Fissile microVM (`AsyncSandbox`). `exec` runs through the commands API in
the manifest's root (default `/workspace`), `read`/`write` through the files API (binary-safe),
`running` asks the daemon for the sandbox's state, and `FissileSandboxClient.delete` closes the
sandbox (a persistent one is persisted into its space first). The runner calls `delete` at the
end of a run; a session's own `aclose()` (or `async with`) only persists, so the VM keeps
running until `delete`, its `idle_timeout`, or a `resume` that reattaches to it.

Persistence uses Fissile snapshots, not tar archives: `persist_workspace` snapshots the whole VM
(files *and* the Python REPL's memory) and returns a small reference, `hydrate_workspace` rolls
the sandbox back to it (or, from another session, starts a sandbox from it). The Agents SDK
carries workspace state as a byte stream, so the reference travels as bytes: the line
`FISSILE_SNAPSHOT_REF_V1` followed by a JSON object (`snapshot_id`, `sandbox_id`, `space_id`).
A `LocalSnapshot` therefore stores a few hundred bytes, and the state it refers to lives in the
daemon's snapshot store.

Not supported (a clear error, never a silent fallback): running as another user (`user=`,
`SandboxAgent.run_as`; the guest has no sudo), PTY sessions (`write_stdin`), exposed ports
(a sandbox's network goes out only, by its egress policy: nothing reaches into a guest),
manifest `Mount` entries (cloud buckets and remote shares) and host-path grants, and
hydrating from tar archives made by other backends. Requires `pip install fissile[agents]`.
"""

from __future__ import annotations

import io
import json
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, cast

from agents.sandbox.errors import (
    ExecTimeoutError,
    ExecTransportError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.manifest import Manifest
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.dependencies import Dependencies
from agents.sandbox.session.manager import Instrumentation
from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
from agents.sandbox.session.sandbox_session import SandboxSession
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from agents.sandbox.types import ExecResult, User
from agents.sandbox.workspace_paths import sandbox_path_str
from pydantic import Field

from ._async import AsyncSandbox
from ._core import DEFAULT_TEMPLATE
from ._errors import ConflictError, FissileError, NotFoundError

BACKEND_ID = "fissile"
SNAPSHOT_REF_MAGIC = b"FISSILE_SNAPSHOT_REF_V1\n"
MAX_COMMAND_TIMEOUT_S = 86_400.0
"""The daemon's upper bound for a command's `timeout_s`."""


class FissileSandboxClientOptions(BaseSandboxClientOptions):
    """How `FissileSandboxClient.create` makes a sandbox (all optional)."""

    type: Literal["fissile"] = "fissile"
    template: str = DEFAULT_TEMPLATE
    """Guest template."""
    memory_mib: int | None = None
    """Guest memory in MiB (daemon default: 512)."""
    vcpus: int | None = None
    """vCPUs (daemon default: 1)."""
    persistent: bool = False
    """A persistent space: `delete` persists it and `resume` brings it back, REPL and all."""
    idle_timeout: int | None = None
    """Seconds without a request after which the daemon closes the sandbox."""
    metadata: dict[str, str] = Field(default_factory=dict)
    """Labels (`AsyncSandbox.list(metadata=...)` filters on them)."""
    envs: dict[str, str] = Field(default_factory=dict)
    """Environment of every command and cell (the manifest's environment is added to it).
    Kept in the session state, so in serialized run state too: no secrets here."""


class FissileSandboxSessionState(SandboxSessionState):
    """What a session needs to find its sandbox again, or to make an equivalent one."""

    type: Literal["fissile"] = "fissile"
    sandbox_id: str | None = None
    """The live sandbox (`None` once deleted, or before a resumed session started one)."""
    space_id: str | None = None
    """Its persistent space, if persistent."""
    options: FissileSandboxClientOptions = Field(default_factory=FissileSandboxClientOptions)
    """How new sandboxes of this session are made (the create's options)."""


@dataclass(frozen=True)
class SnapshotRef:
    """What `persist_workspace` returns (encoded): a Fissile snapshot and where it came from."""

    snapshot_id: str
    sandbox_id: str
    space_id: str | None = None

    def encode(self) -> bytes:
        """The bytes the Agents SDK stores as the workspace archive."""
        body = {"snapshot_id": self.snapshot_id, "sandbox_id": self.sandbox_id}
        if self.space_id is not None:
            body["space_id"] = self.space_id
        return SNAPSHOT_REF_MAGIC + json.dumps(body).encode()

    @staticmethod
    def decode(raw: bytes) -> SnapshotRef | None:
        """The reference in `raw`, or `None` if `raw` is not one (e.g. another backend's tar)."""
        if not raw.startswith(SNAPSHOT_REF_MAGIC):
            return None
        try:
            body = json.loads(raw[len(SNAPSHOT_REF_MAGIC) :])
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        snapshot_id, sandbox_id = body.get("snapshot_id"), body.get("sandbox_id")
        space_id = body.get("space_id")
        if not (isinstance(snapshot_id, str) and snapshot_id and isinstance(sandbox_id, str)):
            return None
        return SnapshotRef(snapshot_id, sandbox_id, space_id if isinstance(space_id, str) else None)


class FissileSandboxSession(BaseSandboxSession):
    """One session: one Fissile sandbox, which `hydrate_workspace` may replace."""

    state: FissileSandboxSessionState

    def __init__(
        self,
        *,
        state: FissileSandboxSessionState,
        sandbox: AsyncSandbox | None,
        api_key: str | None,
        base_url: str | None,
        resumed_space: bool = False,
    ) -> None:
        self.state = state
        self._sandbox = sandbox
        self._api_key = api_key
        self._base_url = base_url
        self._resumed_space = resumed_space
        self._origin_snapshot: str | None = None
        """Set while starting a sandbox created from this snapshot: hydrating it is a no-op."""

    @property
    def sandbox(self) -> AsyncSandbox:
        """The live sandbox (e.g. for `run_code` in its REPL). Hydrating from another
        session's snapshot replaces it, so look it up again rather than keeping it."""
        if self._sandbox is None:
            raise RuntimeError(
                "this Fissile session has no sandbox: it was deleted, or it was resumed and not "
                "started yet (call start(), or resume the state again)"
            )
        return self._sandbox

    # -- lifecycle -----------------------------------------------------------------------

    async def _ensure_backend_started(self) -> None:
        # A resumed session whose sandbox is gone gets a new one: from its stored snapshot
        # reference when there is one (then the start's restore step has nothing to do), else
        # from the template.
        if self._sandbox is not None:
            return
        ref = await self._stored_snapshot_ref()
        self._sandbox = await self._create_sandbox(
            from_snapshot=None if ref is None else ref.snapshot_id
        )
        if ref is None:
            self.state.workspace_root_ready = False
        else:
            self._origin_snapshot = ref.snapshot_id
            # A snapshot holds the whole VM, its users and groups included.
            self._set_start_state_preserved(False, system=True)

    async def _after_start(self) -> None:
        self._origin_snapshot = None

    async def _after_start_failed(self) -> None:
        self._origin_snapshot = None

    async def _can_skip_snapshot_restore_on_resume(self, *, is_running: bool) -> bool:
        # A resumed persistent space holds the state its sandbox had when it was closed, which
        # is after the last persist_workspace; the stored snapshot belongs to the sandbox that
        # ran the space before and would only take it back. A reattached sandbox (same id) is
        # rolled back to the snapshot instead: cheap, and exactly the persisted state.
        return is_running and self._resumed_space

    def _should_compute_snapshot_fingerprint_on_persist(self) -> bool:
        # The base class hashes a tar of the workspace to skip needless restores; a Fissile
        # rollback is cheap and exact, so it is not worth a tar of the workspace per persist.
        return False

    async def _restore_snapshot_into_workspace_on_resume(self) -> None:
        # Unlike a tar, a snapshot replaces the whole VM: no need to empty the workspace first.
        data = await self.state.snapshot.restore(dependencies=self.dependencies)
        try:
            await self.hydrate_workspace(data)
        finally:
            with suppress(Exception):
                data.close()

    def _current_runtime_helper_cache_key(self) -> object | None:
        return self.state.sandbox_id

    async def delete_sandbox(self) -> None:
        """Closes the sandbox (a persistent one is persisted into its space first)."""
        sandbox, self._sandbox = self._sandbox, None
        self.state.sandbox_id = None
        if sandbox is not None:
            await sandbox.close()

    # -- the interface -------------------------------------------------------------------

    async def exec(
        self,
        *command: str | Path,
        timeout: float | None = None,
        shell: bool | list[str] = True,
        user: str | User | None = None,
    ) -> ExecResult:
        """Runs `command` (through `sh -lc` unless `shell=False`) in the workspace root."""
        _no_user(user, "exec")
        return await super().exec(*command, timeout=timeout, shell=shell)

    async def _exec_internal(
        self, *command: str | Path, timeout: float | None = None
    ) -> ExecResult:
        argv = [str(c) for c in command]
        # The root is the working directory once it exists (the start's manifest step
        # creates it, so the commands before that run in the guest's default directory).
        cwd = self.state.manifest.root if self.state.workspace_root_ready else None
        try:
            result = await self.sandbox.commands.run(
                argv, cwd=cwd, timeout=_command_timeout(timeout)
            )
        except FissileError as e:
            raise ExecTransportError(command=argv, cause=e, message=f"fissile: {e}") from e
        if result.timed_out:
            raise ExecTimeoutError(command=argv, timeout_s=timeout)
        exit_code = result.exit_code
        if exit_code is None:  # killed by a signal: the shell's convention
            exit_code = 128 + (result.signal or 0)
        return ExecResult(
            stdout=result.stdout.encode(), stderr=result.stderr.encode(), exit_code=exit_code
        )

    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        """The file's bytes (files API, binary-safe)."""
        _no_user(user, "read")
        target = await self._validate_path_access(path)
        try:
            data = await self.sandbox.files.read(sandbox_path_str(target), format="bytes")
        except NotFoundError as e:
            raise WorkspaceReadNotFoundError(path=path, cause=e) from e
        except FissileError as e:
            raise WorkspaceArchiveReadError(path=path, cause=e) from e
        return io.BytesIO(data)

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        """Writes `data` to the file (parent directories are created)."""
        _no_user(user, "write")
        try:
            payload = _read_all(data)
        except TypeError as e:
            raise WorkspaceWriteTypeError(path=path, actual_type=str(e)) from e
        target = await self._validate_path_access(path, for_write=True)
        try:
            await self.sandbox.files.write(sandbox_path_str(target), payload)
        except FissileError as e:
            raise WorkspaceArchiveWriteError(path=target, cause=e) from e

    async def running(self) -> bool:
        """Whether the daemon reports the sandbox running."""
        if self._sandbox is None:
            return False
        try:
            return (await self._sandbox.info()).state == "running"
        except FissileError:
            return False

    async def persist_workspace(self) -> io.IOBase:
        """Snapshots the sandbox (files, REPL memory, everything in the VM) and returns the
        encoded `SnapshotRef`, not a tar. Persist-skip paths cannot be left out of a VM
        snapshot; they are part of it."""
        sandbox = self.sandbox
        try:
            snapshot_id = await sandbox.snapshot()
        except FissileError as e:
            raise WorkspaceArchiveReadError(
                path=Path(self.state.manifest.root),
                context={"reason": "fissile_snapshot_failed"},
                cause=e,
            ) from e
        return io.BytesIO(SnapshotRef(snapshot_id, sandbox.id, sandbox.space_id).encode())

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        """Returns the session to the snapshot `data` refers to (from `persist_workspace`):
        a rollback when it is this sandbox's own snapshot, else a new sandbox started from it
        (replacing this one, which is closed). Tar archives are refused."""
        root = Path(self.state.manifest.root)
        try:
            ref = SnapshotRef.decode(_read_all(data))
        except TypeError:
            ref = None
        if ref is None:
            raise WorkspaceArchiveWriteError(
                path=root,
                context={"reason": "not_a_fissile_snapshot_ref"},
                message="FissileSandboxSession hydrates only from the snapshot references its "
                "persist_workspace returns, not from tar archives",
            )
        if ref.snapshot_id == self._origin_snapshot:
            return  # this sandbox was just started from it
        try:
            if self._sandbox is not None and self._sandbox.id == ref.sandbox_id:
                await self._sandbox.rollback(ref.snapshot_id)
                return
            new = await self._create_sandbox(from_snapshot=ref.snapshot_id)
        except FissileError as e:
            raise WorkspaceArchiveWriteError(
                path=root,
                context={"reason": "fissile_restore_failed", "snapshot_id": ref.snapshot_id},
                cause=e,
            ) from e
        old, self._sandbox = self._sandbox, new
        if old is not None:
            with suppress(FissileError):
                await old.close()

    # -- helpers -------------------------------------------------------------------------

    async def _create_sandbox(self, *, from_snapshot: str | None) -> AsyncSandbox:
        sandbox = await _create_sandbox(
            self.state, api_key=self._api_key, base_url=self._base_url, from_snapshot=from_snapshot
        )
        self._resumed_space = False
        return sandbox

    async def _stored_snapshot_ref(self) -> SnapshotRef | None:
        snapshot = self.state.snapshot
        if not await snapshot.restorable(dependencies=self.dependencies):
            return None
        data = await snapshot.restore(dependencies=self.dependencies)
        try:
            return SnapshotRef.decode(_read_all(data))
        except TypeError:
            return None  # hydrate_workspace reports it
        finally:
            with suppress(Exception):
                data.close()


class FissileSandboxClient(BaseSandboxClient[FissileSandboxClientOptions | None]):
    """Creates, resumes and deletes `SandboxAgent` sessions on a Fissile daemon.

    `api_key`/`base_url` default to `FISSILE_API_KEY`/`FISSILE_API_URL` (then
    `http://127.0.0.1:8080`). Neither is written into session state."""

    backend_id = BACKEND_ID
    supports_default_options = True

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        instrumentation: Instrumentation | None = None,
        dependencies: Dependencies | None = None,
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url
        self._instrumentation = instrumentation or Instrumentation()
        self._dependencies = dependencies

    async def create(
        self,
        *,
        snapshot: SnapshotSpec | SnapshotBase | None = None,
        manifest: Manifest | None = None,
        options: FissileSandboxClientOptions | None = None,
    ) -> SandboxSession:
        """Starts a sandbox now; the session's `start()` then materializes the manifest (or
        restores `snapshot` if it already holds a reference, replacing the sandbox)."""
        options = options or FissileSandboxClientOptions()
        manifest = manifest or Manifest()
        self._validate_manifest_for_create(manifest)
        _check_manifest(manifest)
        session_id = uuid.uuid4()
        state = FissileSandboxSessionState(
            session_id=session_id,
            manifest=manifest,
            snapshot=resolve_snapshot(snapshot, str(session_id)),
            options=options,
        )
        sandbox = await _create_sandbox(state, api_key=self.api_key, base_url=self.base_url)
        return self._wrap(state, sandbox)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        """Closes the session's sandbox (a persistent one is persisted into its space)."""
        await _inner(session).delete_sandbox()
        return session

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        """Reattaches to the state's sandbox if it still runs (`AsyncSandbox.connect`), else
        resumes its persistent space, else leaves the sandbox to `start()`, which makes one from
        the state's stored snapshot reference (or the template when there is none)."""
        if not isinstance(state, FissileSandboxSessionState):
            raise TypeError("FissileSandboxClient.resume expects a FissileSandboxSessionState")
        state.assert_path_grants_rebound()
        _check_manifest(state.manifest)
        sandbox = await self._reattach(state)
        resumed_space = False
        if sandbox is None and state.space_id is not None:
            try:
                sandbox = await AsyncSandbox.resume(
                    state.space_id, api_key=self.api_key, base_url=self.base_url
                )
                resumed_space = True
            except (NotFoundError, ConflictError):  # deleted, never persisted, or lost
                state.space_id = None
        state.sandbox_id = None if sandbox is None else sandbox.id
        # A sandbox found running (or its space resumed) keeps its files, users and REPL.
        return self._wrap(
            state, sandbox, preserved=sandbox is not None, resumed_space=resumed_space
        )

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        """The `FissileSandboxSessionState` in `payload` (from `serialize_session_state`)."""
        return self._deserialize_session_state_payload(payload, FissileSandboxSessionState)

    async def _reattach(self, state: FissileSandboxSessionState) -> AsyncSandbox | None:
        if state.sandbox_id is None:
            return None
        try:
            sandbox = await AsyncSandbox.connect(
                state.sandbox_id, api_key=self.api_key, base_url=self.base_url
            )
        except NotFoundError:
            return None
        with suppress(NotFoundError):
            if (await sandbox.info()).state != "lost":
                return sandbox
        with suppress(FissileError):  # gone, or its VMM is (daemon restart): drop the record
            await sandbox.close()
        return None

    def _wrap(
        self,
        state: FissileSandboxSessionState,
        sandbox: AsyncSandbox | None,
        *,
        preserved: bool = False,
        resumed_space: bool = False,
    ) -> SandboxSession:
        inner = FissileSandboxSession(
            state=state,
            sandbox=sandbox,
            api_key=self.api_key,
            base_url=self.base_url,
            resumed_space=resumed_space,
        )
        inner._set_start_state_preserved(preserved)
        return self._wrap_session(inner, instrumentation=self._instrumentation)


async def _create_sandbox(
    state: FissileSandboxSessionState,
    *,
    api_key: str | None,
    base_url: str | None,
    from_snapshot: str | None = None,
) -> AsyncSandbox:
    """A new sandbox as `state` describes it (its environment plus the manifest's), recorded
    in `state` as the session's sandbox."""
    options = state.options
    envs = {**options.envs, **await state.manifest.environment.resolve()}
    sandbox = await AsyncSandbox.create(
        options.template,
        persistent=options.persistent,
        memory_mib=options.memory_mib,
        vcpus=options.vcpus,
        idle_timeout=options.idle_timeout,
        metadata=options.metadata,
        envs=envs,
        from_snapshot=from_snapshot,
        api_key=api_key,
        base_url=base_url,
    )
    state.sandbox_id, state.space_id = sandbox.id, sandbox.space_id
    return sandbox


def sandbox_of(session: SandboxSession | BaseSandboxSession) -> AsyncSandbox:
    """The live `AsyncSandbox` behind a Fissile session (e.g. to `run_code` in its REPL)."""
    return _inner(session).sandbox


def _inner(session: SandboxSession | BaseSandboxSession) -> FissileSandboxSession:
    inner = session._inner if isinstance(session, SandboxSession) else session
    if not isinstance(inner, FissileSandboxSession):
        raise TypeError(f"not a Fissile sandbox session: {type(inner).__name__}")
    return inner


def _no_user(user: str | User | None, op: str) -> None:
    if user is not None:
        name = user.name if isinstance(user, User) else user
        raise NotImplementedError(
            f"Fissile sandboxes cannot {op} as another user ({name!r}): the guest runs every "
            "command as its one user and has no sudo (SandboxAgent.run_as is unsupported)"
        )


def _read_all(stream: io.IOBase) -> bytes:
    """What is left in `stream`, text as UTF-8; `TypeError` (its type) if it is neither."""
    payload: object = cast(BinaryIO, stream).read()
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    raise TypeError(type(payload).__name__)


def _check_manifest(manifest: Manifest) -> None:
    if manifest.mount_targets():
        raise ValueError(
            "Fissile sandboxes do not support manifest Mount entries (upload the files instead)"
        )
    if any(grant.host_path is not None for grant in manifest.extra_path_grants):
        raise ValueError("Fissile sandboxes do not support path grants with a host_path")


def _command_timeout(timeout: float | None) -> float | None:
    """The Agents SDK's timeout as the daemon accepts it: `None` (no limit) or (0, 1 day]."""
    if timeout is None:
        return None
    return min(max(timeout, 0.001), MAX_COMMAND_TIMEOUT_S)


__all__ = [
    "FissileSandboxClient",
    "FissileSandboxClientOptions",
    "FissileSandboxSession",
    "FissileSandboxSessionState",
    "SnapshotRef",
    "sandbox_of",
]
