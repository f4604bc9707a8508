# Fissile REPL driver: runs inside the persistent Python process started by fissile-agent.
#
# File descriptors (set up by the agent):
#   0 = /dev/null, 1 and 2 = pipes read by the agent (fd-level output: C extensions, child
#   processes), 3 = commands from the agent (JSON lines), 4 = events to the agent (JSON lines).
# Python-level sys.stdout / sys.stderr are replaced by writers that send "out" events over
# fd 4, so print() to both streams keeps its exact relative order. At the end of every cell
# the driver writes the sentinel (env FISSILE_SENTINEL) to fd 1 and fd 2, then the "done"
# event, so the agent knows when all fd-level output of the cell has arrived.
# Command:  {"code": str, "env": {str: str}, "n": int}
# Events:   {"t": "ready", "python": str}
#           {"t": "out", "s": "stdout"|"stderr", "d": str}
#           {"t": "display"|"result", "data": {mime: str}}   (image/* values are base64)
#           {"t": "error", "ename": str, "evalue": str, "tb": [str]}
#           {"t": "done", "n": int}


def _fissile_main():
    import ast
    import base64
    import builtins
    import ctypes
    import io
    import json
    import linecache
    import os
    import queue
    import signal
    import sys
    import threading
    import time
    import tokenize
    import traceback
    import types

    sentinel = os.environ.pop("FISSILE_SENTINEL").encode()
    os.environ.setdefault("MPLBACKEND", "module://fissile_mpl_backend")
    cmd_in = os.fdopen(3, "rb", buffering=0)
    ev_fd = 4
    ev_lock = threading.RLock()
    # Output is coalesced per stream and flushed on a stream switch, above FLUSH_AT, on
    # flush(), at cell end, and FLUSH_EVERY seconds after a write left some buffered, so it
    # streams while a cell runs. Events are capped well below the agent's line cap.
    FLUSH_AT = 32 * 1024
    FLUSH_EVERY = 0.02
    # The flusher sleeps until a write leaves output buffered ("flush_due", set under
    # ev_lock, one wake-up queued per setting), so an idle interpreter wakes nobody: a timer
    # every FLUSH_EVERY would wake an idle sandbox's guest 50 times a second, and a restored
    # one at once. A SimpleQueue, not an Event: its put takes no lock written in Python, so
    # a trace hook or signal handler that prints in the middle of it cannot deadlock.
    FLUSHER_IDLE_WAKE = 60.0
    state = {"in_cell": False, "critical": 0, "pending_int": False, "flush_due": False}
    pending = {"s": None, "parts": [], "size": 0}
    flush_wake = queue.SimpleQueue()

    def write_all(data):
        view = memoryview(data)
        while view:
            n = os.write(ev_fd, view)
            view = view[n:]

    def send(obj):
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        write_all(line)

    class critical:
        # A KeyboardInterrupt must never land half-way through an event line.
        # Only the main thread counts: Python runs signal handlers there.
        def __enter__(self):
            self.main = threading.current_thread() is threading.main_thread()
            if self.main:
                state["critical"] += 1

        def __exit__(self, *a):
            if not self.main:
                return False
            state["critical"] -= 1
            if state["critical"] == 0 and state["pending_int"] and state["in_cell"]:
                state["pending_int"] = False
                raise KeyboardInterrupt
            return False

    def flush_pending_locked():
        if pending["parts"]:
            text = "".join(pending["parts"])
            stream = pending["s"]
            pending["parts"] = []
            pending["size"] = 0
            for i in range(0, len(text), FLUSH_AT):
                send({"t": "out", "s": stream, "d": text[i : i + FLUSH_AT]})

    def emit(obj):
        with critical(), ev_lock:
            flush_pending_locked()
            send(obj)

    def flush_all():
        with critical(), ev_lock:
            flush_pending_locked()

    class EventStream(io.TextIOBase):
        def __init__(self, name):
            self.name = name
            self._name = "<%s>" % name

        def writable(self):
            return True

        def isatty(self):
            return False

        @property
        def encoding(self):
            return "utf-8"

        @property
        def errors(self):
            return "replace"

        def write(self, s):
            if not isinstance(s, str):
                raise TypeError("write() argument must be str, not %s" % type(s).__name__)
            if not s:
                return 0
            with critical(), ev_lock:
                if pending["s"] != self.name:
                    flush_pending_locked()
                    pending["s"] = self.name
                pending["parts"].append(s)
                pending["size"] += len(s)
                if pending["size"] >= FLUSH_AT:
                    flush_pending_locked()
                elif not state["flush_due"]:
                    state["flush_due"] = True
                    flush_wake.put(None)
            return len(s)

        def flush(self):
            flush_all()

        def fileno(self):
            return 1 if self.name == "stdout" else 2

        @property
        def buffer(self):
            return BinaryStream(self)

    class BinaryStream(io.RawIOBase):
        def __init__(self, text):
            self._text = text

        def writable(self):
            return True

        def write(self, b):
            self._text.write(bytes(b).decode("utf-8", "replace"))
            return len(b)

        def flush(self):
            flush_all()

    def flusher():
        # SIGINT is for the main thread, where Python runs its handler (the agent sends it
        # there); taken by this thread it would not wake a main thread blocked in a call.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        while True:
            try:
                flush_wake.get(timeout=FLUSHER_IDLE_WAKE)
            except queue.Empty:
                continue
            time.sleep(FLUSH_EVERY)
            # Cleared before the look at `pending`: a write after the look queues another
            # wake-up, so no output waits for one that never comes.
            with ev_lock:
                state["flush_due"] = False
            if pending["parts"]:
                try:
                    flush_all()
                except Exception:
                    pass

    def on_sigint(signum, frame):
        if not state["in_cell"]:
            return
        if state["critical"]:
            state["pending_int"] = True
            return
        raise KeyboardInterrupt

    def no_input(*args, **kwargs):
        raise RuntimeError(
            "input() is not supported in a Fissile sandbox: there is no interactive stdin. "
            "Pass the data in the code, in a file, or as an environment variable."
        )

    backend_src = '''
from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas
from matplotlib.backend_bases import FigureManagerBase as FigureManager
def show(*args, **kwargs):
    import sys
    sys._fissile_show_figures()
'''

    class BackendFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "fissile_mpl_backend":
                return None
            import importlib.util

            return importlib.util.spec_from_loader(name, BackendLoader())

    class BackendLoader:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            exec(compile(backend_src, "<fissile_mpl_backend>", "exec"), module.__dict__)

    def show_figures():
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            try:
                fig.savefig(buf, format="png", bbox_inches="tight")
            except Exception as e:
                sys.stderr.write("fissile: could not render figure %s: %r\n" % (num, e))
                continue
            emit(
                {
                    "t": "display",
                    "data": {
                        "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                        "text/plain": repr(fig),
                    },
                }
            )
        plt.close("all")

    driver_globals = globals()

    def format_error(e):
        # The traceback without the driver's own frames (they share the driver's globals).
        frames = []
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals is not driver_globals:
                frames.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        lines = []
        if frames and not isinstance(e, SyntaxError):
            lines.append("Traceback (most recent call last):\n")
            lines.extend(traceback.StackSummary.extract(iter(frames)).format())
        lines.extend(traceback.format_exception_only(type(e), e))
        return lines

    def report_error(e):
        lines = format_error(e)
        emit(
            {
                "t": "error",
                "ename": type(e).__name__,
                "evalue": str(e),
                "tb": [l.rstrip("\n") for l in lines],
            }
        )

    def mime_of(value):
        data = {"text/plain": repr(value)}
        html = getattr(value, "_repr_html_", None)
        if callable(html):
            try:
                h = html()
                if isinstance(h, str):
                    data["text/html"] = h
            except Exception:
                pass
        return data

    libc_fflush = None
    try:
        libc_fflush = ctypes.CDLL(None).fflush
    except Exception:
        pass

    main_mod = types.ModuleType("__main__")
    main_mod.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_mod
    ns = main_mod.__dict__

    # IPython's cell semantics: the last expression statement is displayed unless the cell
    # ends with ";" (ignoring comments and blank lines); top-level await runs the cell on
    # one event loop that lives as long as the interpreter (IPython's autoawait).
    quiet_ignored = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
    compile_flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    co_coroutine = 0x80  # inspect.CO_COROUTINE, without importing inspect up front
    loop_box = []

    def ends_with_semicolon(code):
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
        except (tokenize.TokenError, SyntaxError):
            return False
        for tok in reversed(tokens):
            if tok.type in quiet_ignored:
                continue
            return tok.type == tokenize.OP and tok.string == ";"
        return False

    def is_async(code_obj):
        return code_obj is not None and bool(code_obj.co_flags & co_coroutine)

    def run_codes(body, last_code):
        # Returns the last expression's value. A cell with a top-level await anywhere runs
        # whole inside the loop (as IPython does), so its synchronous statements see it as
        # the running loop too.
        if not (is_async(body) or is_async(last_code)):
            eval(body, ns)
            return eval(last_code, ns) if last_code is not None else None

        async def whole_cell():
            r = eval(body, ns)
            if is_async(body):
                await r
            if last_code is None:
                return None
            v = eval(last_code, ns)
            if is_async(last_code):
                v = await v
            return v

        if not loop_box:
            import asyncio

            loop_box.append(asyncio.new_event_loop())
        return loop_box[0].run_until_complete(whole_cell())

    def run_cell(code, n):
        filename = "<cell-%d>" % n
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = ast.parse(code, filename, "exec")
        except (SyntaxError, ValueError) as e:
            report_error(e)
            return
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        quiet = last is not None and ends_with_semicolon(code)
        try:
            body = compile(tree, filename, "exec", flags=compile_flags, dont_inherit=True)
            last_code = (
                compile(last, filename, "eval", flags=compile_flags, dont_inherit=True)
                if last is not None
                else None
            )
        except (SyntaxError, ValueError) as e:
            report_error(e)
            return
        try:
            state["in_cell"] = True
            value = run_codes(body, last_code)
            state["in_cell"] = False
            if value is not None and not quiet:
                builtins._ = value
                emit({"t": "result", "data": mime_of(value)})
        except BaseException as e:
            state["in_cell"] = False
            if isinstance(e, SystemExit):
                pass
            report_error(e)

    def end_cell(n):
        state["in_cell"] = False
        state["pending_int"] = False
        try:
            show_figures()
        except BaseException as e:
            report_error(e)
        flush_all()
        for f in (sys.__stdout__, sys.__stderr__):
            try:
                f.flush()
            except Exception:
                pass
        if libc_fflush is not None:
            try:
                libc_fflush(None)
            except Exception:
                pass
        with ev_lock:
            os.write(1, sentinel)
            os.write(2, sentinel)
            send({"t": "done", "n": n})

    sys.meta_path.insert(0, BackendFinder)
    sys._fissile_show_figures = show_figures
    sys.stdout = EventStream("stdout")
    sys.stderr = EventStream("stderr")
    sys.stdin = open(os.devnull, "r")
    builtins.input = no_input
    signal.signal(signal.SIGINT, on_sigint)
    threading.Thread(target=flusher, name="fissile-flush", daemon=True).start()
    send({"t": "ready", "python": sys.version})

    while True:
        try:
            line = cmd_in.readline()
            if not line:
                os._exit(0)
            cmd = json.loads(line)
            n = cmd["n"]
            saved = {}
            for k, v in cmd.get("env", {}).items():
                saved[k] = os.environ.get(k)
                os.environ[k] = v
            try:
                run_cell(cmd["code"], n)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                end_cell(n)
        except KeyboardInterrupt:
            continue


_fissile_main()
