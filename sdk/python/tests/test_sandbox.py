"""The SDK against a real fissiled and real sandboxes."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import threading
import time

import pytest

from fissile import (
    AsyncSandbox,
    AsyncTemplates,
    AuthenticationError,
    BadRequestError,
    Execution,
    NetworkPolicy,
    NotFoundError,
    RateLimitError,
    Sandbox,
    TemplateBuildError,
    Templates,
)

from .conftest import MAX_SANDBOXES, Daemon


def test_run_code_streams_keeps_state_and_reports_errors(env: Daemon) -> None:
    with Sandbox(metadata={"test": "run_code"}) as sb:
        seen: list[tuple[float, str]] = []
        ex = sb.run_code(
            "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')\nx = 6\nx * 7",
            on_stdout=lambda t: seen.append((time.monotonic(), t)),
        )
        returned = time.monotonic()
        assert ex.text == "42"
        assert "".join(ex.logs.stdout) == "first\nsecond\n"
        assert ex.error is None and ex.execution_count >= 1
        # Streamed: the first chunk arrived while the cell still slept.
        assert seen and seen[0][1].startswith("first")
        assert returned - seen[0][0] > 2.0, seen

        assert sb.run_code("x + 1").text == "7"

        err = sb.run_code("def f():\n    raise ValueError('bad value')\nf()").error
        assert err is not None
        assert (err.name, err.value) == ("ValueError", "bad value")
        assert any("bad value" in line for line in err.traceback)

        slow = sb.run_code("import time\ntime.sleep(60)", timeout=1)
        assert slow.timed_out
        assert sb.run_code("x").text == "6", "a timeout keeps the REPL's state"


def test_png_results_decode(env: Daemon) -> None:
    with Sandbox() as sb:
        ex = sb.run_code(
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3])\nplt.show()",
            timeout=600,
        )
        pngs = [r.png_bytes() for r in ex.results if r.png]
        assert pngs, ex
        assert pngs[0] is not None and pngs[0].startswith(b"\x89PNG\r\n\x1a\n")


def test_interrupt_stops_a_running_cell(env: Daemon) -> None:
    with Sandbox() as sb:
        sb.run_code("kept = 'yes'")
        started = threading.Event()
        result: list[Execution] = []

        def run() -> None:
            result.append(
                sb.run_code(
                    "import time\nprint('go', flush=True)\ntime.sleep(600)",
                    timeout=None,
                    on_stdout=lambda _: started.set(),
                )
            )

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(300), "the cell never started"
        assert sb.interrupt()
        t.join(timeout=300)
        assert result and result[0].error is not None
        assert result[0].error.name == "KeyboardInterrupt"
        assert sb.run_code("kept").text == "'yes'"


def test_commands_and_files(env: Daemon) -> None:
    with Sandbox() as sb:
        chunks: list[str] = []
        r = sb.commands.run("echo out; echo err >&2; exit 3", on_stdout=chunks.append)
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
        assert chunks == ["out\n"]
        r = sb.commands.run(["cat"], stdin="piped")
        assert r.stdout == "piped"

        data = bytes(range(256)) * 4096
        assert sb.files.write("/tmp/sdk/blob.bin", data) == len(data)
        assert sb.files.read("/tmp/sdk/blob.bin", format="bytes") == data
        sb.files.write("/tmp/sdk/note.txt", "héllo")
        assert sb.files.read("/tmp/sdk/note.txt") == "héllo"
        assert [e.name for e in sb.files.list("/tmp/sdk")] == ["blob.bin", "note.txt"]
        sb.files.remove("/tmp/sdk/note.txt")
        with pytest.raises(NotFoundError):
            sb.files.read("/tmp/sdk/note.txt")


def test_fork_children_diverge_and_merge_into_the_parent(env: Daemon) -> None:
    with Sandbox() as parent:
        parent.run_code("score = 0")
        children = parent.fork(3)
        try:
            assert len(children) == 3
            for i, c in enumerate(children):
                assert c.run_code("score").text == "0"
                c.run_code(f"score = {10 * (i + 1)}")
            best = max(children, key=lambda c: int(c.run_code("score").text or "0"))
            parent.merge_into(best)
            assert parent.run_code("score").text == "30"
            with pytest.raises(NotFoundError):
                parent.merge_into(children[0])  # a repeated merge of the same fork

            snap = parent.snapshot()
            parent.run_code("score = -1")
            parent.rollback(snap)
            assert parent.run_code("score").text == "30"
        finally:
            for c in children:
                c.close()


def test_a_persistent_space_resumes_in_another_process(env: Daemon) -> None:
    sb = Sandbox(persistent=True)
    space = sb.space_id
    assert space is not None
    sb.run_code("import collections\nmemo = collections.Counter('fissile')")
    sb.close()
    sb.close()  # idempotent
    script = (
        "from fissile import Sandbox\n"
        f"sb = Sandbox.resume({space!r})\n"
        "print(sb.run_code(\"memo['s']\").text)\n"
        "sb.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, check=True
    )
    assert out.stdout.strip() == "2", out
    assert any(s.space_id == space for s in Sandbox.spaces())


CONNECT_ERRNO = """
import socket, errno
try:
    socket.create_connection(("169.254.169.254", 80), timeout=20)
    r = "connected"
