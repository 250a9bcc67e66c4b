"""Wait until a Ray cluster has all its nodes (used by the Slurm launcher).

    python -m megatron_spin.orchestrate.ray_nodes --address HEAD_IP:PORT --nodes 8 --timeout 600 [--alive-pid P]

Polls the cluster's node table every few seconds, printing how many nodes have joined, and
exits 0 once ``--nodes`` are alive, 1 when the timeout passes first (naming how many are
missing) or as soon as process ``--alive-pid`` (the launcher's Ray head step) has exited.
Connecting to a head that is shutting down can block inside Ray's C++ client, where no Python
signal handler runs: the launcher bounds this command with ``timeout`` as well.

Also :func:`node_address`, this node's address as other nodes reach it, for the trainer ranks
and the engine hosts (a module without torch: engine hosts stay small).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional


def node_address() -> str:
    """This node's address as other nodes reach it (Ray's view), or loopback outside Ray (a
    process that never imported Ray does not pay ~100 MB to ask it)."""
    if "ray" not in sys.modules:
        return "127.0.0.1"
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests): loopback
        return "127.0.0.1"


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _gone(pid: Optional[int]) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False


def wait_for_nodes(address: str, nodes: int, timeout: float, poll: float = 2.0, alive_pid: Optional[int] = None) -> int:
    import ray

    deadline, last = time.monotonic() + timeout, -1
    while True:  # the head may still be starting
        if _gone(alive_pid):
            print(f"[ray] the Ray head (pid {alive_pid}) exited before the cluster came up", file=sys.stderr, flush=True)
            return 1
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except ConnectionError as exc:
            if time.monotonic() > deadline:
                print(f"[ray] cannot reach the head at {address} within {timeout:.0f} s: {exc}", file=sys.stderr,
                      flush=True)
                return 1
            time.sleep(poll)
    try:
        while True:
            alive = alive_nodes()
            if len(alive) != last:
                names = sorted(n.get("NodeManagerHostname", "?") + ":" + n["NodeID"][:8] for n in alive)
                print(f"[ray] {len(alive)}/{nodes} nodes up: {', '.join(names)}", flush=True)
                last = len(alive)
            if len(alive) >= nodes:
                return 0
            if time.monotonic() > deadline or _gone(alive_pid):
                print(f"[ray] only {len(alive)}/{nodes} nodes joined within {timeout:.0f} s; see the per-node "
                      "Ray logs", file=sys.stderr, flush=True)
                return 1
            time.sleep(poll)
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    ap.add_argument("--nodes", type=int, required=True, help="how many nodes the cluster must have")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    ap.add_argument("--alive-pid", type=int, default=None, help="give up as soon as this process has exited")
    args = ap.parse_args(argv)
    return wait_for_nodes(args.address, args.nodes, args.timeout, alive_pid=args.alive_pid)


if __name__ == "__main__":
    sys.exit(main())
