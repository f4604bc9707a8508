"""(b) Handoffs: a coordinator hands the question to a coder (who has the sandbox), and the
coder hands its numbers to a writer (no tools). Only the coder's calls reach the sandbox."""

from __future__ import annotations

import asyncio

from agents import Agent, Runner
from agents.testing import function_call

from _common import model, run_python, say, step
from fissile import AsyncSandbox
from fissile.openai_agents import fissile_code_interpreter


async def main() -> None:
    async with await AsyncSandbox.create(metadata={"example": "handoffs"}) as sb:
        writer = Agent(
            name="writer",
            instructions="Write one friendly sentence from the numbers you are given.",
            model=model([say("Revenue grew 12.5% in Q2, a strong quarter.")]),
        )
        coder = Agent(
            name="coder",
            instructions="Compute with run_python, then hand off to the writer.",
            tools=[fissile_code_interpreter(sandbox=sb)],
            handoffs=[writer],
            model=model(
                [
                    run_python("q1, q2 = 800, 900\nround((q2 - q1) / q1 * 100, 1)", "c1"),
                    [function_call("transfer_to_writer", {}, call_id="h2")],
                ]
            ),
        )
        coordinator = Agent(
            name="coordinator",
            instructions="Hand numeric questions to the coder.",
            handoffs=[coder],
            model=model([[function_call("transfer_to_coder", {}, call_id="h1")]]),
        )
        with step("coordinator -> coder -> writer"):
            result = await Runner.run(coordinator, "How much did revenue grow from Q1 to Q2?")
        print(f"   last agent: {result.last_agent.name}; answer: {result.final_output}")
        print(
            f"   the sandbox ran {(await sb.run_code('q2 - q1')).text} (q2 - q1), set by the coder"
        )


if __name__ == "__main__":
    asyncio.run(main())