except OSError as e:
    r = errno.errorcode.get(e.errno, type(e).__name__)
r
"""


def test_network_policy_is_set_shown_and_enforced(env: Daemon) -> None:
    with pytest.raises(BadRequestError, match=r"network\.allow"):
        Sandbox(network=NetworkPolicy(allow=["10.0.0.0/33"]))
    with Sandbox(network=NetworkPolicy(internet=False, allow=["198.51.100.0/24"])) as sb:
        assert sb.network == NetworkPolicy(internet=False, allow=["198.51.100.0/24"])
        # Link-local (where clouds keep their metadata service) is rejected at the sandbox's
        # own namespace, with a clear error, whatever the policy: nothing leaves the lab.
        sb.set_network(NetworkPolicy(internet=True))
        assert sb.network is not None and sb.network.internet
        assert sb.run_code(CONNECT_ERRNO).text == "'EHOSTUNREACH'"
        assert sb.network_counters().blocked_connections >= 1
        again = Sandbox.connect(sb.id)
        assert again.network == NetworkPolicy(internet=True)
    with Sandbox() as plain:
        assert plain.network is None


RESOLVE = """
import socket
try:
    r = socket.gethostbyname("{name}")
except OSError as e:
    r = type(e).__name__
r
"""


def test_domain_policies_are_set_shown_and_enforced_by_the_resolver(env: Daemon) -> None:
    with pytest.raises(BadRequestError, match=r"network\.allow_domains"):
        Sandbox(network=NetworkPolicy(allow_domains=["not a name"]))
    policy = NetworkPolicy(internet=False, allow_domains=["pypi.org", "*.pythonhosted.org"])
    with Sandbox(network=policy) as sb:
        assert sb.network == policy
        # A name outside the allow list is refused by the sandbox's own resolver, on the
        # host side of its namespace: no query leaves the lab.
        assert sb.run_code(RESOLVE.format(name="example.com")).text == "'gaierror'"
        sb.set_network(NetworkPolicy(internet=True, deny_domains=["example.com"]))
        assert sb.network is not None and sb.network.deny_domains == ["example.com"]
        assert sb.run_code(RESOLVE.format(name="www.example.com")).text == "'gaierror'"
        assert Sandbox.connect(sb.id).network == sb.network


def test_daemon_errors_are_typed(env: Daemon) -> None:
    with pytest.raises(AuthenticationError):
        Sandbox(api_key="fsk_wrong")
    sb = Sandbox()
    sid = sb.id
    sb.close()
    with pytest.raises(NotFoundError):
        Sandbox.connect(sid)
    opened: list[Sandbox] = []
    try:
        with pytest.raises(RateLimitError) as e:
            for _ in range(MAX_SANDBOXES + 1):
                opened.append(Sandbox())
        assert "sandboxes" in e.value.message
    finally:
        for s in opened:
            s.close()


def test_a_lifetime_limit_closes_the_sandbox(env: Daemon) -> None:
    sb = Sandbox(max_lifetime=3)
    try:
        assert sb.info().max_lifetime_s == 3
        deadline = time.monotonic() + 120
        while True:
            try:
                sb.info()
            except NotFoundError:
                break
            assert time.monotonic() < deadline, "the lifetime limit did not close it"
            time.sleep(0.5)
    finally:
        sb.close()
    with pytest.raises(BadRequestError):
        Sandbox(max_lifetime=0)


def test_async_sandbox(env: Daemon) -> None:
    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            out: list[str] = []
            ex = await sb.run_code("print('hi')\n2 ** 10", on_stdout=out.append)
            assert ex.text == "1024" and out == ["hi\n"]
            [child] = await sb.fork(1)
            try:
                await child.run_code("v = 'child'")
                await sb.merge_into(child)
                assert (await sb.run_code("v")).text == "'child'"
            finally:
                await child.close()
            await sb.files.write("/tmp/a.txt", b"\x00\x01")
            assert await sb.files.read("/tmp/a.txt", format="bytes") == b"\x00\x01"

    asyncio.run(main())


SDK_TEMPLATE = """
name = "sdk-made"
warmup = "ratios = {k: v / 4 for k, v in dict(a=1, b=2).items()}"
[env]
SDK_TEMPLATE = "yes"
[[files]]
dest = "/opt/sdk/hello.txt"
content = "hello from the spec\\n"
[[run]]
command = "echo building; wc -c < /opt/sdk/hello.txt"
"""


def test_a_template_built_from_a_spec_starts_sandboxes_with_its_state(env: Daemon) -> None:
    lines: list[str] = []
    made = Templates.build(SDK_TEMPLATE, on_output=lines.append)
    try:
        assert made.name == "sdk-made" and made.base == "python-datasci"
        assert made.ready and made.ready[0].ready
        assert any(line.startswith("==> 512x1: run[0]: echo building") for line in lines), lines
        assert "building\n" in lines and "20\n" in lines, lines
        assert "sdk-made" in [t.name for t in Templates.list()]
        with Sandbox(template="sdk-made") as sb:
            assert sb.run_code("ratios").text == "{'a': 0.25, 'b': 0.5}"
            assert sb.run_code("import os; os.environ['SDK_TEMPLATE']").text == "'yes'"
            assert sb.files.read("/opt/sdk/hello.txt") == "hello from the spec\n"
        with pytest.raises(BadRequestError, match=r"files\[0\]\.dest"):
            Templates.build("name = 'bad'\n[[files]]\ndest = 'relative'\ncontent = ''")
        with pytest.raises(TemplateBuildError, match="exited with status 2") as failed:
            Templates.build("name = 'sdk-broken'\n[[run]]\ncommand = 'echo oops; exit 2'\n")
        assert "oops\n" in failed.value.output
        names = asyncio.run(AsyncTemplates.list())
        assert "sdk-made" in [t.name for t in names] and "sdk-broken" not in [t.name for t in names]
    finally:
        Templates.delete("sdk-made")
    assert "sdk-made" not in [t.name for t in Templates.list()]
    with pytest.raises(NotFoundError):
        Sandbox(template="sdk-made")


def test_result_formats() -> None:
    from fissile import Result

    png = base64.b64encode(b"\x89PNG").decode()
    r = Result(data={"text/plain": "x", "image/png": png}, is_main_result=True)
    assert r.formats() == ["text", "png"]
    assert r.png_bytes() == b"\x89PNG"
