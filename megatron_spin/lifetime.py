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


# Ports whose TCP sockets forked children must not keep (see keep_out_of_forks).
_SERVED_PORTS: set[int] = set()
_FORK_HOOK = False


def keep_out_of_forks(port: int) -> None:
    """Forked children of this process close its TCP sockets on ``port`` (the listener and every
    accepted connection) right after the fork.

    A server on a thread of a process that forks long-lived helpers (Megatron's checkpoint writer,
    from a rank serving the in-process engine) otherwise leaves a copy of each keep-alive
    connection in the child: when the server later closes its end, the kernel sends no FIN while
    the child's copy is open, so the client reuses a connection no one reads, and its next request
    waits for ever.  :func:`release_port` ends it."""
    global _FORK_HOOK
    _SERVED_PORTS.add(int(port))
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_close_served_sockets)
        _FORK_HOOK = True


def release_port(port: int) -> None:
    _SERVED_PORTS.discard(int(port))


def _close_served_sockets() -> None:
    if not _SERVED_PORTS:
        return
    import socket

    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]  # Linux; elsewhere forks keep them
    except OSError:
        return
    for fd in fds:
        try:
            s = socket.socket(fileno=fd)  # ENOTSOCK for files, pipes, the listdir's own descriptor
        except OSError:
            continue
        ours = False
        try:
            ours = s.family in (socket.AF_INET, socket.AF_INET6) and s.getsockname()[1] in _SERVED_PORTS
        except OSError:
            pass
        finally:
            if ours:
                s.close()
            else:
                s.detach()  # not ours: the descriptor stays open
