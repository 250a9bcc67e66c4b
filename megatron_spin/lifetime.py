"""Process lifetime: children the kernel stops when their parent dies (Linux).

A process killed with SIGKILL (a scheduler, the OOM killer, ``kill -9``) runs no cleanup, so
whatever it started outlives it: a gloo rank waits forever for its launcher, an engine keeps its
port and memory, the helpers Megatron's checkpoint writer forks keep writing into a run that
has ended.  ``PR_SET_PDEATHSIG`` asks the kernel to signal a child when the thread that created
it exits; set in the child right after ``fork``, before it can be orphaned.  Where ``prctl`` is
missing (not Linux) these calls do nothing and teardown relies on explicit stops.
"""

from __future__ import annotations

import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child: receive ``sig`` when the parent dies (call between fork and exec, or first thing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except OSError:
        pass


def forked_children_die_with_this_process() -> None:
    """Every child this process forks from now on gets SIGKILL when it dies (Megatron's
    checkpoint writer forks helpers from the rank; a killed rank must not leave them writing)."""
    os.register_at_fork(after_in_child=die_with_parent)
