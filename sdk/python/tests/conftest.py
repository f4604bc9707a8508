"""A real fissiled for the SDK's tests: `FISSILE_API_URL`/`FISSILE_API_KEY` if set, else one
started with `fissile-lab serve` (in the lab on a KVM-PVM host, natively where KVM boots
standard guests) on a free loopback port, stopped at the end of the session.

When that lab froze (`fissile-lab` exit status 75: QEMU's TCG with nested SVM now and then
stops running the lab's timers) and tests failed, the session exits with status 75 too: no
verdict on the SDK, and scripts/test runs the tests again in a fresh lab."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

READY_TIMEOUT_S = 1200.0
MAX_SANDBOXES = 8
"""The served daemon's per-tenant limit (the quota test hits it)."""
LAB_FROZE = 75
"""`fissile-lab`'s exit status when its lab froze."""
_lab_froze = False


@dataclass(frozen=True)
class Daemon:
    url: str
    key: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lab_binary() -> str:
    bin_dir = os.environ.get("FISSILE_BIN_DIR")
    if bin_dir and (Path(bin_dir) / "fissile-lab").exists():
        return str(Path(bin_dir) / "fissile-lab")
    found = shutil.which("fissile-lab")
    if not found:
        pytest.fail("no fissile-lab: run scripts/setup.sh (it sets FISSILE_BIN_DIR)")
    return found


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    if os.environ.get("FISSILE_API_URL") and os.environ.get("FISSILE_API_KEY"):
        yield Daemon(os.environ["FISSILE_API_URL"], os.environ["FISSILE_API_KEY"])
        return
    port = _free_port()
    proc = subprocess.Popen(
        [
            _lab_binary(),
            "serve",
            "--tenant",
            "sdk-tests",
            "--port",
            str(port),
            "--timeout",
            "3600",
            "--",
            "--max-sandboxes-per-tenant",
            str(MAX_SANDBOXES),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
            print("serve|", line, end="")

    threading.Thread(target=pump, daemon=True).start()
    url = key = None
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                pytest.fail("fissile-lab serve did not get ready")
            try:
                line = lines.get(timeout=min(left, 5.0)).strip()
            except queue.Empty:
                continue
            if line.startswith("FISSILE_API_URL="):
                url = line.split("=", 1)[1]
            elif line.startswith("FISSILE_API_KEY="):
                key = line.split("=", 1)[1]
            elif line.startswith("READY ") and url and key:
                break
        # The first request through the port forward, alone, before any test's burst.
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("fissiled does not answer through the forwarded port")
            time.sleep(0.5)
        yield Daemon(url, key)
    finally:
        global _lab_froze
        # A freeze that cut the last test off: fissile-lab is about to exit 75.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _lab_froze = proc.poll() == LAB_FROZE
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _lab_froze and exitstatus != 0:
        print(f"\nthe lab under fissiled froze: exit status {LAB_FROZE} (run the tests again)")
        session.exitstatus = LAB_FROZE


@pytest.fixture
def env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """The daemon's URL and key in the environment, as a user would set them."""
    monkeypatch.setenv("FISSILE_API_URL", daemon.url)
    monkeypatch.setenv("FISSILE_API_KEY", daemon.key)
    return daemon
