"""The Agents SDK adapter with the real openai-agents package, a scripted model
(`agents.testing.ScriptedModel`) in place of the LLM, and a real sandbox."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agents import Agent, Runner
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tracing import Span, Trace, TracingProcessor, set_trace_processors

from fissile import AsyncSandbox, Sandbox
from fissile.openai_agents import fissile_code_interpreter, truncate

from .conftest import Daemon


class Spans(TracingProcessor):
    """Keeps the data of the finished custom spans named `name`."""

    def __init__(self, name: str = "fissile.exec") -> None:
        self.name = name
        self.spans: list[dict[str, Any]] = []

    def on_trace_start(self, trace: Trace) -> None:
        pass

    def on_trace_end(self, trace: Trace) -> None:
        pass

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        exported = span.export() or {}
        data = exported.get("span_data", {})
        if data.get("type") == "custom" and data.get("name") == self.name:
            self.spans.append(data.get("data", {}))

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


def call(code: str, call_id: str) -> list[Any]:
    return [function_call("run_python", {"code": code}, call_id=call_id)]


def test_the_tool_keeps_state_returns_images_and_renders_errors(env: Daemon) -> None:
    spans = Spans()
    set_trace_processors([spans])
    model = ScriptedModel(
        [
            call("x = 21", "c1"),
            call("x * 2", "c2"),
            call(
                "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                "plt.plot([1, 3, 2])\nplt.show()",
                "c3",
            ),
            call("1/0", "c4"),
            [assistant_message("done")],
        ]
    )
    with Sandbox() as sb:
        chunks: list[tuple[str, str]] = []
        coder = Agent(
            name="coder",
            instructions="Use run_python.",
            model=model,
            tools=[
                fissile_code_interpreter(sandbox=sb, on_output=lambda s, t: chunks.append((s, t)))
            ],
        )
        result = asyncio.run(Runner.run(coder, "compute"))
        assert result.final_output == "done"
        inputs = [json.dumps(c.input, default=str) for c in model.calls]
        assert "value:\\n42" in inputs[2], inputs[2][-2000:]  # state persisted across calls
        assert '"input_image"' in inputs[3] and "data:image/png;base64," in inputs[3]
        assert "ZeroDivisionError" in inputs[4]
        assert sb.run_code("x").text == "21"
    assert len(spans.spans) == 4, spans.spans
    assert all(s["sandbox_id"] == sb.id and s["agent"] == "coder" for s in spans.spans)
    assert spans.spans[1]["code"] == "x * 2" and spans.spans[1]["server_ms"] > 0
    assert spans.spans[3]["error"].startswith("ZeroDivisionError")


def test_handoff_only_the_coder_runs_code(env: Daemon) -> None:
    spans = Spans()
    set_trace_processors([spans])

    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            coder_model = ScriptedModel(
                [call("print('from coder')", "k1"), [assistant_message("coded")]]
            )
            coder = Agent(
                name="coder",
                model=coder_model,
                tools=[fissile_code_interpreter(sandbox=sb)],
            )
            coordinator = Agent(
                name="coordinator",
                model=ScriptedModel([[function_call("transfer_to_coder", {}, call_id="h1")]]),
                handoffs=[coder],
            )
            result = await Runner.run(coordinator, "please code")
            assert result.final_output == "coded"
            assert "from coder" in json.dumps(coder_model.calls[-1].input, default=str)

    asyncio.run(main())
    assert [s["agent"] for s in spans.spans] == ["coder"]


def test_long_output_keeps_head_and_tail() -> None:
    text = "a" * 100 + "b" * 100
    cut = truncate(text, 60)
    assert cut.startswith("a" * 40) and cut.endswith("b" * 20)
    assert "140 characters cut" in cut
