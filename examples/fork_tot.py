"""(c) Tree of thought with fork: a parent sets up the problem, fork(3) gives each branch the
same state in copy-on-write children, each child's agent tries a different strategy, the best
branch is merged back into the parent (which keeps its id), the children are closed."""

from __future__ import annotations

import asyncio
import time

from agents import Agent, Runner

from _common import model, run_python, say, step
from fissile import AsyncSandbox
from fissile.openai_agents import fissile_code_interpreter

SETUP = """import random
random.seed(7)
items = [(random.randint(1, 30), random.randint(1, 60)) for _ in range(24)]  # (weight, value)
capacity = 100
def score(chosen):
    w = sum(items[i][0] for i in chosen); v = sum(items[i][1] for i in chosen)
    return v if w <= capacity else 0
"""

STRATEGIES = {
    "by value": "chosen = []\nfor i in sorted(range(len(items)), key=lambda i: -items[i][1]):\n"
    "    if score(chosen + [i]): chosen.append(i)\nbest = score(chosen); best",
    "by density": "chosen = []\nfor i in sorted(range(len(items)), "
    "key=lambda i: -items[i][1] / items[i][0]):\n"
    "    if score(chosen + [i]): chosen.append(i)\nbest = score(chosen); best",
    "lightest first": "chosen = []\nfor i in sorted(range(len(items)), "
    "key=lambda i: items[i][0]):\n"
    "    if score(chosen + [i]): chosen.append(i)\nbest = score(chosen); best",
}


async def main() -> None:
    async with await AsyncSandbox.create(metadata={"example": "fork"}) as parent:
        with step("set up the problem in the parent"):
            await parent.run_code(SETUP)
        with step("fork(3)"):
            t0 = time.monotonic()
            children = await parent.fork(len(STRATEGIES))
            print(f"   {len(children)} children answered in {(time.monotonic() - t0) * 1e3:.0f} ms")
        try:
            scores = {}
            for (name, code), child in zip(STRATEGIES.items(), children, strict=True):
                agent = Agent(
                    name=f"branch: {name}",
                    instructions=f"Solve the knapsack greedily, {name}, with run_python.",
                    tools=[fissile_code_interpreter(sandbox=child)],
                    model=model([run_python(code, "c1"), say(f"done ({name})")]),
                )
                with step(f"branch '{name}' in {child.id}"):
                    await Runner.run(agent, "Pick items to maximise value within capacity.")
                    scores[child.id] = int((await child.run_code("best")).text or "0")
                    print(f"   value {scores[child.id]}")
            winner = max(children, key=lambda c: scores[c.id])
            with step(f"merge_into the winner {winner.id}"):
                await parent.merge_into(winner)
            print(f"   parent {parent.id} now has best = {(await parent.run_code('best')).text}")
        finally:
            await asyncio.gather(*(c.close() for c in children))


if __name__ == "__main__":
    asyncio.run(main())
