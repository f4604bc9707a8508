"""The OpenAI Agents SDK adapter: a `run_python` tool backed by a Fissile sandbox, and opt-in
branch tools (fork / merge) for agents that manage their own tree of thought.

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

Branch tools are off by default: `fissile_code_interpreter` never forks. An application that
wants the model to explore alternatives side by side adds a `FissileBranches` registry's tools
next to `run_python`, and closes the registry when the run is over:

```python
async with FissileBranches(sandbox, max_children=4) as branches:
    agent = Agent(name="explorer", tools=[fissile_code_interpreter(sandbox=sandbox),
                                          *branches.tools])
    await Runner.run(agent, "try three ways to fit this curve and keep the best")
# branches the model left open are closed here
```

The model gets four tools. `fork_sandbox(n)` forks the main sandbox (the one `run_python`
uses) into `n` copy-on-write children and answers with short handles (`b1`, `b2`, ...;
numbered over the registry's life and never reused, so a stale handle is an error rather
than another branch). `run_python_in_branch(branch, code)` runs code in one of them, rendered
like `run_python`. `merge_branch(branch)` makes the main sandbox adopt that branch's state
(`merge_into`; it keeps its id, so `run_python` now sees the branch's variables and files),
then closes every branch of that fork, the merged one too. `discard_branches(branches)` closes
some or all of them without merging. A separate `run_python_in_branch` rather than a `branch`
argument on `run_python` keeps the plain tool exactly as it is when branching is off, keeps
the main line and the branches apart in every call the model makes, and lets the two be added
independently. One fork's branches are open at a time (the daemon only merges children of a
sandbox's latest fork): the model merges or discards them before forking again, so deeper
search is fork, compare, merge, fork again. Calls in one model turn run concurrently (so
branches run in parallel); fork, merge and discard take turns and finish even if the run is
cancelled (so the registry holds every child made, for `close`). Every answer, Fissile failures
included, is text for the model; each call opens a `fissile.exec` (code in a branch, with its
handle), `fissile.fork`, `fissile.merge` or `fissile.discard` span.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

from agents import FunctionTool, Tool, ToolOutputImage, ToolOutputText
from agents.tool_context import ToolContext
from agents.tracing import custom_span
from pydantic import BaseModel, ConfigDict, Field

from ._async import AsyncSandbox
from ._errors import FissileError, ForkError
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

_ToolOutput: TypeAlias = str | list[ToolOutputText | ToolOutputImage]
"""What a tool of this module answers: text, or text and images."""

_Args = TypeVar("_Args", bound=BaseModel)


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


def _function_tool(
    name: str,
    description: str,
    args_model: type[_Args],
    handler: Callable[[ToolContext[Any], _Args], Awaitable[_ToolOutput]],
) -> FunctionTool:
    """A strict-schema `FunctionTool` whose arguments are parsed into `args_model`; invalid
    arguments are answered as text."""

    async def invoke(ctx: ToolContext[Any], arguments: str) -> _ToolOutput:
        try:
            args = args_model.model_validate(json.loads(arguments or "{}"))
        except ValueError as e:
            return f"invalid arguments for {name}: {e}"
        return await handler(ctx, args)

    schema = args_model.model_json_schema()
    schema["additionalProperties"] = False
    return FunctionTool(
        name=name,
        description=description,
        params_json_schema=schema,
        on_invoke_tool=invoke,
        strict_json_schema=True,
    )


def _span_data(ctx: ToolContext[Any], sandbox: Sandbox | AsyncSandbox) -> dict[str, Any]:
    """What every span of this module records: the sandbox and the calling agent."""
    return {"sandbox_id": sandbox.id, "agent": getattr(getattr(ctx, "agent", None), "name", None)}


async def _run_cell(
    sandbox: Sandbox | AsyncSandbox,
    code: str,
    data: dict[str, Any],
    *,
    timeout: float | None,
    max_output_chars: int,
    on_output: Callable[[str, str], Any] | None,
) -> _ToolOutput:
    """Runs `code` in `sandbox` under a `fissile.exec` span (starting from `data`); what the
    model sees."""

    def out(stream: str) -> Callable[[str], None] | None:
        if on_output is None:
            return None
        return lambda text: on_output(stream, text)

    data["code"] = truncate(code, SPAN_TEXT_CHARS)
    with custom_span("fissile.exec", data=data):
        try:
            if isinstance(sandbox, AsyncSandbox):
                ex = await sandbox.run_code(
                    code, timeout=timeout, on_stdout=out("stdout"), on_stderr=out("stderr")
                )
            else:
                ex = await asyncio.to_thread(
                    sandbox.run_code,
                    code,
                    timeout=timeout,
                    on_stdout=out("stdout"),
                    on_stderr=out("stderr"),
                )
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

    async def run(ctx: ToolContext[Any], args: RunPythonArgs) -> _ToolOutput:
        return await _run_cell(
            sandbox,
            args.code,
            _span_data(ctx, sandbox),
            timeout=timeout,
            max_output_chars=max_output_chars,
            on_output=on_output,
        )

    return _function_tool(name, DESCRIPTION, RunPythonArgs, run)


# Branch tools (opt-in): see the module docstring.

FORK_TOOL = "fork_sandbox"
RUN_IN_BRANCH_TOOL = "run_python_in_branch"
MERGE_TOOL = "merge_branch"
DISCARD_TOOL = "discard_branches"


class ForkSandboxArgs(BaseModel):
    """`fork_sandbox`'s parameters."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(description="How many branches to make.")


