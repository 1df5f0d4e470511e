"""Calm Ctrl-C for the trainers: the first Ctrl-C asks the loop to stop after the step in progress (it then saves
its state and raises :class:`Interrupted`, a KeyboardInterrupt that says how to resume); a second Ctrl-C
interrupts at once, as usual.  ``palimpsa`` prints the message in one line and exits with 130."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

_requested = False
_depth = 0  # nested stop_on_interrupt contexts (a sweep around its runs): the outermost one owns the handler


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C; ``str()`` is the one line to show, ``resume_step`` where a rerun continues."""

    def __init__(self, message: str, resume_step: Optional[int] = None):
        super().__init__(message)
        self.resume_step = resume_step


def resume_message(step: int) -> str:
    """The line shown for a run interrupted with its state saved after ``step`` steps."""
    return f"interrupted; run the same command again to resume from step {step}"


def stop_requested() -> bool:
    """True once Ctrl-C was pressed inside :func:`stop_on_interrupt`."""
    return _requested


def _request_stop(signum, frame) -> None:
    global _requested
    _requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once


@contextlib.contextmanager
def stop_on_interrupt():
    """Within this context the first Ctrl-C (SIGINT) only sets :func:`stop_requested` (main thread only;
    elsewhere Ctrl-C keeps raising KeyboardInterrupt).  The outermost context restores the previous handler."""
    global _requested, _depth
    if _depth > 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _request_stop)
    _requested, _depth = False, 1
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested, _depth = False, 0
