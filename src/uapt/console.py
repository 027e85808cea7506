"""What a command prints: uapt's own lines and its training bar on the terminal; what libraries say
(lm-evaluation-harness, transformers, datasets, W&B, Python warnings) goes to the run's log file
only (`<run>/train.log`, attached by uapt.train), unless it is an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

OWN = "uapt"  # the logger tree whose INFO lines the terminal shows
LIBRARY_LEVEL = logging.ERROR  # what the terminal shows of everyone else


class OwnLines(logging.Filter):
    """The terminal's filter: uapt's records, and other loggers' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return own or record.levelno >= LIBRARY_LEVEL


def setup_logging() -> None:
    """Terminal logging for a uapt command (idempotent): uapt's lines through rich; every record
    still reaches the root logger's other handlers (the run's log file)."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.addFilter(OwnLines())
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger -> the log file
    for chatty in ("httpx", "urllib3", "filelock"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    _no_library_bars()


def _no_library_bars() -> None:
    """transformers' and datasets' own progress bars (loading weights, writing shards, mapping)."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


@contextlib.contextmanager
def library_bars_hidden() -> Iterator[None]:
    """Hide the progress bars a library draws on stderr itself (lm-eval's per-request bars), for
    the duration: uapt logs one line per phase instead. Log records are unaffected (their
    handlers hold their own streams)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def quiet_wanted() -> bool:
    """Whether this process runs a uapt command with the terminal set up by `setup_logging`."""
    return any(isinstance(f, OwnLines) for h in logging.getLogger().handlers for f in h.filters)
