"""SIGUSR1: checkpoint after the step under way and stop (Slurm's ``--signal=B:USR1@T``)."""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequest:
    """Set by SIGUSR1 (Slurm's ``--signal=B:USR1@T`` reaches the driver through the launcher):
    the loop saves a checkpoint after the step under way and stops, so a time limit costs no work."""

    _installed: Optional["StopRequest"] = None

    def __init__(self):
        self.requested: Optional[str] = None

    @classmethod
    def install(cls) -> "StopRequest":
        """The process's one request object; the handler is installed once, as early as possible
        (SIGUSR1's default action would kill the driver)."""
        if cls._installed is None:
            cls._installed = cls()
            if threading.current_thread() is threading.main_thread():  # signal handlers live there only
                signal.signal(signal.SIGUSR1, lambda *_: setattr(cls._installed, "requested", "SIGUSR1"))
        return cls._installed
