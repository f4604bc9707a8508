"""(a) A coder agent with a persistent Python REPL in a Fissile sandbox: pandas, then a plot
that reaches the model as an image. State persists between the tool calls."""

from __future__ import annotations

import asyncio

from agents import Agent, Runner

from _common import model, run_python, say, show_tool_outputs, step
from fissile import AsyncSandbox
from fissile.openai_agents import fissile_code_interpreter

LOAD = """import pandas as pd
trips = pd.DataFrame({
    "borough": ["Manhattan", "Brooklyn", "Queens", "Manhattan", "Bronx", "Queens", "Brooklyn"],
    "km": [3.1, 5.4, 7.9, 2.2, 6.0, 9.3, 4.8],
})
by_borough = trips.groupby("borough").km.mean().round(2)
by_borough"""

PLOT = """import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
ax = by_borough.sort_values().plot.barh(title="average trip length (km)")
plt.tight_layout()
plt.show()"""


async def main() -> None:
    with step("create a sandbox"):
        sb = await AsyncSandbox.create(metadata={"example": "coder"})
    async with sb:
        coder = Agent(
            name="coder",
            instructions="You answer data questions by running Python with run_python. "
            "State persists between calls.",
            tools=[fissile_code_interpreter(sandbox=sb)],
            model=model(
                [
                    run_python(LOAD, "c1"),
                    run_python(PLOT, "c2"),
                    say("Queens has the longest trips on average (8.6 km); chart attached."),
                ]
            ),
        )
        with step("Runner.run(coder): two tool calls, one plot"):
            result = await Runner.run(
                coder, "Compute the average trip length by borough and plot it."
            )
        show_tool_outputs(result)
        print(f"   final answer: {result.final_output}")
        with step("the REPL still holds the DataFrame"):
            print("   " + str((await sb.run_code("len(trips)")).text) + " trips")


if __name__ == "__main__":
    asyncio.run(main())
