"""SIGTERM behaves like Ctrl-C in the CLI process (``docker stop``, systemd, ``timeout``).

The handler raises :class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, so every
``try/except BaseException`` / ``finally`` cleanup runs (``build`` removes its temporary folder) and
the CLI reports it and exits 128 + 15. It is installed by the CLI's ``main`` group only, never when
the library is imported, and removed again when the command ends.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupt_on_sigterm() -> Callable[[], None]:
    """Install the handler; return the function that puts the previous one back.

    A second SIGTERM while the first one's cleanup runs is ignored, so the cleanup is not itself
    interrupted (SIGKILL still ends the process). Outside the main thread (where Python cannot set
    signal handlers) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signum, signal.SIG_IGN)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore
