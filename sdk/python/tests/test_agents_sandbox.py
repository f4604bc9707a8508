"""The `SandboxAgent` provider (`fissile.agents_sandbox`) with the real openai-agents runtime,
real sandboxes, and a scripted model (`agents.testing.ScriptedModel`) in place of the LLM."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from agents import Runner
from agents.run_config import RunConfig
from agents.sandbox import (
    ExecTimeoutError,
    LocalSnapshotSpec,
    SandboxAgent,
    SandboxRunConfig,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
)
from agents.sandbox.capabilities import Shell
from agents.sandbox.session.sandbox_session import SandboxSession
from agents.testing import ScriptedModel, assistant_message, function_call

from fissile import AsyncSandbox
from fissile.agents_sandbox import (
    FissileSandboxClient,
    FissileSandboxClientOptions,
    FissileSandboxSessionState,
    sandbox_of,
)

from .conftest import Daemon

MAGIC = b"FISSILE_SNAPSHOT_REF_V1\n"


def client_for(daemon: Daemon) -> FissileSandboxClient:
    return FissileSandboxClient(api_key=daemon.key, base_url=daemon.url)


async def read_bytes(session: SandboxSession, path: str) -> bytes:
    return cast(BinaryIO, await session.read(Path(path))).read()


async def write_bytes(session: SandboxSession, path: str, data: bytes) -> None:
    await session.write(Path(path), io.BytesIO(data))


def fissile_state(session: SandboxSession) -> FissileSandboxSessionState:
    assert isinstance(session.state, FissileSandboxSessionState)
    return session.state


async def gone(daemon: Daemon, sandbox_id: str) -> bool:
    listed = await AsyncSandbox.list(api_key=daemon.key, base_url=daemon.url)
    return sandbox_id not in {s.id for s in listed}


def test_exec_read_write_running_and_delete(daemon: Daemon) -> None:
    async def main() -> None:
        client = client_for(daemon)
        session = await client.create(options=FissileSandboxClientOptions(metadata={"t": "sdk"}))
        sandbox_id = sandbox_of(session).id
        try:
            await session.start()
            assert await session.running()

            r = await session.exec("echo out; echo err >&2; exit 3")
            assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
            assert (await session.exec("pwd")).stdout == b"/workspace\n"  # the manifest root
            r = await session.exec("printf", "%s|", "a b", "c", shell=False)
            assert (r.stdout, r.exit_code) == (b"a b|c|", 0)
            with pytest.raises(ExecTimeoutError):
                await session.exec("sleep 60", timeout=1)

            data = bytes(range(256)) * 64
            await write_bytes(session, "sub/blob.bin", data)  # parents are created
            assert await read_bytes(session, "sub/blob.bin") == data
            assert await read_bytes(session, "/workspace/sub/blob.bin") == data
            assert (await session.exec("wc -c < sub/blob.bin")).stdout.strip() == b"16384"
            assert [Path(e.path).name for e in await session.ls("sub")] == ["blob.bin"]
            with pytest.raises(WorkspaceReadNotFoundError):
                await session.read(Path("missing.txt"))
            with pytest.raises(NotImplementedError, match="another user"):
                await session.exec("id", user="nobody")
        finally:
            await client.delete(session)
        assert fissile_state(session).sandbox_id is None
        assert not await session.running()
        assert await gone(daemon, sandbox_id)

    asyncio.run(main())


def test_persist_and_hydrate_bring_back_files_and_the_repl(daemon: Daemon) -> None:
    async def main() -> None:
        client = client_for(daemon)
        session = await client.create()
        other = await client.create()
        try:
            await session.start()
            sb = sandbox_of(session)
            await write_bytes(session, "state.txt", b"before")
            await sb.run_code("marker = 'before'")
            ref = cast(BinaryIO, await session.persist_workspace()).read()
            assert ref.startswith(MAGIC) and len(ref) < 1000  # a reference, not a tar

            await write_bytes(session, "state.txt", b"after")
            await write_bytes(session, "extra.txt", b"new")
            await sb.run_code("marker = 'after'")
            await session.hydrate_workspace(io.BytesIO(ref))

            assert sandbox_of(session).id == sb.id  # its own snapshot: a rollback
            assert await read_bytes(session, "state.txt") == b"before"
            with pytest.raises(WorkspaceReadNotFoundError):
                await session.read(Path("extra.txt"))
            assert (await sb.run_code("marker")).text == "'before'"

            # Another session hydrated from it gets a sandbox started from the snapshot.
            await other.start()
            replaced = sandbox_of(other).id
            await other.hydrate_workspace(io.BytesIO(ref))
            assert sandbox_of(other).id not in (replaced, sb.id)
            assert fissile_state(other).sandbox_id == sandbox_of(other).id
            assert await gone(daemon, replaced)
            assert await read_bytes(other, "state.txt") == b"before"
            assert (await sandbox_of(other).run_code("marker")).text == "'before'"

            with pytest.raises(WorkspaceArchiveWriteError):
                await session.hydrate_workspace(io.BytesIO(b"a tar from another backend"))
        finally:
            await client.delete(other)
            await client.delete(session)

    asyncio.run(main())


def test_state_round_trips_and_resume_reattaches_to_the_live_sandbox(daemon: Daemon) -> None:
    async def main() -> None:
        client = client_for(daemon)
        session = await client.create()
        resumed: SandboxSession | None = None
        try:
            await session.start()
            sandbox_id = sandbox_of(session).id
            await sandbox_of(session).run_code("counter = 41")
            await write_bytes(session, "kept.txt", b"kept")

            payload = json.loads(json.dumps(client.serialize_session_state(session.state)))
            assert (payload["type"], payload["sandbox_id"]) == ("fissile", sandbox_id)
            assert daemon.key not in json.dumps(payload)
            state = client.deserialize_session_state(payload)
            assert isinstance(state, FissileSandboxSessionState)

            resumed = await client.resume(state)
            await resumed.start()
            assert sandbox_of(resumed).id == sandbox_id
            assert (await sandbox_of(resumed).run_code("counter + 1")).text == "42"
            assert await read_bytes(resumed, "kept.txt") == b"kept"
            assert (await resumed.exec("pwd")).stdout == b"/workspace\n"
        finally:
            if resumed is not None:
                await client.delete(resumed)
            await client.delete(session)

    asyncio.run(main())


def test_resume_after_delete_starts_from_the_persisted_snapshot(
    daemon: Daemon, tmp_path: Path
) -> None:
    async def main() -> None:
        client = client_for(daemon)
        session = await client.create(snapshot=LocalSnapshotSpec(base_path=tmp_path))
        await session.start()
        old_id = sandbox_of(session).id
        await write_bytes(session, "notes.txt", b"persisted")
        await sandbox_of(session).run_code("answer = 42")
        await session.stop()  # persists: what the runner does at the end of a run
        stored = list(tmp_path.iterdir())
        assert len(stored) == 1 and stored[0].read_bytes().startswith(MAGIC)
        await client.delete(session)
        payload = client.serialize_session_state(session.state)

        resumed = await client.resume(client.deserialize_session_state(payload))
        try:
            await resumed.start()
            sb = sandbox_of(resumed)
            assert sb.id != old_id
            assert await read_bytes(resumed, "notes.txt") == b"persisted"
            assert (await sb.run_code("answer")).text == "42"
            assert (await resumed.exec("cat notes.txt")).stdout == b"persisted"
        finally:
            await client.delete(resumed)

    asyncio.run(main())


def test_a_persistent_session_resumes_its_space(daemon: Daemon, tmp_path: Path) -> None:
    async def main() -> None:
        client = client_for(daemon)
        session = await client.create(
            snapshot=LocalSnapshotSpec(base_path=tmp_path),
            options=FissileSandboxClientOptions(persistent=True),
        )
        await session.start()
        space = fissile_state(session).space_id
        assert space is not None and sandbox_of(session).space_id == space
        await sandbox_of(session).run_code("memo = {'k': 1}")
        await write_bytes(session, "space.txt", b"in the space")
        await session.stop()
        await client.delete(session)  # persists the space
        payload = client.serialize_session_state(session.state)

        resumed = await client.resume(client.deserialize_session_state(payload))
        try:
            await resumed.start()  # keeps the space rather than restoring the older snapshot
            assert (
                fissile_state(resumed).space_id == space and sandbox_of(resumed).space_id == space
            )
            assert (await sandbox_of(resumed).run_code("memo")).text == "{'k': 1}"
            assert await read_bytes(resumed, "space.txt") == b"in the space"
        finally:
            await client.delete(resumed)

    asyncio.run(main())


def test_a_sandbox_agent_runs_its_shell_in_fissile(daemon: Daemon, tmp_path: Path) -> None:
    label = uuid.uuid4().hex
    cmd = "echo hi > note.txt && cat note.txt && python3 -c 'print(6 * 7)' && pwd"
    model = ScriptedModel(
        [
            [function_call("exec_command", {"cmd": cmd, "yield_time_ms": 120_000}, call_id="c1")],
            [assistant_message("done")],
        ]
    )
    agent = SandboxAgent(
        name="dev", instructions="Use the shell.", model=model, capabilities=[Shell()]
    )
    run_config = RunConfig(
        tracing_disabled=True,
        sandbox=SandboxRunConfig(
            client=client_for(daemon),
            options=FissileSandboxClientOptions(metadata={"test": label}),
            snapshot=LocalSnapshotSpec(base_path=tmp_path),
        ),
    )
    result = asyncio.run(Runner.run(agent, "say hi", run_config=run_config))
    assert result.final_output == "done"
    tool_output = json.dumps(model.calls[1].input, default=str)
    assert "Process exited with code 0" in tool_output, tool_output[-2000:]
    assert "hi\\n42\\n/workspace" in tool_output, tool_output[-2000:]
    # The runner deleted its sandbox and kept its state as a snapshot reference.
    left = asyncio.run(
        AsyncSandbox.list(metadata={"test": label}, api_key=daemon.key, base_url=daemon.url)
    )
    assert left == []
    refs = list(tmp_path.iterdir())
    assert len(refs) == 1 and refs[0].read_bytes().startswith(MAGIC)
