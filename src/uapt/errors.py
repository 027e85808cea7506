"""The one error type users see without a traceback.

A UserError is a problem with what the user gave uapt (a config value, a data file, a model
source, a damaged file in a run folder or cache): its message names the key, file or line and
says what is allowed. Commands print it alone and exit with status 2 (`HYDRA_FULL_ERROR=1` or
`UAPT_DEBUG=1` shows the traceback too); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """A bad input; the message names the key, file or line."""


def show_traceback() -> bool:
    """Whether the user asked for tracebacks of user errors too."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HYDRA_FULL_ERROR", "UAPT_DEBUG"))


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`: an error of W&B spans lines (hints, tracebacks of its
    service), and a failure of an observer must not take more than one line of the log."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
