"""What the trainer needs around its loop: a stop flag for SIGTERM/SIGINT and a no-op progress bar."""

from __future__ import annotations

import signal

__all__ = ["StopFlag", "NoBar"]


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and stops after the current step. A second
    SIGINT falls back to the default handler (KeyboardInterrupt)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class NoBar:
    def update(self, n=1): pass
    def set_postfix(self, **kw): pass
    def close(self): pass
