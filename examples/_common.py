"""Shared by the examples: a real model when `OPENAI_API_KEY` is set, otherwise a scripted
one (`agents.testing.ScriptedModel`) that plays the model's turns so the examples run
offline against real sandboxes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agents import set_trace_processors, set_tracing_export_api_key
from agents.models.interface import Model
from agents.testing import ScriptedModel, assistant_message, function_call


def model(script: Sequence[list[Any]]) -> Model | None:
    """`None` (the SDK's default model) with `OPENAI_API_KEY`, else `script` played back."""
    if os.environ.get("OPENAI_API_KEY"):
        return None
    # Offline: no trace export either (it needs the key); spans still reach any processor
    # an application adds.
    set_tracing_export_api_key("offline")
    set_trace_processors([])
    return ScriptedModel(script)


def run_python(code: str, call_id: str) -> list[Any]:
    """A scripted turn: the model calls `run_python` with `code`."""
    return [function_call("run_python", {"code": code}, call_id=call_id)]


def say(text: str) -> list[Any]:
    """A scripted turn: the model answers `text`."""
    return [assistant_message(text)]


@contextmanager
def step(what: str) -> Iterator[None]:
    """Prints `what`, then how long it took."""
    print(f"-- {what}", flush=True)
    t0 = time.monotonic()
    yield
    print(f"   ({(time.monotonic() - t0) * 1e3:.0f} ms)", flush=True)


def show_tool_outputs(result: Any) -> None:
    """Prints what each tool call returned to the model (text, and image sizes)."""
    for item in result.new_items:
        if getattr(item, "type", "") != "tool_call_output_item":
            continue
        out = item.output
        parts = out if isinstance(out, list) else [out]
        for p in parts:
            url = getattr(p, "image_url", None) or (
                p.get("image_url") if isinstance(p, dict) else None
            )
            text = getattr(p, "text", None) or (p.get("text") if isinstance(p, dict) else None)
            if url:
                print(f"   tool -> image ({len(url) * 3 // 4 // 1024} KiB PNG)")
            elif text is not None:
                print("   tool -> " + text.replace("\n", "\n           "))
            else:
                print(f"   tool -> {str(p)[:300]}")
