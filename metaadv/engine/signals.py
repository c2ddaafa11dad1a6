"""SIGTERM/SIGINT as a request to stop at the next step boundary (after a checkpoint)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["StopOnSignal"]

log = logging.getLogger(__name__)


class StopOnSignal:
    """SIGTERM/SIGINT set a flag that the loop checks at each step boundary; a second signal stops at once.

    Handlers are installed only in the main thread (Python's rule) and the previous ones restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[StopOnSignal]:
        if enabled and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            self.previous.clear()
