"""Run a uapt command held still at one exact point, for a test to signal it there.

    python tests/held_run.py PATTERN ROW READY -m uapt.train ARGS...
    python tests/held_run.py PATTERN ROW READY .venv/bin/uapt-train ARGS...

The point: just before the process appends row ROW (1-based) to a file whose path matches the
fnmatch PATTERN. uapt appends each row of a run's metrics.jsonl by opening the file for
appending, so "before metrics row 3 of run X" is an exact place in the run, where polling a
running process from outside only gets near it (and may find the run already past it). The
opens are seen through Python's audit hook, so uapt itself runs unchanged.

There the process writes the file READY and waits for SIGINT, SIGTERM, SIGUSR1 or SIGUSR2: it
hands the signal to the handler uapt installed (uapt's checkpoints at the end of the step) and
goes on; SIGKILL ends it where it stands. A process that nobody signals exits with status 3
after HOLD_LIMIT_S, so a test that died cannot leave it behind forever.
"""

from __future__ import annotations

import fnmatch
import os
import runpy
import signal
import sys
import threading
import time
from collections import Counter

HOLD_LIMIT_S = 1800  # longer than any test that holds a run lasts (ceilings: tests/conftest.py)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def hold_before_row(pattern: str, row: int, ready: str) -> None:
    """Install the audit hook that holds the process before row `row` of a matching file."""
    appends: Counter[str] = Counter()
    held = False

    def hook(event: str, args: tuple) -> None:
        nonlocal held
        if event != "open" or held or threading.current_thread() is not threading.main_thread():
            return
        path, mode = args[0], args[1]
        if not isinstance(mode, str) or "a" not in mode or not isinstance(path, str | os.PathLike):
            return
        path = os.fspath(path)
        if not fnmatch.fnmatch(path, pattern):
            return
        appends[path] += 1
        if appends[path] == row:
            held = True  # once; and the READY file's own open below is not counted
            wait_for_signal(ready)

    sys.addaudithook(hook)


def wait_for_signal(ready: str) -> None:
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in SIGNALS}
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not received:  # a short sleep, not signal.pause(): a signal can come before the call
        if time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.02)
    for s, handler in previous.items():
        signal.signal(s, handler)
    handler = previous[received[0]]
    if callable(handler):
        handler(received[0], None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(received[0])


def main(argv: list[str]) -> None:
    pattern, row, ready, *command = argv
    hold_before_row(pattern, int(row), ready)
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
