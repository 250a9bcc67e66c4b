"""Wait until a Ray cluster has all its nodes (used by the Slurm launcher).

    python -m megatron_spin.orchestrate.ray_nodes --address HEAD_IP:PORT --nodes 8 --timeout 600

Polls the cluster's node table every few seconds, printing how many nodes have joined, and
exits 0 once ``--nodes`` are alive, 1 when the timeout passes first (naming how many are
missing).  A hard alarm bounds the whole command: connecting to a head that is shutting down
can block inside Ray, and a launcher must never wait forever.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for_nodes(address: str, nodes: int, timeout: float, poll: float = 2.0) -> int:
    import ray

    deadline, last = time.monotonic() + timeout, -1
    while True:  # the head may still be starting
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
            if time.monotonic() > deadline:
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
    args = ap.parse_args(argv)

    def _alarm(*_):
        print(f"[ray] no answer from {args.address} within {args.timeout + 60:.0f} s", file=sys.stderr, flush=True)
        sys.exit(1)

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(args.timeout) + 60)
    return wait_for_nodes(args.address, args.nodes, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