class RunInBranchArgs(BaseModel):
    """`run_python_in_branch`'s parameters."""

    model_config = ConfigDict(extra="forbid")
    branch: str = Field(description='A branch handle from fork_sandbox, e.g. "b1".')
    code: str = Field(description="Python source to run in that branch's persistent REPL.")


class MergeBranchArgs(BaseModel):
    """`merge_branch`'s parameters."""

    model_config = ConfigDict(extra="forbid")
    branch: str = Field(description='The handle of the branch to keep, e.g. "b2".')


class DiscardBranchesArgs(BaseModel):
    """`discard_branches`' parameters."""

    model_config = ConfigDict(extra="forbid")
    branches: list[str] | None = Field(
        default=None, description="Handles of the branches to close; null closes every one."
    )


async def _close(sandbox: Sandbox | AsyncSandbox) -> None:
    if isinstance(sandbox, AsyncSandbox):
        await sandbox.close()
    else:
        await asyncio.to_thread(sandbox.close)


class FissileBranches:
    """Branch tools for the model over `sandbox` (the main sandbox, the one the application's
    `run_python` uses), and the registry of the branches it has open.

    `tools` is `[fork_sandbox, run_python_in_branch, merge_branch, discard_branches]`; add
    them to an `Agent` next to `fissile_code_interpreter(sandbox=sandbox)`. A fork makes at
    most `max_children` branches. `timeout` and `max_output_chars` are those of
    `fissile_code_interpreter`; `main_tool` is the name of the application's `run_python`
    tool, quoted in the descriptions. The registry never closes `sandbox` itself; `close()`
    (or `with`) / `aclose()` (or `async with`, and the only way for an `AsyncSandbox`) closes
    the branches the model left open."""

    def __init__(
        self,
        sandbox: Sandbox | AsyncSandbox,
        *,
        max_children: int = 4,
        timeout: float | None = 300.0,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        main_tool: str = "run_python",
    ):
        if max_children < 1:
            raise ValueError(f"max_children must be at least 1, not {max_children}")
        self.sandbox = sandbox
        self.max_children = max_children
        self._timeout = timeout
        self._max_output_chars = max_output_chars
        self._open: dict[str, Sandbox | AsyncSandbox] = {}
        self._made = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        main = f"the main sandbox (the one {main_tool} uses)"
        self.tools: list[Tool] = [
            _function_tool(
                FORK_TOOL,
                f"Fork {main} into n independent branches (n from 1 to {max_children}) to try "
                "different approaches side by side. Each branch starts as a copy of the main "
                "sandbox's current state (variables, imports, files) and then changes on its "
                "own; the main sandbox is unchanged. Returns the branch handles (b1, b2, ...). "
                f"Run code in a branch with {RUN_IN_BRANCH_TOOL}, then keep the best one with "
                f"{MERGE_TOOL} or drop them with {DISCARD_TOOL}. Only one fork's branches can "
                "be open at a time: merge or discard them before forking again.",
                ForkSandboxArgs,
                self._exclusive(self._fork),
            ),
            _function_tool(
                RUN_IN_BRANCH_TOOL,
                f"Run Python code in one branch made by {FORK_TOOL}, given its handle. Works "
                f"like {main_tool} (state persists across calls; you get the value, stdout, "
                "stderr, images and errors) but only in that branch: the main sandbox and the "
                "other branches do not see its changes.",
                RunInBranchArgs,
                self._run,
            ),
            _function_tool(
                MERGE_TOOL,
                f"Keep one branch: {main} adopts that branch's whole state (variables, "
                f"imports, files), replacing its own, so {main_tool} continues from it. Then "
                "every branch of that fork is closed, the merged one included (the main "
                f"sandbox now holds its state), and their handles stop working; {FORK_TOOL} "
                "again to explore further from the merged state.",
                MergeBranchArgs,
                self._exclusive(self._merge),
            ),
            _function_tool(
                DISCARD_TOOL,
                f"Close branches made by {FORK_TOOL} without merging them; the main sandbox "
                "is unchanged. Pass the handles to close, or null to close every open branch.",
                DiscardBranchesArgs,
                self._exclusive(self._discard),
            ),
        ]

    @property
    def branches(self) -> dict[str, Sandbox | AsyncSandbox]:
        """The open branches by handle (a copy)."""
        return dict(self._open)

    def _exclusive(
        self, handler: Callable[[ToolContext[Any], _Args], Awaitable[str]]
    ) -> Callable[[ToolContext[Any], _Args], Awaitable[str]]:
        """`handler` (fork, merge or discard) one at a time, and run to its end even if the
        tool call is cancelled, so that the registry knows every child it has made."""

        async def locked(ctx: ToolContext[Any], args: _Args) -> str:
            loop = asyncio.get_running_loop()
            if self._lock is None or self._lock_loop is not loop:  # asyncio.run again
                self._lock, self._lock_loop = asyncio.Lock(), loop
            async with self._lock:
                return await handler(ctx, args)

        async def run(ctx: ToolContext[Any], args: _Args) -> str:
            return await asyncio.shield(locked(ctx, args))

        return run

    def _describe_open(self) -> str:
        if not self._open:
            return f"there are no open branches ({FORK_TOOL} makes some)"
        return f"open branches: {', '.join(self._open)}"

    def _lookup(self, branch: str) -> str | None:
        """The open handle `branch` names (`b2`, `B2` and `2` alike), or `None`."""
        handle = branch.strip().lower()
        handle = f"b{handle}" if handle.isdigit() else handle
        return handle if handle in self._open else None

    async def _close_branches(self, handles: Iterable[str]) -> list[str]:
        """Closes these open branches (concurrently); the failures, as text."""
        handles = list(handles)
        sandboxes = [self._open.pop(h) for h in handles]
        outcomes = await asyncio.gather(*(_close(s) for s in sandboxes), return_exceptions=True)
        return [
            f"{h}: {type(o).__name__}: {o}"
            for h, o in zip(handles, outcomes, strict=True)
            if isinstance(o, BaseException)
        ]

    async def _fork(self, ctx: ToolContext[Any], args: ForkSandboxArgs) -> str:
        n = args.n
        if not 1 <= n <= self.max_children:
            return (
                f"{FORK_TOOL} refused n={n}: n must be between 1 and {self.max_children}. "
                "No branches were made."
            )
        if self._open:
            return (
                f"{FORK_TOOL} refused: the branches of an earlier fork are still open "
                f"({', '.join(self._open)}). Keep one with {MERGE_TOOL} or close them with "
                f"{DISCARD_TOOL} first. No branches were made."
            )
        data = {**_span_data(ctx, self.sandbox), "n": n}
        with custom_span("fissile.fork", data=data):
            errors: list[str] = []
            try:
                if isinstance(self.sandbox, AsyncSandbox):
                    children: Sequence[Sandbox | AsyncSandbox] = await self.sandbox.fork(n)
                else:
                    children = await asyncio.to_thread(self.sandbox.fork, n)
            except ForkError as e:
                children, errors = e.children, e.errors
            except FissileError as e:
                data["error"] = e.message
                return f"the fork failed: {type(e).__name__}: {e.message}"
            handles: list[str] = []
            for child in children:
                self._made += 1
                handles.append(f"b{self._made}")
                self._open[handles[-1]] = child
            data["branches"] = {h: self._open[h].id for h in handles}
            if errors:
                data["error"] = "; ".join(errors)
        text = f"branches: {', '.join(handles) or 'none'}"
        if errors:
            text += f"\n{len(errors)} of the {n} branches failed to start: {'; '.join(errors)}"
        if handles:
            text += (
                "\nEach is a copy of the main sandbox's current state; the main sandbox is "
                f"unchanged. Use {RUN_IN_BRANCH_TOOL}, then {MERGE_TOOL} or {DISCARD_TOOL}."
            )
        return text

    async def _run(self, ctx: ToolContext[Any], args: RunInBranchArgs) -> _ToolOutput:
        handle = self._lookup(args.branch)
        if handle is None:
            return f"no open branch {args.branch!r}: {self._describe_open()}"
        sandbox = self._open[handle]
        return await _run_cell(
            sandbox,
            args.code,
            {**_span_data(ctx, sandbox), "branch": handle},
            timeout=self._timeout,
            max_output_chars=self._max_output_chars,
            on_output=None,
        )

    async def _merge(self, ctx: ToolContext[Any], args: MergeBranchArgs) -> str:
        handle = self._lookup(args.branch)
        if handle is None:
            return f"no open branch {args.branch!r}: {self._describe_open()}. Nothing merged."
        winner = self._open[handle]
        data = {**_span_data(ctx, self.sandbox), "branch": handle, "winner_id": winner.id}
        with custom_span("fissile.merge", data=data):
            try:
                if isinstance(self.sandbox, AsyncSandbox):
                    await self.sandbox.merge_into(winner.id)
                else:
                    await asyncio.to_thread(self.sandbox.merge_into, winner.id)
            except FissileError as e:
                data["error"] = e.message
                return (
                    f"the merge failed: {type(e).__name__}: {e.message}. The main sandbox "
                    f"is unchanged; {self._describe_open()}."
                )
            closed = list(self._open)
            failures = await self._close_branches(closed)
            data["closed"] = closed
            if failures:
                data["error"] = "; ".join(failures)
        text = (
            f"merged {handle} into the main sandbox: it now has {handle}'s variables, imports "
            f"and files. Closed the branches of that fork: {', '.join(closed)}."
        )
        if failures:
            text += f" (Closing some failed: {'; '.join(failures)}.)"
        return text

    async def _discard(self, ctx: ToolContext[Any], args: DiscardBranchesArgs) -> str:
        if args.branches is None:
            handles = list(self._open)
        else:
            found = {b: self._lookup(b) for b in args.branches}
            unknown = [b for b, h in found.items() if h is None]
            if unknown:
                return (
                    f"no open branch {', '.join(map(repr, unknown))}: "
                    f"{self._describe_open()}. Nothing was closed."
                )
            handles = list(dict.fromkeys(h for h in found.values() if h is not None))
        if not handles:
            return f"nothing to close: {self._describe_open()}."
        data = {**_span_data(ctx, self.sandbox), "branches": handles}
        with custom_span("fissile.discard", data=data):
            failures = await self._close_branches(handles)
            if failures:
                data["error"] = "; ".join(failures)
        text = (
            f"closed {', '.join(handles)}; the main sandbox is unchanged; {self._describe_open()}."
        )
        if failures:
            text += f" (Closing some failed: {'; '.join(failures)}.)"
        return text

    def close(self) -> None:
        """Closes every open branch of a sync `Sandbox` (for an `AsyncSandbox`: `aclose`).
        Raises the first failure after trying them all."""
        self._check_sync()
        sandboxes = [s for s in self._open.values() if isinstance(s, Sandbox)]
        self._open.clear()
        failures: list[Exception] = []
        for sb in sandboxes:
            try:
                sb.close()
            except Exception as e:
                failures.append(e)
        if failures:
            raise failures[0]

    async def aclose(self) -> None:
        """Closes every open branch (concurrently). Raises the first failure after trying
        them all."""
        sandboxes = list(self._open.values())
        self._open.clear()
        outcomes = await asyncio.gather(*(_close(s) for s in sandboxes), return_exceptions=True)
        for o in outcomes:
            if isinstance(o, BaseException):
                raise o

    def _check_sync(self) -> None:
        if isinstance(self.sandbox, AsyncSandbox):
            raise TypeError(
                "the branches of an AsyncSandbox close with `await aclose()` or `async with`"
            )

    def __enter__(self) -> FissileBranches:
        self._check_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> FissileBranches:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = [
    "DESCRIPTION",
    "DISCARD_TOOL",
    "FORK_TOOL",
    "MERGE_TOOL",
    "RUN_IN_BRANCH_TOOL",
    "DiscardBranchesArgs",
    "FissileBranches",
    "ForkSandboxArgs",
    "MergeBranchArgs",
    "RunInBranchArgs",
    "RunPythonArgs",
    "fissile_code_interpreter",
    "render",
    "truncate",
]
