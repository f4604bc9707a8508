"""The Python SDK's figures against real sandboxes, each beside a baseline measured in the
same run (`scripts/bench sdk` starts fissiled and runs this):

* create -> first result: `Sandbox()` + `run_code` from the template's ready snapshot, vs
  the same with a shape that has no ready snapshot (a cold boot);
* tool call round trip: the `run_python` tool invoked by `Runner.run` (a scripted model
  asks for one call, then answers), vs the same run with no tool call plus a direct
  `run_code` of the same cell; and the tool's own invocation vs `run_code`;
* fork(5) -> all children answered: `fork(5)` then one cell in each child, concurrently,
  vs five `Sandbox()` creates (ready snapshot) and one cell in each, concurrently.

Times are wall-clock on this host through the lab's port forward; compare the ratios."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agents import Agent, Runner, set_trace_processors, set_tracing_export_api_key
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tool_context import ToolContext

from fissile import Sandbox
from fissile.openai_agents import fissile_code_interpreter

COLD_MEMORY_MIB = 640  # not the ready snapshot's shape (512 MiB x 1 vCPU): a cold boot


def timed(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


def summary(name: str, ms: list[float]) -> float:
    p50 = statistics.median(ms)
    print(f"  {name:<58} p50 {p50:8.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})")
    return p50


def ratio(what: str, x: float, base: float) -> None:
    print(f"  => {what}: {x / base:.3f}x")


def create_first_result(**kw: Any) -> None:
    with Sandbox(**kw) as sb:
        assert sb.run_code("1 + 1").text == "2"


def bench_create(runs: int) -> None:
    print("create -> first result (Sandbox() + run_code('1 + 1'), close not timed in baseline)")
    ready = summary(
        "ready snapshot (template's shape)", [timed(create_first_result) for _ in range(runs)]
    )
    cold = summary(
        f"baseline: cold boot ({COLD_MEMORY_MIB} MiB, no ready snapshot)",
        [timed(lambda: create_first_result(memory_mib=COLD_MEMORY_MIB)) for _ in range(2)],
    )
    ratio("ready / cold boot", ready, cold)


def runner_once(sb: Sandbox, tool_calls: int) -> None:
    turns: list[list[Any]] = [
        [function_call("run_python", {"code": "x = x + 1; x"}, call_id=f"c{i}")]
        for i in range(tool_calls)
    ]
    turns.append([assistant_message("done")])
    agent = Agent(
        name="coder",
        instructions="use run_python",
        tools=[fissile_code_interpreter(sandbox=sb)],
        model=ScriptedModel(turns),
    )
    result = Runner.run_sync(agent, "go")
    assert result.final_output == "done", result.final_output


def bench_tool(runs: int) -> None:
    print("tool call round trip (cell: x = x + 1; x)")
    with Sandbox() as sb:
        sb.run_code("x = 0")
        tool = fissile_code_interpreter(sandbox=sb)
        direct = summary(
            "baseline: sb.run_code (HTTP exec)",
            [timed(lambda: sb.run_code("x = x + 1; x")) for _ in range(runs)],
        )

        def invoke() -> None:
            ctx = ToolContext(
                context=None, tool_name="run_python", tool_call_id="b", tool_arguments="{}"
            )

            async def call() -> Any:
                return await tool.on_invoke_tool(ctx, '{"code": "x = x + 1; x"}')

            out = asyncio.run(call())
            assert out, out

        tool_only = summary(
            "run_python tool invoked alone (on_invoke_tool)", [timed(invoke) for _ in range(runs)]
        )
        none = summary(
            "Runner.run, scripted model, no tool call",
            [timed(lambda: runner_once(sb, 0)) for _ in range(runs)],
        )
        one = summary(
            "Runner.run, scripted model, one run_python call",
            [timed(lambda: runner_once(sb, 1)) for _ in range(runs)],
        )
        ratio("tool invocation / run_code", tool_only, direct)
        ratio("(Runner.run with the call - without) / run_code", one - none, direct)
        print(f"  tool round trip inside Runner.run: {one - none:.1f} ms")


def answer_all(sandboxes: list[Sandbox], code: str) -> None:
    with ThreadPoolExecutor(len(sandboxes)) as pool:
        for e in pool.map(lambda s: s.run_code(code), sandboxes):
            assert e.error is None, e.error


def bench_fork(runs: int, n: int = 5) -> None:
    print(f"fork({n}) -> all children answered")
    forks: list[float] = []
    creates: list[float] = []
    with Sandbox() as parent:
        parent.run_code("x = 41")
        for _ in range(runs):
            t0 = time.perf_counter()
            children = parent.fork(n)
            try:
                answer_all(children, "x + 1")
                forks.append((time.perf_counter() - t0) * 1e3)
            finally:
                for child in children:
                    child.close()
    for _ in range(runs):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            fresh = list(pool.map(lambda _: Sandbox(), range(n)))
        try:
            answer_all(fresh, "1 + 1")
            creates.append((time.perf_counter() - t0) * 1e3)
        finally:
            for s in fresh:
                s.close()
    f = summary(f"fork({n}) + one cell in each child", forks)
    c = summary(f"baseline: {n} concurrent Sandbox() (ready snapshot) + one cell each", creates)
    ratio(f"fork({n}) / {n} creates", f, c)


def main() -> int:
    set_tracing_export_api_key("offline")
    set_trace_processors([])
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    bench_create(max(3, runs // 2))
    bench_tool(runs)
    bench_fork(max(3, runs // 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
