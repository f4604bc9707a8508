"""The OpenAI Agents SDK adapter: a `run_python` tool backed by a Fissile sandbox.

```python
from agents import Agent, Runner
from fissile import Sandbox
from fissile.openai_agents import fissile_code_interpreter

sandbox = Sandbox()
coder = Agent(name="coder", instructions="Use run_python; state persists between calls.",
              tools=[fissile_code_interpreter(sandbox=sandbox)])
result = await Runner.run(coder, "compute the mean of [1, 2, 3] and plot it")
```

The tool's output goes to the model as text (stdout, stderr, the value, the error) plus one
image per PNG the cell produced. Errors of the code are rendered for the model, never raised;
so are Fissile failures (the model can try again or explain). Long output is cut to its head
and tail with a note of how much was cut. Each call opens a `fissile.exec` custom span (under
the runner's function span) with the code, the sandbox id, the calling agent, the server-side
duration and truncated output. The Agents SDK has no tool-progress events, so `on_output`
(called with each stdout/stderr chunk while the cell runs; from a worker thread for a sync
`Sandbox`) is how an application streams progress. Requires `pip install fissile[agents]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from agents import FunctionTool, ToolOutputImage, ToolOutputText
from agents.tool_context import ToolContext
from agents.tracing import custom_span
from pydantic import BaseModel, ConfigDict, Field

from ._async import AsyncSandbox
from ._errors import FissileError
from ._models import Execution
from ._sync import Sandbox

DEFAULT_MAX_OUTPUT_CHARS = 20_000
SPAN_TEXT_CHARS = 4_000

DESCRIPTION = (
    "Run Python code in a persistent, isolated Python REPL (a microVM with numpy, pandas, "
    "matplotlib and more). State persists across calls: variables, imports, DataFrames and "
    "files stay for the next call, so build on earlier results instead of recomputing them. "
    "The value of the last expression is returned, along with stdout and stderr; matplotlib "
    "figures (plt.show() or a figure as the last expression) come back as images. If the code "
    "raises, you get the exception and the end of its traceback."
)


class RunPythonArgs(BaseModel):
    """The tool's parameters."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="Python source to run in the persistent REPL.")


def truncate(text: str, limit: int) -> str:
    """`text` cut to its head and tail (with a note of how much was cut) if over `limit`."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[-tail:]}"


def render(ex: Execution, max_output_chars: int) -> str:
    """The text the model sees for one execution."""
    parts: list[str] = []
    stdout = "".join(ex.logs.stdout)
    stderr = "".join(ex.logs.stderr)
    if stdout:
        parts.append(f"stdout:\n{stdout.rstrip()}")
    if stderr:
        parts.append(f"stderr:\n{stderr.rstrip()}")
    for r in ex.results:
        if r.is_main_result and r.text is not None:
            parts.append(f"value:\n{r.text}")
    images = sum(1 for r in ex.results if r.png)
    if images:
        parts.append(f"({images} image{'s' if images > 1 else ''} attached)")
    if ex.error is not None:
        tb = "\n".join(ex.error.traceback[-8:])
        parts.append(f"error: {ex.error.name}: {ex.error.value}\n{tb}".rstrip())
    if ex.timed_out:
        parts.append("(the cell hit its time limit and was interrupted; state is kept)")
    if ex.state_lost:
        parts.append("(the interpreter was restarted: earlier variables and imports are gone)")
    text = "\n\n".join(parts) or "(no output)"
    return truncate(text, max_output_chars)


def fissile_code_interpreter(
    sandbox: Sandbox | AsyncSandbox,
    *,
    name: str = "run_python",
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    timeout: float | None = 300.0,
    on_output: Callable[[str, str], Any] | None = None,
) -> FunctionTool:
    """A `FunctionTool` that runs the model's code in `sandbox`'s persistent REPL.

    `on_output(stream, text)` gets each stdout/stderr chunk while the cell runs. `timeout`
    bounds each cell (the REPL keeps its state when it passes)."""

    def out(stream: str) -> Callable[[str], None] | None:
        if on_output is None:
            return None
        return lambda text: on_output(stream, text)

    async def run(code: str) -> Execution:
        if isinstance(sandbox, AsyncSandbox):
            return await sandbox.run_code(
                code, timeout=timeout, on_stdout=out("stdout"), on_stderr=out("stderr")
            )
        return await asyncio.to_thread(
            sandbox.run_code,
            code,
            timeout=timeout,
            on_stdout=out("stdout"),
            on_stderr=out("stderr"),
        )

    async def invoke(ctx: ToolContext[Any], arguments: str) -> Any:
        try:
            args = RunPythonArgs.model_validate(json.loads(arguments or "{}"))
        except ValueError as e:
            return f"invalid arguments for {name}: {e}"
        agent = getattr(ctx, "agent", None)
        data: dict[str, Any] = {
            "sandbox_id": sandbox.id,
            "agent": getattr(agent, "name", None),
            "code": truncate(args.code, SPAN_TEXT_CHARS),
        }
        with custom_span("fissile.exec", data=data):
            try:
                ex = await run(args.code)
            except FissileError as e:
                data["error"] = e.message
                return f"the sandbox failed: {type(e).__name__}: {e.message}"
            data.update(
                server_ms=ex.server_ms,
                duration_ms=ex.duration_ms,
                stdout=truncate("".join(ex.logs.stdout), SPAN_TEXT_CHARS),
                stderr=truncate("".join(ex.logs.stderr), SPAN_TEXT_CHARS),
                error=None if ex.error is None else f"{ex.error.name}: {ex.error.value}",
            )
        output: list[ToolOutputText | ToolOutputImage] = [
            ToolOutputText(text=render(ex, max_output_chars))
        ]
        for r in ex.results:
            if r.png:
                output.append(ToolOutputImage(image_url=f"data:image/png;base64,{r.png}"))
        return output

    schema = RunPythonArgs.model_json_schema()
    schema["additionalProperties"] = False
    return FunctionTool(
        name=name,
        description=DESCRIPTION,
        params_json_schema=schema,
        on_invoke_tool=invoke,
        strict_json_schema=True,
    )


__all__ = ["DESCRIPTION", "RunPythonArgs", "fissile_code_interpreter", "render", "truncate"]
