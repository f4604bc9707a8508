"""The opt-in branch tools (`FissileBranches`: fork_sandbox, run_python_in_branch, merge_branch,
discard_branches) under `Runner.run` with the real openai-agents package, a scripted model
(`agents.testing.ScriptedModel`) and real sandboxes."""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, Runner
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tracing import set_trace_processors

from fissile import AsyncSandbox, Sandbox
from fissile.openai_agents import FissileBranches, fissile_code_interpreter

from .conftest import Daemon
from .test_agents import Spans, call


def tool(name: str, call_id: str, **args: Any) -> Any:
    """A scripted function call of tool `name`."""
    return function_call(name, args, call_id=call_id)


def outputs(model: ScriptedModel) -> dict[str, str]:
    """The text each tool call answered, as the model saw it, by call id."""
    seen: dict[str, str] = {}
    for c in model.calls:
        for item in c.input if isinstance(c.input, list) else []:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                out = item["output"]
                seen[item["call_id"]] = (
                    out if isinstance(out, str) else "\n".join(p.get("text", "") for p in out)
                )
    return seen


def test_the_model_forks_runs_in_branches_and_merges_one(env: Daemon) -> None:
    forks, execs = Spans("fissile.fork"), Spans("fissile.exec")
    set_trace_processors([forks, execs])
    model = ScriptedModel(
        [
            call("x = 1", "c1"),
            [tool("fork_sandbox", "c2", n=2)],
            [  # one turn, two calls: the branches run concurrently
                tool("run_python_in_branch", "c3", branch="b1", code="x = 10\nx"),
                tool("run_python_in_branch", "c4", branch="b2", code="x = 20\nx"),
            ],
            [tool("merge_branch", "c5", branch="b2")],
            call("x", "c6"),
            [assistant_message("done")],
        ]
    )
    with Sandbox() as sb, FissileBranches(sb, max_children=4) as branches:
        agent = Agent(
            name="explorer",
            instructions="Explore with branches.",
            model=model,
            tools=[fissile_code_interpreter(sandbox=sb), *branches.tools],
        )
        result = asyncio.run(Runner.run(agent, "explore"))
        assert result.final_output == "done"
        out = outputs(model)
        assert out["c2"].startswith("branches: b1, b2"), out["c2"]
        assert "value:\n10" in out["c3"] and "value:\n20" in out["c4"], out
        assert out["c5"].startswith("merged b2"), out["c5"]
        assert "value:\n20" in out["c6"], out["c6"]  # run_python sees the merged state
        assert branches.branches == {}

        [fork] = forks.spans
        children = set(fork["branches"].values())
        assert len(children) == 2 and sb.id not in children
        live = {s.id for s in Sandbox.list()}
        assert sb.id in live and not children & live, "merge_branch closed both children"
        assert sb.run_code("x").text == "20"  # the parent keeps its id and answers
    assert len(execs.spans) == 4
    in_branches = {s["branch"]: s["sandbox_id"] for s in execs.spans if "branch" in s}
    assert in_branches == fork["branches"]


def test_fork_above_max_children_is_refused_and_the_registry_closes_what_is_left(
    env: Daemon,
) -> None:
    forks = Spans("fissile.fork")
    set_trace_processors([forks])

    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            before = {s.id for s in await AsyncSandbox.list()}
            async with FissileBranches(sb, max_children=2) as branches:
                refused = ScriptedModel(
                    [
                        [tool("fork_sandbox", "r1", n=3)],
                        [tool("run_python_in_branch", "r2", branch="b1", code="1")],
                        [tool("merge_branch", "r3", branch="b1")],
                        [assistant_message("gave up")],
                    ]
                )
                agent = Agent(name="explorer", model=refused, tools=branches.tools)
                assert (await Runner.run(agent, "explore")).final_output == "gave up"
                out = outputs(refused)
                assert "refused n=3" in out["r1"] and "between 1 and 2" in out["r1"], out["r1"]
                assert "No branches were made" in out["r1"]
                assert "no open branch 'b1'" in out["r2"] and "fork_sandbox" in out["r2"]
                assert "Nothing merged" in out["r3"]
                assert {s.id for s in await AsyncSandbox.list()} == before
                assert forks.spans == []

                pruned = ScriptedModel(
                    [
                        [tool("fork_sandbox", "p1", n=2)],
                        [tool("discard_branches", "p2", branches=["b1"])],
                        [tool("run_python_in_branch", "p3", branch="b1", code="1")],
                        [tool("fork_sandbox", "p4", n=1)],
                        [assistant_message("left b2 open")],
                    ]
                )
                agent = Agent(name="explorer", model=pruned, tools=branches.tools)
                await Runner.run(agent, "explore")
                out = outputs(pruned)
                assert out["p1"].startswith("branches: b1, b2"), out["p1"]
                assert out["p2"].startswith("closed b1") and "open branches: b2" in out["p2"]
                assert "no open branch 'b1'" in out["p3"]
                assert "still open (b2)" in out["p4"], out["p4"]  # merge or discard first
                [fork] = forks.spans
                ids = fork["branches"]
                live = {s.id for s in await AsyncSandbox.list()}
                assert ids["b1"] not in live and ids["b2"] in live
                assert list(branches.branches) == ["b2"]
            live = {s.id for s in await AsyncSandbox.list()}
            assert ids["b2"] not in live, "closing the registry closes the open branches"
            assert (await sb.run_code("6 * 7")).text == "42"

    asyncio.run(main())
