"""(d) A persistent space: one process builds state and closes the sandbox (which persists
it); a second process resumes the space and finds its Python globals intact."""

from __future__ import annotations

import subprocess
import sys

from _common import step
from fissile import Sandbox


def second_process(space_id: str) -> None:
    with step(f"process 2: Sandbox.resume({space_id!r})"):
        sb = Sandbox.resume(space_id)
    print(f"   notes = {sb.run_code('notes').text}")
    sb.close()


def main() -> None:
    with step("process 1: a persistent sandbox"):
        sb = Sandbox(persistent=True, metadata={"example": "space"})
    sb.run_code("notes = {'visits': 1, 'todo': ['plot', 'report']}")
    space = sb.space_id
    assert space is not None
    with step("process 1: close (persists the space)"):
        sb.close()
    subprocess.run([sys.executable, __file__, space], check=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        second_process(sys.argv[1])
    else:
        main()
