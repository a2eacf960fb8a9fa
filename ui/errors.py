"""What a user is told when a request fails, and what the log gets: one sentence for the user (no exception
class names, no server paths), one line in the log for refused input, a traceback only for real bugs."""
from __future__ import annotations

import logging
import re

import gradio as gr

from pipelines.errors import user_message
from pipelines.manager import InternalError

log = logging.getLogger("prism.ui")

UNEXPECTED = "Something went wrong on the server; it is still running and its log has the details. Try again."
LOG_CHARS = 300  # refused input is logged, but never at its own (possibly huge) length


class OutputError(RuntimeError):
    """The server could not store a result (disk full, folder not writable). The message names no path."""


def ui_error(exc: BaseException, where: str) -> gr.Error:
    """The gr.Error to raise for `exc` (raised by the handler `where`), after logging it once."""
    if isinstance(exc, gr.Error):
        message = exc.message
    elif isinstance(exc, InternalError):  # the manager logged the traceback; its text names internals
        message = UNEXPECTED
    elif isinstance(exc, OutputError):
        message = str(exc)
    else:
        message = user_message(exc, fallback=False)
        if message is None:
            log.exception("%s failed", where)  # a bug: the log gets the traceback, the user a sentence
            return gr.Error(UNEXPECTED, title="Could not run", print_exception=False)
    message = plain(message)
    log.warning("%s refused: %s", where, one_line(message))
    return gr.Error(message, title="Could not run", print_exception=False)


def plain(message: str) -> str:
    """Toasts show text as it is: Markdown code marks (`--models`) become quotes."""
    return re.sub(r"`([^`]*)`", r"'\1'", message)


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= LOG_CHARS else text[:LOG_CHARS - 3] + "..."
