//! The REPL's cell semantics against IPython's own `InteractiveShell`, the reference agent
//! developers know (E2B runs a real Jupyter kernel): the same cells, run in order in one
//! session by the real agent and by IPython, must display the same value (or none), raise
//! the same exception class and print the same stdout. Includes what used to differ: a
//! trailing `;` hides the value, and top-level `await` (and `async for`, async
//! comprehensions) runs on an event loop that persists across cells.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::TestAgent;
use serde::Deserialize;

/// Cells run in this order in one session (later cells use earlier state).
const CELLS: &[&str] = &[
    "1 + 1",
    "_",
    "x = 5",
    "x",
    "x;",
    "x;  # a comment after the semicolon\n\n",
    "_",
    "x  # not quiet; the semicolon is in a comment",
    "print('hi')",
    "print('a'); print('b');",
    "None",
    "import math\nround(math.pi, 4)",
    "for i in range(3):\n    i",
    "if True:\n    7",
    "a, b = 1, 2\na, b",
    "'semi;colon;'",
    "'''multi\nline;'''",
    "x = 1; x",
    "1; 2",
    "x = 10\nx += 1\nx",
    "[i * i for i in range(4)]",
    "{'k': [1, 2], 'j': None}",
    "print('out')\n42",
    "def h():\n    return 5\nh()",
    "class C:\n    pass\nC.__name__",
    "async def g():\n    return 42",
    "await g()",
    "r = await g()\nr + 1",
    "await g();",
    "(await g(),)",
    "import asyncio\nawait asyncio.sleep(0)\n'slept'",
    "await asyncio.sleep(0)",
    "async def agen():\n    yield 1\n    yield 2",
    "[v async for v in agen()]",
    "async for v in agen():\n    print(v)",
    "async def later():\n    await asyncio.sleep(0)\n    return 'done'\ntask = asyncio.ensure_future(later())\nawait task",
    "import sys\nprint('to stderr', file=sys.stderr)\n'e'",
    "1/0",
    "raise ValueError('bad')",
    "def f(:\n    pass",
    "return 5",
    "del x",
    "x",
    "y = (lambda: 3)()\ny;",
    "y",
];

/// What one cell did, as both sides report it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Observed {
    /// `repr` of the displayed value, if one was displayed.
    result: Option<String>,
    /// The exception class, if the cell raised.
    error: Option<String>,
    /// Everything printed to stdout.
    stdout: String,
}

/// Runs `CELLS` in one IPython `InteractiveShell` (same interpreter as the agent's REPL).
const ORACLE: &str = r#"
import contextlib, io, json, sys
try:
    from IPython.core.interactiveshell import InteractiveShell
except ImportError as e:
    print(json.dumps({"missing": str(e)}))
    sys.exit(0)
sh = InteractiveShell.instance()
# Keep the value bookkeeping (`_`, the execution result), drop the printing.
sh.displayhook.write_output_prompt = lambda: None
sh.displayhook.write_format_data = lambda *a, **k: None
sh.showtraceback = lambda *a, **k: None
sh.showsyntaxerror = lambda *a, **k: None
out = []
for cell in json.load(sys.stdin):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        r = sh.run_cell(cell, store_history=True)
    err = r.error_before_exec or r.error_in_exec
    out.append({
        "result": None if r.result is None else repr(r.result),
        "error": None if err is None else type(err).__name__,
        "stdout": buf.getvalue(),
    })
print(json.dumps({"cells": out}))
"#;

#[derive(Deserialize)]
struct OracleReply {
    missing: Option<String>,
    cells: Option<Vec<Observed>>,
}

fn python() -> String {
    std::env::var("FISSILE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn ipython(cells: &[&str]) -> Vec<Observed> {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(python())
        .args(["-c", ORACLE])
        .env("IPYTHONDIR", profile.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(cells).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the IPython oracle failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let reply: OracleReply = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("oracle output {text:?} is not its JSON: {e}"));
    if let Some(why) = reply.missing {
        panic!(
            "{} lacks IPython ({why}): this test compares against it; scripts/setup.sh \
             installs it in the venv (FISSILE_PYTHON)",
            python()
        );
    }
    reply.cells.unwrap()
}

fn fissile(cells: &[&str]) -> Vec<Observed> {
    let agent = TestAgent::start();
    let mut c = agent.client();
    cells
        .iter()
        .map(|cell| {
            let out = c.exec_code(cell).unwrap();
            Observed {
                result: out.result_text().map(str::to_string),
                error: out.error().map(|(name, _, _)| name.to_string()),
                stdout: out.stdout(),
            }
        })
        .collect()
}

#[test]
fn cells_display_raise_and_print_as_in_ipython() {
    let theirs = ipython(CELLS);
    let ours = fissile(CELLS);
    assert_eq!(theirs.len(), CELLS.len());
    let differing: Vec<String> = CELLS
        .iter()
        .zip(theirs.iter().zip(&ours))
        .filter(|(_, (t, o))| t != o)
        .map(|(cell, (t, o))| format!("{cell:?}\n  IPython: {t:?}\n  Fissile: {o:?}"))
        .collect();
    assert!(
        differing.is_empty(),
        "{} of {} cells differ from IPython:\n{}",
        differing.len(),
        CELLS.len(),
        differing.join("\n")
    );
    // The comparison is not vacuous: values, quiet cells, awaits and errors all occurred.
    let shown = |cell: &str| {
        let i = CELLS.iter().position(|c| *c == cell).unwrap();
        ours[i].clone()
    };
    assert_eq!(shown("x;").result, None);
    assert_eq!(shown("x").result.as_deref(), Some("5"));
    assert_eq!(shown("await g()").result.as_deref(), Some("42"));
    assert_eq!(
        shown("[v async for v in agen()]").result.as_deref(),
        Some("[1, 2]")
    );
    assert_eq!(shown("1/0").error.as_deref(), Some("ZeroDivisionError"));
}
