"""The code interpreter's process in the guest (run as ``python3 -u -c SOURCE MARKER``).

Reads one JSON request per line on stdin ({"id", "code", "env"}); runs the code
in one namespace that persists across requests (a notebook's kernel); answers
with lines ``MARKER + ID + "\x1f" + JSON`` on stdout (ID: the request's, so
the host can tell an interrupted cell's late lines from the next one's):
stdout/stderr text, the value of a last expression ("result"), an exception
("error"), "number_of_executions" and "end_of_execution". Other lines on
stdout are output of child processes.
Only the standard library, so any image with python3 runs it.
"""

import ast
import io
import json
import os
import sys
import time
import traceback

MARK = sys.argv[1]
_proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")


_current = [""]


def emit(obj: dict[str, object]) -> None:
    _proto.write(MARK + _current[0] + "\x1f" + json.dumps(obj) + "\n")
    _proto.flush()


class _Stream(io.TextIOBase):
    """Text written by the cell, sent a line at a time (and the rest at flush)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            cut = self.pending.rindex("\n") + 1
            self._send(self.pending[:cut])
            self.pending = self.pending[cut:]
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self._send(self.pending)
            self.pending = ""

    def _send(self, text: str) -> None:
        emit({"type": self.kind, "text": text, "timestamp": time.time_ns()})


def run(code: str, namespace: dict[str, object]) -> None:
    tree = ast.parse(code, "<cell>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        expr = tree.body.pop()
        assert isinstance(expr, ast.Expr)  # noqa: S101 - checked just above
        last = ast.Expression(expr.value)
    exec(compile(tree, "<cell>", "exec"), namespace)  # noqa: S102 - running the cell is the job
    if last is not None:
        value = eval(compile(last, "<cell>", "eval"), namespace)  # noqa: S307 - as above
        if value is not None:
            emit({"type": "result", "text": repr(value), "is_main_result": True})


def main() -> None:
    sys.stdout = _Stream("stdout")
    sys.stderr = _Stream("stderr")
    namespace: dict[str, object] = {"__name__": "__main__"}
    count = 0
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        count += 1
        _current[0] = str(request.get("id", ""))
        saved = dict(os.environ)
        os.environ.update(request.get("env") or {})
        try:
            run(request.get("code", ""), namespace)
        except BaseException as exc:  # noqa: BLE001 - the cell's error is the answer
            emit(
                {
                    "type": "error",
                    "name": type(exc).__name__,
                    "value": str(exc),
                    "traceback": "".join(traceback.format_exception(exc)),
                }
            )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.environ.clear()
            os.environ.update(saved)
        emit({"type": "number_of_executions", "execution_count": count})
        emit({"type": "end_of_execution"})


main()
